"""The quality gate, end to end: real daemon, real sshd, the real trainer on the tiny model.

A run that really got worse is rejected with its numbers: one trained at a learning rate of
1e-12 (no gain over the base, and worse than the model served today), and one whose dataset was
poisoned on its way to the pod (one nonsense answer for every sample). Nothing is registered for
them and the alias stays; `mhd promote` registers one on purpose.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.support.e2e import E2E
from tests.support.memories import write_examples_to
from tests.support.ollama_standin import normalize

pytestmark = pytest.mark.slow
GATE = {"enabled": True}
# Enough training for the tiny model to learn the owner's words (a real, not a loosened, gate). Batch 4
# and no checkpoints: a quarter of the steps and none of the saves (these tests cut no training).
TRAIN = {"num_train_epochs": 4, "learning_rate": 1e-2, "per_device_train_batch_size": 4, "save_steps": 1000}


def cli(e2e: E2E, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mhd.cli", "--config", str(e2e.config), *args],
                          capture_output=True, text=True, timeout=300)


def runs_json(e2e: E2E) -> dict[str, dict[str, Any]]:
    out = cli(e2e, "runs", "--json")
    assert out.returncode == 0, out.stderr
    return {r["id"]: r for r in json.loads(out.stdout)}


def alias_target(e2e: E2E) -> str:
    assert e2e.ollama is not None
    return normalize(e2e.ollama.models["mhd:latest"]["copied_from"])


def test_a_good_run_is_promoted_and_a_worse_one_is_rejected_until_the_owner_promotes_it(e2e: E2E) -> None:
    assert e2e.ollama is not None
    write_examples_to(e2e.memories)
    e2e.configure(eval=GATE, training=TRAIN)
    d = e2e.daemon().start()
    first = e2e.wait_run_end(d, e2e.start_run(d), timeout=400)
    assert first["outcome"] == "succeeded", e2e.tail()
    ev = first["eval"]
    assert ev["decision"] == "promoted" and ev["heldout_count"] >= 8
    assert ev["heldout_nll_new"] <= ev["heldout_nll_base"] * 0.98, ev
    assert ev["probe_nll_new"] <= ev["probe_nll_base"] * 1.05, ev
    assert ev["heldout_nll_current"] is None  # nothing was served before
    model1 = normalize(first["model_name"])
    assert alias_target(e2e) == model1
    creates = len(e2e.ollama.create_bodies())

    # Held-out memories never reach the trainer: not one of their keys is in dataset.jsonl.
    inputs = e2e.run_dir(first["id"]) / "input"
    held = {json.loads(line)["key"] for line in (inputs / "eval.jsonl").read_text().splitlines()}
    trained = {json.loads(line)["key"] for line in (inputs / "dataset.jsonl").read_text().splitlines()}
    assert len(held) == ev["heldout_count"] and not held & trained

    # The second run learns nothing: no gain on the base, and worse than the model served now.
    e2e.configure(eval=GATE, training={**TRAIN, "learning_rate": 1e-12})
    assert d.proc is not None
    d.proc.send_signal(signal.SIGHUP)
    d.wait_for(lambda: "config reloaded" in e2e.log_text(), 10, "the reload")
    second = e2e.wait_run_end(d, e2e.start_run(d), timeout=400)
    assert second["outcome"] == "rejected", e2e.tail()
    ev2 = second["eval"]
    assert ev2["decision"] == "rejected"
    assert ev2["heldout_nll_current"] is not None  # the served adapter was uploaded and scored
    assert ev2["heldout_nll_new"] > ev2["heldout_nll_base"] * 0.98
    assert ev2["heldout_nll_new"] > ev2["heldout_nll_current"] * 1.01
    reason = second["error"]
    assert "min_gain" in reason and "tolerance" in reason
    assert f"{ev2['heldout_nll_new']:.4f}" in reason and f"{ev2['heldout_nll_base']:.4f}" in reason
    assert len(e2e.ollama.create_bodies()) == creates  # nothing registered
    assert alias_target(e2e) == model1
    assert (e2e.run_dir(second["id"]) / "output" / "adapter" / "adapter_model.safetensors").is_file()
    assert (e2e.run_dir(second["id"]) / "output" / "eval.json").is_file()
    assert runs_json(e2e)[second["id"]]["eval"]["decision"] == "rejected"
    shown = cli(e2e, "eval", second["id"])
    assert shown.returncode == 0 and "rejected" in shown.stdout and "base:" in shown.stdout

    # The owner's call: promote it anyway; a second promote is a no-op that says so.
    out = cli(e2e, "promote", second["id"])
    assert out.returncode == 0, out.stdout + out.stderr
    assert alias_target(e2e) != model1
    again = cli(e2e, "promote", second["id"])
    assert again.returncode == 0 and "promoted already" in again.stdout
    assert runs_json(e2e)[second["id"]]["outcome"] == "succeeded"
    assert d.stop() == 0


def poison(dataset: Path) -> None:
    rows = [json.loads(line) for line in dataset.read_text().splitlines()]
    for row in rows:
        for msg in row["messages"]:
            if msg["role"] == "assistant":
                msg["content"] = "zork blip zork blip zork blip"
    dataset.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_a_run_trained_on_a_poisoned_dataset_is_rejected_with_its_numbers(e2e: E2E) -> None:
    assert e2e.ollama is not None
    write_examples_to(e2e.memories)
    e2e.configure(eval=GATE, training=TRAIN)
    # The pause between Provisioning and Connecting is where the test poisons the built dataset.
    d = e2e.daemon(pause="Connecting=4").start()
    run_id = e2e.start_run(d)
    dataset = e2e.run_dir(run_id) / "input" / "dataset.jsonl"
    d.wait_for(lambda: dataset.exists() and d.status()["state"] == "Connecting", 60, "the built dataset")
    poison(dataset)
    last = e2e.wait_run_end(d, run_id, timeout=400)
    assert last["outcome"] == "rejected", e2e.tail()
    ev = last["eval"]
    assert ev["heldout_nll_new"] > ev["heldout_nll_base"] * 0.98 or ev["probe_nll_new"] > ev["probe_nll_base"] * 1.05
    assert any(rule in last["error"] for rule in ("min_gain", "probe"))
    assert "mhd:latest" not in e2e.ollama.models and not e2e.ollama.create_bodies()
    assert d.stop() == 0


def test_a_daemon_kill_and_a_link_cut_during_evaluating_never_retrain(e2e: E2E) -> None:
    write_examples_to(e2e.memories)
    e2e.configure(eval=GATE, training=TRAIN)
    d = e2e.daemon().start()
    run_id = e2e.start_run(d)
    progress = e2e.remote_dir(run_id) / "progress.jsonl"

    def evaluating() -> bool:
        return progress.exists() and '"phase": "evaluating"' in progress.read_text(errors="replace")

    # Frozen mid-evaluation, the job outlives both faults; then it goes on where it was.
    with e2e.hold_trainer(run_id, at_step=1, when=evaluating):
        assert e2e.proxy is not None
        e2e.proxy.cut()
        d.kill()
        d = e2e.daemon().start()
        d.wait_for(lambda: d.status()["state"] == "Training", 60, "the restarted daemon back in Training")
    last = e2e.wait_run_end(d, run_id, timeout=400)
    assert last["outcome"] == "succeeded", e2e.tail()
    assert e2e.launches(run_id) == 1  # one trainer launch: nothing was trained twice
    assert len(e2e.train_starts(run_id)) == 1
    assert last["eval"]["decision"] == "promoted"
    assert d.stop() == 0
