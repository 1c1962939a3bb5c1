"""The transitions machine: only the card's moves, each committed before the action runs."""

from __future__ import annotations

from pathlib import Path

import pytest
from transitions import MachineError

from mhd.states.machine import TRANSITIONS, RunMachine
from mhd.states.model import HAPPY_PATH, RunState
from mhd.states.runner import backoff_delay
from mhd.store import Store


def test_happy_loop_is_exactly_the_card(tmp_path: Path):
    store = Store(f"sqlite:///{tmp_path / 'db'}")
    m = RunMachine(store, store.create_run("manual", "local"))
    for trigger in ("provisioned", "connected_upload", "uploaded", "trained", "fetched", "merged"):
        m.fire(trigger)
        # Committed: a fresh store sees the new state at once.
        assert Store(f"sqlite:///{tmp_path / 'db'}").get_run(m.run.id).state is m.state
    path = [store.journal(m.run.id)[0].from_state] + [t.to_state for t in store.journal(m.run.id)]
    assert tuple(path) == HAPPY_PATH


def test_skipping_a_state_is_refused_and_nothing_is_written(tmp_path: Path):
    store = Store(f"sqlite:///{tmp_path / 'db'}")
    m = RunMachine(store, store.create_run("manual", "local"))
    with pytest.raises(MachineError):
        m.fire("trained")
    assert store.get_run(m.run.id).state is RunState.PROVISIONING
    assert len(store.journal(m.run.id)) == 1


def test_drop_goes_back_through_connecting(tmp_path: Path):
    store = Store(f"sqlite:///{tmp_path / 'db'}")
    m = RunMachine(store, store.create_run("manual", "local"))
    m.fire("provisioned")
    m.fire("connected_upload")
    m.fire("uploaded")
    m.fire("lost", resume_state=RunState.TRAINING)
    assert m.state is RunState.CONNECTING and m.run.resume_state is RunState.TRAINING
    m.fire("connected_train")
    assert m.state is RunState.TRAINING


def test_a_stale_machine_cannot_overwrite_a_newer_state(tmp_path: Path):
    store = Store(f"sqlite:///{tmp_path / 'db'}")
    run = store.create_run("manual", "local")
    a, b = RunMachine(store, run), RunMachine(store, run)
    a.fire("provisioned")
    with pytest.raises(Exception, match="expected state Provisioning"):
        b.fire("abort")
    assert store.get_run(run.id).state is RunState.CONNECTING


def test_every_active_state_can_abort():
    sources = next(t["source"] for t in TRANSITIONS if t["trigger"] == "abort")
    assert set(sources) == {s for s in RunState if s not in (RunState.IDLE, RunState.ABORTING)}


def test_backoff_is_jittered_and_capped():
    import random

    rng = random.Random(1)
    delays = [backoff_delay(a, 1.0, 30.0, rng) for a in range(12)]
    assert all(0 <= d <= 30.0 for d in delays)
    assert len(set(delays)) == len(delays)
    assert max(backoff_delay(20, 1.0, 30.0, random.Random(i)) for i in range(50)) > 15
