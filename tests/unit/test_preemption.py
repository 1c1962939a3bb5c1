"""The preemption policy: which pod a preempted run gets next, from the counts kept in the DB."""

from __future__ import annotations

import pytest

from mhd.config import Config
from mhd.states.preemption import is_preemption, next_pod
from mhd.store import Store


def cfg(**runpod: object) -> Config:
    return Config.model_validate({"provider": "runpod", "runpod": {"interruptible": True, **runpod}})


@pytest.mark.parametrize(("policy", "after_max"), [
    ("resume_on_demand", "on_demand"), ("resume", "interruptible"), ("fail", "fail")])
def test_interruptible_until_max_preemptions_then_the_policy(policy: str, after_max: str) -> None:
    c = cfg(max_preemptions=3, on_preemption=policy)
    assert [next_pod(c, n, on_demand=False) for n in (1, 2, 3, 4)] == [
        "interruptible", "interruptible", after_max, after_max]


def test_default_policy_rides_out_three_preemptions_then_rents_on_demand() -> None:
    c = cfg()
    assert (c.runpod.max_preemptions, c.runpod.on_preemption) == (3, "resume_on_demand")
    assert next_pod(c, 2, on_demand=False) == "interruptible"
    assert next_pod(c, 3, on_demand=False) == "on_demand"


def test_a_run_that_fell_back_stays_on_demand_and_on_demand_config_never_rents_spot() -> None:
    assert next_pod(cfg(), 1, on_demand=True) == "on_demand"
    assert next_pod(cfg(interruptible=False), 1, on_demand=False) == "on_demand"
    assert next_pod(cfg(max_preemptions=0, on_preemption="fail"), 1, on_demand=True) == "fail"


def test_the_counts_the_policy_reads_survive_a_reopen(tmp_path) -> None:
    url = f"sqlite:///{tmp_path / 'mhd.db'}"
    s = Store(url)
    run = s.create_run("manual", "runpod")
    s.update_run(run.id, preemptions=2, on_demand=True)
    s.close()
    again = Store(url).get_run(run.id)
    assert again is not None and (again.preemptions, again.on_demand) == (2, True)
    assert next_pod(cfg(), again.preemptions, again.on_demand) == "on_demand"


def test_journal_reasons_marked_as_preemptions() -> None:
    assert is_preemption("preempted: pod p1 EXITED in Training (preemption 1 of max_preemptions 3)")
    assert not is_preemption("connection lost: the SSH link dropped")
