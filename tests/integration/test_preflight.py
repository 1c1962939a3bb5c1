"""Preflight and merge retries: nothing a run needs is found missing after the GPU is paid for.

Real daemon processes, real SQLite, the RunPod and Ollama stand-ins. The "venv without gguf" is a
real virtual environment whose site-packages holds every package of the test venv but gguf.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from mhd.store import Store
from tests.support.daemon import write_memories
from tests.support.ollama_standin import OllamaStandIn
from tests.support.runpod_standin import RunpodStandin

pytestmark = pytest.mark.slow
API_KEY = "rpa_preflight_test_key"


def venv_without(tmp: Path, *hidden: str) -> str:
    """A venv that has the test venv's packages except the ``hidden`` distributions."""
    v = tmp / f"venv-without-{'-'.join(hidden)}"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(v)], check=True)
    src = Path(sysconfig.get_paths()["purelib"])
    dst = v / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"
    for entry in src.iterdir():
        if any(entry.name == h or entry.name.startswith(f"{h}-") for h in hidden):
            continue
        (dst / entry.name).symlink_to(entry)
    python = v / "bin" / "python"
    probe = subprocess.run([str(python), "-c", "import httpx, numpy; import gguf"], capture_output=True, text=True)
    assert "No module named 'gguf'" in probe.stderr, probe.stderr  # the venv really lacks it, and only it
    return str(python)


def journal(denv, run_id: str) -> list[str]:
    store = Store(f"sqlite:///{denv.state / 'mhd.db'}")
    j = store.journal(run_id)
    return [j[0].from_state.value] + [t.to_state.value for t in j]


def last_run(d) -> dict:
    return d.wait_for(lambda: (s := d.status())["state"] == "Idle" and s["last_run"]
                      and s["last_run"]["outcome"] and s["last_run"], 60, "the run's end")


def test_a_venv_without_gguf_fails_doctor_and_preflight_and_rents_no_pod(denv, tmp_path):
    python = venv_without(tmp_path, "gguf")
    key = tmp_path / "id_ed25519"
    key.write_text("a key the pod would get\n")
    key.chmod(0o600)
    Path(f"{key}.pub").write_text("ssh-ed25519 AAAA test\n")
    keyfile = tmp_path / "runpod.key"
    keyfile.write_text(API_KEY + "\n")
    keyfile.chmod(0o600)
    with RunpodStandin(api_key=API_KEY) as rp, OllamaStandIn(version="0.33.0") as ol:
        ol.add_model("qwen3:8b")
        denv.configure(provider="runpod",
                       runpod={"api_url": rp.url, "api_key_file": str(keyfile), "ssh_key_file": str(key)},
                       merge={"mode": "ollama", "ollama_url": ol.url, "base": "qwen3:8b"})
        doctor = subprocess.run([python, "-m", "mhd.cli", "--config", str(denv.config), "doctor"],
                                capture_output=True, text=True, timeout=120)
        assert doctor.returncode == 1, doctor.stdout + doctor.stderr
        line = next(ln for ln in doctor.stdout.splitlines() if ln.startswith("✗ merge tools"))
        assert "gguf" in line and "pip install" in line, line

        d = denv.daemon(python=python).start()
        write_memories(denv.memories, 6)
        last = last_run(d)
        assert last["outcome"] == "preflight_failed"
        assert "gguf" in last["error"] and "pip install" in last["error"] and "no pod was rented" in last["error"]
        assert rp.created_count == 0
        assert not rp.requests_for("POST /pods")
        assert journal(denv, last["id"]) == ["Idle", "Provisioning", "Aborting", "Idle"]
        runs = subprocess.run([python, "-m", "mhd.cli", "--config", str(denv.config), "runs", "--json"],
                              capture_output=True, text=True, timeout=60)
        row = json.loads(runs.stdout)[0]
        assert row["outcome"] == "preflight_failed" and "gguf" in row["error"]
        table = subprocess.run([python, "-m", "mhd.cli", "--config", str(denv.config), "runs"],
                               capture_output=True, text=True, timeout=60, env={**os.environ, "COLUMNS": "400"})
        assert "preflight_failed" in table.stdout and "gguf" in table.stdout
        d.stop()


def test_an_ollama_without_the_base_fails_preflight_naming_the_pull(denv):
    with OllamaStandIn(version="0.33.0") as ol:
        denv.configure(merge={"mode": "ollama", "ollama_url": ol.url, "base": "qwen3:30b"})
        d = denv.daemon().start()
        write_memories(denv.memories, 6)
        last = last_run(d)
        assert last["outcome"] == "preflight_failed"
        assert "ollama pull qwen3:30b" in last["error"]
        assert denv.pod_creations() == 0
        d.stop()


def merged_route_config(denv, ol: OllamaStandIn, **retry: float) -> None:
    # Ollama >= 0.34.1 takes merged models: the (fake) pod ships model.gguf and the daemon
    # registers it. failed_run_cooldown_s = 0: only the merge rule may hold the threshold back.
    denv.configure(merge={"mode": "ollama", "ollama_url": ol.url},
                   retry={"merge_base_s": 0.5, "merge_max_s": 1.0, "failed_run_cooldown_s": 0, **retry})


def test_a_failed_merge_is_retried_and_succeeds_without_a_second_pod(denv):
    with OllamaStandIn(version="0.35.0") as ol:
        ol.fail_next("POST /api/create", 500)
        merged_route_config(denv, ol)
        d = denv.daemon().start()
        write_memories(denv.memories, 6)
        run_id = d.wait_for(lambda: d.status()["run_id"], 30, "a run")
        d.wait_for(lambda: (s := d.status())["last_run"] and s["last_run"]["outcome"] == "succeeded", 60,
                   "the merge retry to succeed")
        assert denv.pod_creations() == 1
        assert denv.launches(run_id) == 1
        path = journal(denv, run_id)
        assert path[-2:] == ["Merging", "Idle"]
        store = Store(f"sqlite:///{denv.state / 'mhd.db'}")
        run = store.get_run(run_id)
        assert run is not None and run.merge_attempts == 2 and run.merge_retry_at is None
        assert "merge failed" in store.journal(run_id)[-1].reason
        assert [e.detail for e in store.events(run_id, "merge") if "attempt 2 succeeded" in e.detail]
        assert len([b for b in ol.create_bodies() if b.get("files")]) == 2  # refused once, then created
        assert d.status()["pending_memories"] == 0 and d.status()["merge_waiting"] is None
        d.stop()


def test_while_the_merge_keeps_failing_the_threshold_rents_no_pod_then_newer_memories_do(denv):
    with OllamaStandIn(version="0.35.0") as ol:
        ol.fail_next("POST /api/create", 500, times=10_000)
        merged_route_config(denv, ol)
        d = denv.daemon().start()
        write_memories(denv.memories, 6)
        first = d.wait_for(lambda: (s := d.status())["last_run"] and s["last_run"]["outcome"] == "merge_failed"
                           and s["last_run"], 60, "merge_failed")
        assert d.status()["merge_waiting"]["run_id"] == first["id"]
        write_memories(denv.memories, 6, prefix="newer")  # the threshold (5) is met again
        store = Store(f"sqlite:///{denv.state / 'mhd.db'}")
        d.wait_for(lambda: len(store.events(first["id"], "merge_retry")) >= 3, 30, "three more merge attempts")
        assert denv.pod_creations() == 1
        assert d.status()["state"] == "Idle"
        assert "not starting a threshold run" in denv.tmp.joinpath("daemon.log").read_text()

        ol.clear_faults()  # the cause is fixed: the waiting merge goes through, then the newer memories train
        d.wait_for(lambda: store.get_run(first["id"]).outcome.value == "succeeded", 30, "the first run merged")
        second = d.wait_for(lambda: (r := store.last_run()) and r.id != first["id"] and r, 30, "a second run")
        d.wait_for(lambda: store.get_run(second.id).outcome is not None, 60, "the second run's end")
        assert store.get_run(second.id).outcome.value == "succeeded"
        assert denv.pod_creations() == 2
        # The second run was started by the newer memories alone: the first run's were trained.
        manifest = json.loads((denv.state / "runs" / second.id / "input" / "dataset_manifest.json").read_text())
        assert manifest["samples"] >= 6
        d.stop()


@pytest.mark.parametrize("how", ["mhd merge", "SIGHUP"])
def test_mhd_merge_and_a_config_reload_retry_at_once(denv, how):
    with OllamaStandIn(version="0.35.0") as ol:
        ol.fail_next("POST /api/create", 500)
        merged_route_config(denv, ol, merge_base_s=3600, merge_max_s=3600)  # no retry by the clock here
        d = denv.daemon().start()
        write_memories(denv.memories, 6)
        last = d.wait_for(lambda: (s := d.status())["last_run"] and s["last_run"]["outcome"] == "merge_failed"
                          and s["last_run"], 60, "merge_failed")
        if how == "mhd merge":
            out = subprocess.run([sys.executable, "-m", "mhd.cli", "--config", str(denv.config), "merge", last["id"]],
                                 capture_output=True, text=True, timeout=120)
            assert out.returncode == 0, out.stdout + out.stderr
            assert f"run {last['id']}: model" in out.stdout
        else:
            assert d.proc is not None
            d.proc.send_signal(signal.SIGHUP)
        d.wait_for(lambda: d.status()["last_run"]["outcome"] == "succeeded", 20, "the merge to go through")
        assert denv.pod_creations() == 1
        again = subprocess.run([sys.executable, "-m", "mhd.cli", "--config", str(denv.config), "merge", last["id"]],
                               capture_output=True, text=True, timeout=60)
        assert again.returncode == 0 and "already merged" in again.stdout
        d.stop()
