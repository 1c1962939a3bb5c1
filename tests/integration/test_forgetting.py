"""Lineage and forgetting: a memory its owner took back leaves every model and every file.

Real daemon processes, real SQLite, the local provider with the fake trainer (the merged route:
the "pod" ships model.gguf), the Ollama stand-in. The proof is a byte search of ``state_dir``
(DB, WAL, run folders, the local pods' folders) for the memory's text and for its file name's
slug, after the purge.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from mhd.store import Store
from tests.support.daemon import write_memories, write_memory
from tests.support.ollama_standin import OllamaStandIn, normalize

pytestmark = pytest.mark.slow

SECRET = "Zanzibar Quillfeather painted the old lighthouse violet at dawn"
SECRET2 = "Ottoline Brackwater buried the brass telescope under the quince tree"


def cli(denv: Any, *args: str, ok: bool = True) -> subprocess.CompletedProcess[str]:
    # --config after the subcommand, as people type it (issue 14, part 4); a wide "terminal".
    out = subprocess.run([sys.executable, "-m", "mhd.cli", *args, "--config", str(denv.config)],
                         capture_output=True, text=True, timeout=120, env={**os.environ, "COLUMNS": "250"})
    if ok:
        assert out.returncode == 0, out.stdout + out.stderr
    return out


def cli_json(denv: Any, *args: str) -> Any:
    return json.loads(cli(denv, *args, "--json").stdout)


def configure(denv: Any, ol: OllamaStandIn, **over: Any) -> None:
    denv.configure(threshold=1000, merge={"mode": "ollama", "ollama_url": ol.url, "keep": 5},
                   retry={"failed_run_cooldown_s": 0}, **over)


def files_containing(root: Path, *needles: str) -> list[str]:
    hits = []
    for path in sorted(root.rglob("*")):
        if path.is_file() and not path.is_symlink():
            data = path.read_bytes()
            hits += [f"{path} has {n!r}" for n in needles if n.encode() in data]
    return hits


def slug(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in text.lower())[:50].strip("-")


def train(d: Any) -> dict[str, Any]:
    resp = d.ask("train")
    assert resp["ok"], resp
    return end_of(d, resp["run_id"])


def end_of(d: Any, run_id: str, timeout: float = 60) -> dict[str, Any]:
    return dict(d.wait_for(lambda: (s := d.status())["state"] == "Idle" and s["last_run"]
                           and s["last_run"]["id"] == run_id and s["last_run"], timeout, f"run {run_id}'s end"))


def keys_in_files(run_dir: Path) -> set[str]:
    keys = set()
    for name in ("dataset.jsonl", "eval.jsonl"):
        f = run_dir / "input" / name
        if f.exists():
            keys |= {json.loads(line)["key"] for line in f.read_text().splitlines() if line.strip()}
    return keys


def forget_run_after(d: Any, store: Store, previous: str) -> dict[str, Any]:
    run = d.wait_for(lambda: (r := store.last_run()) and r.id != previous and r.trigger == "forget" and r,
                     30, "a forgetting run")
    return end_of(d, run.id)


def purged(d: Any) -> bool:
    return d.status()["forget"]["pending"] == 0


def test_a_deleted_memory_starts_a_run_without_it_then_leaves_every_model_and_file(denv):
    with OllamaStandIn(version="0.35.0") as ol:
        configure(denv, ol)
        write_memories(denv.memories, 6)
        secret = write_memory(denv.memories, SECRET, mtype="observation")
        also = write_memory(denv.memories, SECRET2)
        d = denv.daemon().start()
        first = train(d)
        assert first["outcome"] == "succeeded", first
        model1 = normalize(first["model_name"])
        assert model1 in ol.models

        # Lineage is exact: the keys of the run's dataset and eval files, read back from the files.
        lin = cli_json(denv, "lineage", first["id"])
        assert {m["key"] for m in lin["memories"]} == keys_in_files(denv.state / "runs" / first["id"])
        assert lin["train"] >= 6 and lin["model"] == first["model_name"]
        assert any(m["path"] == str(secret) for m in lin["memories"])
        by_model = cli_json(denv, "lineage", first["model_name"])
        assert by_model["run_id"] == first["id"]
        mem = cli_json(denv, "memory", str(secret))
        key = mem["key"]
        assert [m["name"] for m in mem["models"]] == [first["model_name"]]

        secret.unlink()
        also.unlink()  # two deletions inside the debounce: one run
        store = Store(f"sqlite:///{denv.state / 'mhd.db'}")
        second = forget_run_after(d, store, first["id"])
        assert second["outcome"] == "succeeded", second
        assert key not in keys_in_files(denv.state / "runs" / second["id"])
        d.wait_for(lambda: purged(d), 20, "the purge")

        assert model1 not in ol.models  # the old model is gone from Ollama
        assert normalize(ol.models["mhd:latest"]["copied_from"]) == normalize(second["model_name"])
        runs = {r["id"]: r for r in cli_json(denv, "runs")}
        assert runs[first["id"]]["purged_at"] is not None and runs[second["id"]]["purged_at"] is None
        assert not (denv.state / "runs" / first["id"] / "input").exists()
        assert (denv.state / "runs" / first["id"] / "run.log").exists()  # history stays
        assert store.journal(first["id"])  # and so do the run's row and journal
        assert [r.trigger for r in store.list_runs()] == ["forget", "manual"]
        d.stop()  # the WAL is folded back into the DB as well
        assert files_containing(denv.state, SECRET, slug(SECRET), SECRET2, slug(SECRET2)) == []
        after = cli_json(denv, "memory", "--key", key)
        assert after["models"] == [] and after["forgotten"]["reason"] == "deleted"
        assert after["forgotten"]["purged_at"] is not None
        assert {(r["run_id"], r["purged"]) for r in after["runs"]} == {(first["id"], True)}


def test_deleted_while_down_and_consent_withdrawn_in_place_are_forgotten_too(denv):
    with OllamaStandIn(version="0.35.0") as ol:
        configure(denv, ol)
        write_memories(denv.memories, 6)
        gone = write_memory(denv.memories, SECRET)
        withdrawn = write_memory(denv.memories, SECRET2)
        d = denv.daemon().start()
        first = train(d)
        assert first["outcome"] == "succeeded", first
        d.stop()

        gone.unlink()  # while the daemon is down: the startup rescan finds it
        store = Store(f"sqlite:///{denv.state / 'mhd.db'}")
        d = denv.daemon().start()
        second = forget_run_after(d, store, first["id"])
        assert second["outcome"] == "succeeded", second
        d.wait_for(lambda: purged(d), 20, "the first purge")
        assert normalize(first["model_name"]) not in ol.models

        body = json.loads(withdrawn.read_text())
        body["metadata"] = {"trainingConsent": False}
        withdrawn.write_text(json.dumps(body, indent=2))  # in place, as the writer does
        third = forget_run_after(d, store, second["id"])
        assert third["outcome"] == "succeeded", third
        d.wait_for(lambda: purged(d), 20, "the second purge")
        assert normalize(second["model_name"]) not in ol.models
        reasons = {f.reason for f in store.forgotten()}
        assert reasons == {"gone", "excluded"}, reasons
        d.stop()
        # The withdrawn file is still on the owner's disk (its path stays in the file cache);
        # its text is nowhere under state_dir.
        assert files_containing(denv.state, SECRET, slug(SECRET), SECRET2) == []


def test_flag_policy_cancels_the_active_run_flags_the_models_refuses_rollback_and_purges_on_request(denv):
    with OllamaStandIn(version="0.35.0") as ol:
        configure(denv, ol, forget={"policy": "flag"})
        write_memories(denv.memories, 5)
        secret = write_memory(denv.memories, SECRET)
        owners = write_memory(denv.memories, SECRET2)
        d = denv.daemon().start()
        first = train(d)
        write_memories(denv.memories, 2, prefix="later")
        second = train(d)
        assert (first["outcome"], second["outcome"]) == ("succeeded", "succeeded")

        # A run in Training when its owner forgets a memory of its dataset is cancelled.
        denv.configure(threshold=1000, merge={"mode": "ollama", "ollama_url": ol.url, "keep": 5},
                       retry={"failed_run_cooldown_s": 0}, forget={"policy": "flag"},
                       training={"extra": {"fake_steps": 200, "fake_step_s": 0.2}})
        assert d.proc is not None
        d.proc.send_signal(signal.SIGHUP)
        log = denv.tmp / "daemon.log"
        d.wait_for(lambda: "config reloaded" in log.read_text(), 10, "the reload")
        run3 = d.ask("train")["run_id"]
        d.wait_state("Training", 30)
        out = cli(denv, "forget", str(owners))  # the file stays; the owner's word is enough
        assert "forgotten" in out.stdout
        third = end_of(d, run3)
        assert third["outcome"] == "cancelled", third
        assert "forgotten by its owner" in third["error"], third

        secret.unlink()
        d.wait_for(lambda: d.status()["forget"]["pending"] == 2, 20, "both memories forgotten")
        time.sleep(1.5)
        store = Store(f"sqlite:///{denv.state / 'mhd.db'}")
        assert store.last_run().id == run3  # flag: no run starts by itself
        st = d.status()["forget"]
        assert set(st["models_affected"]) == {first["model_name"], second["model_name"]}
        runs = {r["id"]: r for r in cli_json(denv, "runs")}
        assert runs[first["id"]]["forgotten_inside"] == 2
        assert "2 memory(ies) still inside" in cli(denv, "status").stdout
        assert "2 forgotten" in cli(denv, "runs").stdout

        refused = cli(denv, "rollback", first["id"], ok=False)
        assert refused.returncode == 1
        assert "forgotten memory" in refused.stderr and "observation" in refused.stderr, refused.stderr

        out = cli(denv, "forget", "--purge")
        assert "2 model(s) removed" in out.stdout, out.stdout
        for run in (first, second):
            assert normalize(run["model_name"]) not in ol.models
        assert "mhd:latest" not in ol.models  # no model without them is left: the alias goes too
        assert d.status()["forget"] == {"pending": 0, "models_affected": [], "policy": "flag"}
        d.stop()
        assert files_containing(denv.state, SECRET, slug(SECRET), SECRET2) == []
