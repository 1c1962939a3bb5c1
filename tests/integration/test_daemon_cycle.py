"""The whole loop with the real daemon process, the local provider and the protocol-true fake trainer."""

from __future__ import annotations

import json
import os
import re
import socket
import stat
import subprocess
import sys

import pytest

from mhd.store import Store
from tests.support.daemon import no_jobs_left, write_memories

HAPPY = ["Idle", "Provisioning", "Connecting", "Uploading", "Training", "Fetching", "Merging", "Idle"]

pytestmark = pytest.mark.slow


def journal_path(store: Store, run_id: str) -> list[str]:
    j = store.journal(run_id)
    return [j[0].from_state.value] + [t.to_state.value for t in j]


def test_full_cycle_walks_the_seven_states_and_back(denv):
    write_memories(denv.memories, 6)
    d = denv.daemon().start()
    resp = d.ask("train")
    assert resp["ok"], resp
    run_id = resp["run_id"]
    d.wait_for(lambda: d.status()["state"] == "Idle" and d.status()["last_run"]["outcome"], 60, "run end")
    st = d.status()
    assert st["last_run"]["id"] == run_id
    assert st["last_run"]["outcome"] == "succeeded"
    assert st["pending_memories"] == 0  # the run's memories are now trained
    store = Store(f"sqlite:///{denv.state / 'mhd.db'}")
    assert journal_path(store, run_id) == HAPPY
    assert denv.pod_creations() == 1
    assert denv.launches(run_id) == 1
    run = store.get_run(run_id)
    assert run.step == 10 and run.total_steps == 10
    manifest = json.loads((denv.state / "runs" / run_id / "output" / "manifest.json").read_text())
    from mhd.hashing import sha256_file as sha256_path

    for f in manifest["files"]:
        assert sha256_path(denv.state / "runs" / run_id / "output" / f["path"]) == f["sha256"]
    no_jobs_left(denv)
    assert d.stop() == 0


def test_sigusr1_logs_what_each_task_waits_on_and_the_run_goes_on(denv):
    denv.configure(training={"extra": {"fake_steps": 30, "fake_step_s": 0.2}})
    write_memories(denv.memories, 6)
    d = denv.daemon().start()
    run_id = d.ask("train")["run_id"]
    d.wait_state("Training", 30)
    dump = d.dump()
    assert "SIGUSR1 dump" in dump and "asyncio task(s):" in dump, dump
    # The run's task, down to the state action it is in, and the thread that runs the loop.
    assert "mhd/states/training.py" in dump, dump
    assert "waiting on <" in dump, dump
    assert "thread MainThread" in dump, dump
    # Short enough to survive a CI log that keeps only its tail: the event loop's own frames
    # (base_events.py) are dropped from the main thread (a task's innermost frame may still be
    # there), idle executor workers only counted (Provisioning ran work in the loop's executor,
    # whose workers now wait for more).
    assert "base_events.py" not in dump.split("thread MainThread", 1)[1], dump
    assert re.search(r"thread\(s\), [1-9]\d* of them idle executor workers", dump), dump
    d.wait_for(lambda: d.status()["state"] == "Idle" and d.status()["last_run"], 60, "run end")
    assert d.status()["last_run"]["id"] == run_id
    assert d.status()["last_run"]["outcome"] == "succeeded"
    assert d.stop() == 0


def test_status_during_training_shows_increasing_steps(denv):
    denv.configure(training={"extra": {"fake_steps": 30, "fake_step_s": 0.2}})
    write_memories(denv.memories, 6)
    d = denv.daemon().start()
    d.ask("train")
    d.wait_state("Training", 30)
    seen = []
    d.wait_for(lambda: (seen.append(d.status()["progress"]["step"]) or len({s for s in seen if s}) >= 3),
               30, "three distinct steps", interval=0.2)
    steps = [s for s in seen if s is not None]
    assert steps == sorted(steps) and steps[-1] > steps[0]
    out = subprocess.run([sys.executable, "-m", "mhd.cli", "--config", str(denv.config), "status", "--json"],
                         capture_output=True, text=True, check=True)
    st = json.loads(out.stdout)
    for key in ("state", "run_id", "pending_memories", "threshold", "progress"):
        assert key in st
    assert set(st["progress"]) >= {"step", "total_steps", "loss", "eta_s"}


def test_cancel_during_training_aborts_terminates_pod_and_records_cancelled(denv):
    denv.configure(training={"extra": {"fake_steps": 200, "fake_step_s": 0.2}})
    write_memories(denv.memories, 6)
    d = denv.daemon().start()
    run_id = d.ask("train")["run_id"]
    d.wait_for(lambda: (d.status()["progress"]["step"] or 0) >= 2, 30, "training progress")
    out = subprocess.run([sys.executable, "-m", "mhd.cli", "--config", str(denv.config), "cancel"],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    d.wait_for(lambda: d.status()["state"] == "Idle", 30, "Idle after cancel")
    store = Store(f"sqlite:///{denv.state / 'mhd.db'}")
    run = store.get_run(run_id)
    assert run.outcome.value == "cancelled"
    assert journal_path(store, run_id)[-2:] == ["Aborting", "Idle"]
    pod = json.loads((denv.pods / "pods" / f"mhd-{run_id}.json").read_text())
    assert pod["status"] == "TERMINATED"
    no_jobs_left(denv)  # the trainer was stopped with the pod
    assert st_pending(d) == 6  # nothing was marked trained


def st_pending(d) -> int:
    return int(d.status()["pending_memories"])


def test_socket_is_private_and_status_without_daemon_exits_3(denv):
    d = denv.daemon().start()
    mode = stat.S_IMODE(os.stat(d.socket).st_mode)
    assert mode == 0o600
    d.stop()
    out = subprocess.run([sys.executable, "-m", "mhd.cli", "--config", str(denv.config), "status"],
                         capture_output=True, text=True)
    assert out.returncode == 3
    assert "not running" in out.stderr and len(out.stderr.strip().splitlines()) == 1
    runs = subprocess.run([sys.executable, "-m", "mhd.cli", "--config", str(denv.config), "runs", "--json"],
                          capture_output=True, text=True)
    assert runs.returncode == 0 and json.loads(runs.stdout) == []


@pytest.mark.parametrize("ollama", ["none", "down"])
def test_no_usable_memories_ends_no_data_without_renting_a_pod(denv, ollama):
    if ollama == "down":  # nothing to train on decides first: no retrying against a dead Ollama
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        denv.configure(merge={"mode": "ollama", "ollama_url": f"http://127.0.0.1:{port}", "route": "auto"})
    (denv.memories / "2026").mkdir()
    (denv.memories / "2026" / "broken.json").write_text('{"content": ')
    os.utime(denv.memories / "2026" / "broken.json", (1_600_000_000, 1_600_000_000))
    d = denv.daemon().start()
    run_id = d.ask("train")["run_id"]
    d.wait_for(lambda: d.status()["state"] == "Idle" and d.status()["last_run"], 30, "run end")
    assert d.status()["last_run"]["outcome"] == "no_data"
    assert denv.pod_creations() == 0
    store = Store(f"sqlite:///{denv.state / 'mhd.db'}")
    assert journal_path(store, run_id) == ["Idle", "Provisioning", "Aborting", "Idle"]


def test_trainer_failure_aborts_with_the_reason(denv):
    denv.configure(training={"extra": {"fake_steps": 3, "fake_step_s": 0.05, "fake_exit": 2}})
    write_memories(denv.memories, 6)
    d = denv.daemon().start()
    run_id = d.ask("train")["run_id"]
    d.wait_for(lambda: d.status()["state"] == "Idle" and d.status()["last_run"], 30, "run end")
    last = d.status()["last_run"]
    assert last["id"] == run_id and last["outcome"] == "failed"
    assert "exited with 2" in last["error"]
    pod = json.loads((denv.pods / "pods" / f"mhd-{run_id}.json").read_text())
    assert pod["status"] == "TERMINATED"


def test_manifest_entry_symlinked_out_of_the_run_dir_is_refused(denv, tmp_path):
    secret = tmp_path / "outside-secret.txt"
    secret.write_text("not for the daemon to fetch")
    denv.configure(training={"extra": {"fake_steps": 2, "fake_step_s": 0.05, "fake_symlink_escape": str(secret)}})
    write_memories(denv.memories, 6)
    d = denv.daemon().start()
    run_id = d.ask("train")["run_id"]
    d.wait_for(lambda: d.status()["state"] == "Idle" and d.status()["last_run"], 60, "run end")
    last = d.status()["last_run"]
    assert last["id"] == run_id and last["outcome"] == "failed"
    assert "resolves outside the run dir" in last["error"]
    assert not (denv.state / "runs" / run_id / "output" / "adapter" / "escape").exists()
