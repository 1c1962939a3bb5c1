"""The loop with ``provider = "runpod"`` against the RunPod REST v2 stand-in; the pods' SSH
endpoint is the loopback sshd behind the test's TCP proxy, and the real trainer runs "on the pod".

Provisioning faults (a crash between create and persist, 429/5xx, no capacity, no balance), the
reaper, the budget, and the API key: it must never reach a log, the database, a run folder or an
error message, even when the API echoes it back.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.support.e2e import API_KEY, E2E, HAPPY, wait_until

pytestmark = pytest.mark.slow

FIRST_GPU, SECOND_GPU = "NVIDIA RTX A6000", "NVIDIA A40"


def assert_key_nowhere(e2e: E2E, *texts: str) -> None:
    assert not e2e.files_containing(API_KEY), e2e.files_containing(API_KEY)
    for text in texts:
        assert API_KEY not in text
    for req in e2e.runpod.requests_for("POST /pods"):  # nor in what the pod is given
        assert API_KEY not in json.dumps(req.json)


def cli(e2e: E2E, *args: str) -> str:
    out = subprocess.run([sys.executable, "-m", "mhd.cli", "--config", str(e2e.config), *args],
                         capture_output=True, text=True, timeout=60)
    return out.stdout + out.stderr


def test_sigkill_between_create_and_persist_never_rents_a_second_pod(e2e: E2E) -> None:
    rp = e2e.use_runpod(provisioning_s=0.5, starting_s=0.5, ssh_delay_s=1.5)
    # A reaper round every half second: it must never take the run's own pod, not even while the
    # restarted daemon has yet to learn the pod's id (it owns it by name then).
    e2e.configure("runpod", runpod={"reap_interval_s": 0.5})
    e2e.write_memories(6)
    d = e2e.daemon(pause="Provisioning.created=30").start()
    run_id = e2e.start_run(d)
    wait_until(lambda: rp.created_count == 1, 60, "the pod to be created", on_timeout=e2e.tail)
    store = e2e.store()
    assert store.get_run(run_id).pod_id is None  # created, but the DB does not know it yet
    store.close()
    d.kill()

    d2 = e2e.daemon().start()
    last = e2e.wait_run_end(d2, run_id)
    assert e2e.assert_succeeded(last) == HAPPY
    assert rp.created_count == 1 and len(rp.pods) == 1
    (pod_id,) = rp.pods
    assert last["pod_id"] == pod_id
    assert rp.live_pods() == {}  # terminated once the adapter was verified
    assert [r.path for r in rp.requests_for("DELETE /pods/{id}")] == [f"/pods/{pod_id}"]
    assert "reaper: terminated" not in e2e.log_text()
    store = e2e.store()
    ledger = [(p.pod_id, p.run_id, p.terminated_at is not None) for p in store.pods()]
    store.close()
    assert ledger == [(pod_id, run_id, True)]
    assert_key_nowhere(e2e, cli(e2e, "logs", run_id), cli(e2e, "runs", "--json"))
    assert d2.stop() == 0


def test_429_and_5xx_while_provisioning_are_retried_and_adopt_the_one_pod(e2e: E2E) -> None:
    rp = e2e.use_runpod()
    rp.fail_next("POST /pods", 429, retry_after=1)
    rp.fail_next("POST /pods", 503, commit=True)  # the pod *was* created; the answer got lost
    rp.fail_next("GET /pods/{id}", 502)  # and one hiccup while connecting
    e2e.configure("runpod")
    e2e.write_memories(6)
    d = e2e.daemon().start()
    run_id = e2e.start_run(d)
    last = e2e.wait_run_end(d, run_id)

    assert e2e.assert_succeeded(last) == HAPPY
    posts = rp.requests_for("POST /pods")
    assert len(posts) == 2, [r.json for r in posts]  # the third attempt found the pod by name
    assert posts[1].at - posts[0].at >= 0.95  # Retry-After: 1 honoured
    assert rp.created_count == 1 and rp.live_pods() == {}
    assert last["pod_id"] == next(iter(rp.pods))
    assert_key_nowhere(e2e)


def test_no_capacity_on_the_first_gpu_type_falls_through_to_the_next(e2e: E2E) -> None:
    rp = e2e.use_runpod(no_capacity=[FIRST_GPU])
    e2e.configure("runpod")
    e2e.write_memories(6)
    d = e2e.daemon().start()
    run_id = e2e.start_run(d)
    last = e2e.wait_run_end(d, run_id)

    assert e2e.assert_succeeded(last) == HAPPY
    assert [r.json["gpu"]["id"] for r in rp.requests_for("POST /pods")] == [FIRST_GPU, SECOND_GPU]
    assert rp.created_count == 1 and last["gpu_type"] == SECOND_GPU
    assert rp.live_pods() == {}


def test_pod_restarted_on_another_port_during_training_is_found_there(e2e: E2E) -> None:
    rp = e2e.use_runpod()
    e2e.configure("runpod")
    e2e.write_memories(6)
    d = e2e.daemon().start()
    run_id = e2e.start_run(d)
    moved = e2e.new_proxy()
    with e2e.hold_trainer(run_id, at_step=1):
        (pod_id,) = rp.pods
        # The pod came back with a new public port; the old one is closed.
        rp.set_ssh_endpoint("127.0.0.1", moved.port, pod_id)
        e2e.proxy.pause(cut=True)
        wait_until(lambda: e2e.log_count("Connecting → Training") >= 1, 60, "reattached", on_timeout=e2e.tail)
        assert moved.connections >= 1  # a fresh mapping, never the cached endpoint
    last = e2e.wait_run_end(d, run_id)

    path = e2e.assert_succeeded(last)
    assert path == [*HAPPY[:5], "Connecting", "Training", *HAPPY[5:]], path
    assert f"connected to {e2e.sshd.user}@127.0.0.1:{moved.port}" in e2e.log_text()
    assert rp.created_count == 1 and rp.live_pods() == {}


def test_402_insufficient_balance_aborts_cleanly_without_a_pod(e2e: E2E) -> None:
    rp = e2e.use_runpod()
    # A careless proxy echoing the request: the key must be scrubbed from the error all the same.
    rp.fail_next("POST /pods", 402, detail=f"Insufficient balance ($0.12) for request with Bearer {API_KEY}")
    e2e.configure("runpod")
    e2e.write_memories(6)
    d = e2e.daemon().start()
    run_id = e2e.start_run(d)
    last = e2e.wait_run_end(d, run_id, timeout=60)

    assert last["outcome"] == "failed", last
    assert "balance" in last["error"].lower(), last["error"]
    assert e2e.journal(run_id) == ["Idle", "Provisioning", "Aborting", "Idle"]
    assert len(rp.requests_for("POST /pods")) == 1  # a decision, not something to retry
    assert rp.created_count == 0 and rp.live_pods() == {}
    assert rp.requests_for("DELETE /pods/{id}") == []
    assert e2e.launches(run_id) == 0
    assert d.status()["pending_memories"] == 6
    assert_key_nowhere(e2e, last["error"], cli(e2e, "logs", run_id))


def test_reaper_terminates_unowned_mhd_pods_and_leaves_others_alone(e2e: E2E) -> None:
    rp = e2e.use_runpod()
    orphan = rp.seed_pod("mhd-orphan", cost_per_hr=0.79)
    stopped = rp.seed_pod("mhd-20260101-000000-dead", status="EXITED")  # still bills for its disk
    notebook = rp.seed_pod("my-notebook")
    gone = rp.seed_pod("mhd-20250101-000000-gone", status="TERMINATED")
    e2e.configure("runpod")
    d = e2e.daemon().start()

    wait_until(lambda: orphan not in rp.live_pods() and stopped not in rp.live_pods(), 30,
               "the reaper's first round", on_timeout=e2e.tail)
    assert set(rp.live_pods()) == {notebook}
    deleted = sorted(r.path for r in rp.requests_for("DELETE /pods/{id}"))
    assert deleted == sorted([f"/pods/{orphan}", f"/pods/{stopped}"]), (deleted, gone)
    assert "reaper: terminated unowned pod " + orphan in e2e.log_text()
    store = e2e.store()
    reaped = {e.detail for e in store.events(kind="reaped")}
    store.close()
    assert reaped == {f"mhd-orphan ({orphan})", f"mhd-20260101-000000-dead ({stopped})"}
    assert d.status()["state"] == "Idle"
    assert_key_nowhere(e2e)
    assert d.stop() == 0


def test_budget_exceeded_aborts_and_terminates_the_pod(e2e: E2E) -> None:
    # $10 a second against a $1 budget: spent before the pod's sshd is even mapped.
    rp = e2e.use_runpod(cost_per_hr=36_000.0, ssh_delay_s=1.0)
    e2e.configure("runpod", budget={"max_usd_per_run": 1.0})
    e2e.write_memories(6)
    d = e2e.daemon().start()
    run_id = e2e.start_run(d)
    last = e2e.wait_run_end(d, run_id, timeout=60)

    assert last["outcome"] == "budget_exceeded", last
    assert "budget.max_usd_per_run" in last["error"], last["error"]
    path = e2e.journal(run_id)
    assert path[:3] == ["Idle", "Provisioning", "Connecting"] and path[-2:] == ["Aborting", "Idle"], path
    assert rp.created_count == 1 and rp.live_pods() == {}
    (pod_id,) = rp.pods
    assert [r.path for r in rp.requests_for("DELETE /pods/{id}")] == [f"/pods/{pod_id}"]
    assert e2e.launches(run_id) == 0
    e2e.wait_no_jobs()
    assert_key_nowhere(e2e)
