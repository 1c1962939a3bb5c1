"""Interruptible (spot) pods against the RunPod stand-in: a preempted pod is replaced by a new one
and the run resumes from its newest checkpoint; a dropped link with the pod still running is not
a preemption. The real daemon, sshd, SQLite; the fake trainer (the protocol, in seconds).

``RunpodStandin.preempt`` lists the pod EXITED, as RunPod does, and the harness stops its "sshd"
(every connection through the proxy drops) and kills its processes. Without a network volume
every pod has its own run folder, so a new pod starts with nothing but what the daemon uploads.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mhd.store import Run
from tests.support.daemon import FAKE_TRAINER
from tests.support.e2e import E2E, count_transitions, wait_until
from tests.support.sshd import SSHD

pytestmark = pytest.mark.slow

TOTAL, SAVE = 16, 4
_START = re.compile(r"training (\d+) steps \((starting|resuming at step (\d+))\)")
_FROM = re.compile(r"from checkpoint step (\d+)")


@pytest.fixture
def spot(tmp_path: Path) -> Iterator[E2E]:
    if not SSHD.exists():
        pytest.skip("OpenSSH sshd is not installed (apt-get install -y openssh-server)")
    world = E2E(tmp_path, tmp_path / "no-model")  # the fake trainer loads no model
    try:
        yield world
    finally:
        world.cleanup()


def configure(e2e: E2E, step_s: float, **runpod: Any) -> None:
    e2e.configure("runpod", runpod={"interruptible": True, **runpod}, merge={"mode": "none"}, training={
        "script": str(FAKE_TRAINER), "save_steps": SAVE,
        "extra": {"fake_steps": TOTAL, "fake_step_s": step_s, "fake_checkpoint_every": SAVE}})


def run_row(e2e: E2E, run_id: str) -> Run:
    store = e2e.store()
    try:
        run = store.get_run(run_id)
        assert run is not None
        return run
    finally:
        store.close()


def live_pod(e2e: E2E) -> str:
    """The one pod that is up now (the others were preempted or deleted)."""
    assert e2e.runpod is not None
    rp = e2e.runpod

    def one() -> str | None:
        up = [pid for pid, p in rp.live_pods().items() if p["status"] == "RUNNING" and pid not in rp.preempted]
        return up[0] if len(up) == 1 else None

    return str(wait_until(one, 60, "a running pod", on_timeout=e2e.tail))


def pod_folder(e2e: E2E, name: str) -> Path:
    return e2e.remote_root / "runs" / name


def trained_steps(e2e: E2E, name: str) -> int:
    f = pod_folder(e2e, name) / "progress.jsonl"
    lines = f.read_text().splitlines() if f.exists() else []
    return sum(1 for ln in lines if json.loads(ln).get("phase") == "train")


def resumed_at(e2e: E2E, name: str) -> list[int]:
    f = pod_folder(e2e, name) / "train.log"
    return [int(m[3] or 0) for m in _START.finditer(f.read_text() if f.exists() else "")]


def e2e_journal(e2e: E2E, run_id: str) -> list[str]:
    store = e2e.store()
    try:
        return [t.reason for t in store.journal(run_id)]
    finally:
        store.close()


def test_preempted_in_uploading_training_twice_and_fetching_resumes_each_time_on_a_new_pod(spot: E2E) -> None:
    e2e = spot
    rp = e2e.use_runpod()
    configure(e2e, 0.25, max_preemptions=10)
    e2e.write_memories(6)
    pauses = "Uploading.partial=0.2,Fetching.partial=1.5"
    d = e2e.daemon(pause=pauses).start()
    run_id = e2e.start_run(d)

    # 1. Uploading: between two files of the first pod's inputs.
    wait_until(lambda: e2e.log_count("debug pause at Uploading.partial") >= 1, 60, "the first upload",
               on_timeout=e2e.tail)
    rp.preempt(live_pod(e2e))

    # 2. Training, once this pod's trainer made a checkpoint that is kept here; the daemon is
    # SIGKILLed right after.
    def checkpointed(attempt: int) -> bool:
        starts = resumed_at(e2e, f"mhd-{run_id}-a{attempt}")
        r = run_row(e2e, run_id)
        return bool(starts) and (r.checkpoint_step or 0) > starts[0] and r.state.value == "Training"

    wait_until(lambda: checkpointed(2), 60, "pod 2 to checkpoint", interval=0.05, on_timeout=e2e.tail)
    rp.preempt(live_pod(e2e))
    d.kill()
    d = e2e.daemon(pause=pauses).start()

    # 3. Training again, on the pod that resumed from that checkpoint.
    wait_until(lambda: checkpointed(3), 60, "pod 3 to checkpoint", interval=0.05, on_timeout=e2e.tail)
    rp.preempt(live_pod(e2e))

    # 4. Fetching: after the first artifact.
    wait_until(lambda: run_row(e2e, run_id).preemptions == 3 and e2e.log_count("debug pause at Fetching.partial") >= 1,
               90, "the fetch from pod 4", interval=0.05, on_timeout=e2e.tail)
    rp.preempt(live_pod(e2e))
    last = e2e.wait_run_end(d, run_id)

    assert last["outcome"] == "succeeded", f"{last}\n{e2e.tail()}"
    manifest = e2e.verify_output(run_id, f"mhd-{run_id}-a5")
    assert last["adapter_sha256"] == next(f["sha256"] for f in manifest["files"]
                                          if f["path"].endswith("adapter_model.safetensors"))
    names = [r.json["name"] for r in rp.requests_for("POST /pods")]
    assert names == [f"mhd-{run_id}"] + [f"mhd-{run_id}-a{i}" for i in range(2, 6)]
    assert all(r.json["interruptible"] is True for r in rp.requests_for("POST /pods"))
    assert rp.created_count == 5 and len(rp.preempted) == 4
    assert rp.live_pods() == {}, rp.live_pods()  # every pod deleted, the preempted (EXITED) ones too
    e2e.wait_no_jobs()

    # Steps before a kept checkpoint are never trained again.
    steps = [trained_steps(e2e, n) for n in names]
    assert steps[0] == 0 and TOTAL <= sum(steps) <= TOTAL + SAVE * 4, steps

    # Each new pod resumed from the checkpoint the daemon had pulled from the one before.
    store = e2e.store()
    journal = store.journal(run_id)
    preempted = [t for t in journal if t.reason.startswith("preempted:")]
    # The second one is seen by the restarted daemon, which reconnects first (Connecting) or
    # finds the link gone (Training), whichever comes first after the SIGKILL.
    seen_in = [t.from_state.value for t in preempted]
    assert seen_in[0] == "Uploading" and seen_in[1] in ("Training", "Connecting"), seen_in
    assert seen_in[2:] == ["Training", "Fetching"], seen_in
    assert {t.to_state.value for t in preempted} == {"Provisioning"}
    kept = [int(m[1]) if (m := _FROM.search(t.reason)) else 0 for t in preempted]
    assert kept[0] == 0 and kept[1] >= SAVE and kept[2] >= 2 * SAVE and kept[3] == TOTAL, kept
    assert [resumed_at(e2e, n) for n in names[1:]] == [[k] for k in kept], [t.reason for t in preempted]
    assert len(store.events(run_id, kind="preempted")) == 4

    # The run's time and cost are the sum over its five pods, each at the spot price.
    run = store.get_run(run_id)
    pods = store.run_pods(run_id)
    store.close()
    assert run is not None and run.preemptions == 4 and not run.on_demand
    assert [p.preempted for p in pods] == [True] * 4 + [False]
    assert all(p.interruptible and p.cost_per_hr == rp.spot_cost_per_hr for p in pods)
    spans = [p.terminated_at - p.created_at for p in pods if p.terminated_at is not None]
    assert len(spans) == 5
    assert run.billed_s() == pytest.approx(sum(spans), rel=1e-9)
    assert run.cost_usd() == pytest.approx(sum(s * rp.spot_cost_per_hr / 3600 for s in spans), rel=1e-9)
    assert run.billed_s() > run.pod_billed_s() > 0

    out = subprocess.run([sys.executable, "-m", "mhd.cli", "--config", str(e2e.config), "runs", "--json"],
                         capture_output=True, text=True, timeout=60)
    shown = next(r for r in json.loads(out.stdout) if r["id"] == run_id)
    assert shown["preemptions"] == 4 and len(shown["pods"]) == 5
    assert sum(p["cost_usd"] for p in shown["pods"]) == pytest.approx(shown["cost_usd"], abs=1e-3)
    assert d.stop() == 0


def test_cut_link_is_not_a_preemption_and_the_fallback_to_on_demand_survives_a_restart(spot: E2E) -> None:
    e2e = spot
    rp = e2e.use_runpod()
    configure(e2e, 0.3, max_preemptions=1, on_preemption="resume_on_demand")
    e2e.write_memories(6)
    d = e2e.daemon(pause="Provisioning=1.5").start()
    run_id = e2e.start_run(d)
    first = live_pod(e2e)

    # The link drops while the pod runs: an ordinary reconnect to the same pod, training goes on.
    wait_until(lambda: e2e.step(run_id) >= 2, 60, "training under way", on_timeout=e2e.tail)
    e2e.proxy.cut()
    wait_until(lambda: e2e.log_count("Connecting → Training") >= 1, 60, "the reconnect", on_timeout=e2e.tail)
    assert rp.created_count == 1 and rp.preempted == []
    wait_until(lambda: (run_row(e2e, run_id).checkpoint_step or 0) >= SAVE, 60, "a checkpoint pulled",
               on_timeout=e2e.tail)
    assert e2e.step(run_id) < TOTAL, "the trainer finished before the preemption below"

    # The first preemption reaches max_preemptions = 1: the next pod is on-demand. The daemon
    # dies before renting it; its successor must still know.
    rp.preempt(first)
    wait_until(lambda: e2e.log_count("debug pause at Provisioning") >= 2, 60, "the preemption", on_timeout=e2e.tail)
    assert run_row(e2e, run_id).on_demand
    d.kill()
    d = e2e.daemon().start()
    last = e2e.wait_run_end(d, run_id)

    assert last["outcome"] == "succeeded", f"{last}\n{e2e.tail()}"
    posts = rp.requests_for("POST /pods")
    assert [(r.json["name"], r.json.get("interruptible")) for r in posts] == [
        (f"mhd-{run_id}", True), (f"mhd-{run_id}-a2", None)]
    path = e2e.journal(run_id)
    assert count_transitions(path, "Training", "Connecting") == 1, path  # the cut, before the preemption
    assert count_transitions(path, "Training", "Provisioning") == 1, path
    store = e2e.store()
    pods = store.run_pods(run_id)
    run = store.get_run(run_id)
    store.close()
    assert run is not None and run.preemptions == 1 and run.on_demand
    assert [(p.interruptible, p.preempted, p.cost_per_hr) for p in pods] == [
        (True, True, rp.spot_cost_per_hr), (False, False, rp.cost_per_hr)]
    (reason,) = [t for t in e2e_journal(e2e, run_id) if t.startswith("preempted:")]
    m = _FROM.search(reason)
    assert m is not None, reason  # training was under way: a checkpoint had been pulled
    assert resumed_at(e2e, f"mhd-{run_id}-a2") == [int(m[1])]
    assert rp.live_pods() == {}
    e2e.wait_no_jobs()
    assert d.stop() == 0


def test_on_preemption_fail_ends_the_run_at_max_preemptions_and_deletes_the_pod(spot: E2E) -> None:
    e2e = spot
    rp = e2e.use_runpod()
    configure(e2e, 0.3, max_preemptions=1, on_preemption="fail")
    e2e.write_memories(6)
    d = e2e.daemon().start()
    run_id = e2e.start_run(d)
    wait_until(lambda: e2e.step(run_id) >= 2, 60, "training under way", on_timeout=e2e.tail)
    rp.preempt(live_pod(e2e))
    last = e2e.wait_run_end(d, run_id, timeout=60)

    assert last["outcome"] == "failed", last
    assert last["error"].startswith("preempted:") and 'on_preemption = "fail"' in last["error"], last["error"]
    path = e2e.journal(run_id)
    assert path[-3:] == ["Training", "Aborting", "Idle"] and path.count("Provisioning") == 1, path
    assert rp.created_count == 1 and rp.live_pods() == {}
    store = e2e.store()
    run = store.get_run(run_id)
    (pod,) = store.run_pods(run_id)
    store.close()
    assert run is not None and run.preemptions == 1 and pod.preempted and pod.terminated_at is not None
    assert run.billed_s() == pytest.approx(pod.terminated_at - pod.created_at, rel=1e-9)
    e2e.wait_no_jobs()
    assert d.stop() == 0


def test_no_interruptible_capacity_rents_on_demand_and_the_run_stays_there(spot: E2E) -> None:
    e2e = spot
    rp = e2e.use_runpod()
    rp.no_interruptible_capacity = True
    configure(e2e, 0.05)
    e2e.write_memories(6)
    d = e2e.daemon().start()
    run_id = e2e.start_run(d)
    last = e2e.wait_run_end(d, run_id, timeout=60)

    assert last["outcome"] == "succeeded", f"{last}\n{e2e.tail()}"
    posts = [(r.json["gpu"]["id"], r.json.get("interruptible")) for r in rp.requests_for("POST /pods")]
    assert posts == [("NVIDIA RTX A6000", True), ("NVIDIA A40", True), ("NVIDIA RTX A6000", None)], posts
    store = e2e.store()
    run = store.get_run(run_id)
    (pod,) = store.run_pods(run_id)
    events = [e.detail for e in store.events(run_id, kind="preempted")]
    store.close()
    assert run is not None and run.on_demand and run.preemptions == 0 and not run.pod_interruptible
    assert not pod.interruptible and pod.cost_per_hr == rp.cost_per_hr
    assert len(events) == 1 and events[0].startswith("no interruptible capacity"), events
    assert rp.live_pods() == {}
    assert d.stop() == 0


def test_on_a_network_volume_the_new_pod_resumes_from_the_checkpoint_left_there(spot: E2E) -> None:
    # The "pods" share this machine's disk, which plays the volume: the run folder outlives pod 1.
    e2e = spot
    rp = e2e.use_runpod()
    configure(e2e, 0.25, network_volume_id="vol_test")
    e2e.write_memories(6)
    d = e2e.daemon().start()
    run_id = e2e.start_run(d)
    wait_until(lambda: (e2e.remote_dir(run_id) / "checkpoints" / f"checkpoint-{SAVE}" / "trainer_state.json").exists(),
               60, "a checkpoint on the volume", on_timeout=e2e.tail)
    rp.preempt(live_pod(e2e))
    last = e2e.wait_run_end(d, run_id, timeout=60)

    assert last["outcome"] == "succeeded", f"{last}\n{e2e.tail()}"
    posts = rp.requests_for("POST /pods")
    assert [r.json["name"] for r in posts] == [f"mhd-{run_id}", f"mhd-{run_id}-a2"]
    assert all(r.json["mounts"] == {"network": [{"volumeId": "vol_test", "path": "/workspace"}]} for r in posts)
    assert not (e2e.remote_root / "runs" / f"mhd-{run_id}-a2").exists()  # both worked in the volume's folder
    first, again = resumed_at(e2e, f"mhd-{run_id}")
    assert first == 0 and again >= SAVE, (first, again)
    assert TOTAL <= trained_steps(e2e, f"mhd-{run_id}") <= TOTAL + SAVE
    run = run_row(e2e, run_id)
    assert run.preemptions == 1 and run.checkpoint_step is None  # nothing pulled: the volume kept it
    e2e.verify_output(run_id)
    assert rp.live_pods() == {}
    e2e.wait_no_jobs()
    assert d.stop() == 0
