"""The real trainer (mhd/pod/train.py) as a subprocess on the tiny offline model, CPU only."""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from mhd.config import DatasetConfig
from mhd.dataset.build import build_dataset
from tests.support.memories import write_examples_to
from tests.support.tiny import tiny_model_dir  # noqa: F401  (session fixture; move to conftest)

pytestmark = pytest.mark.slow
pytest.importorskip("trl")

TRAINER = Path(__file__).resolve().parents[2] / "mhd" / "pod" / "train.py"


def trainer_config(model_dir: Path) -> dict[str, Any]:
    # Small enough for ~3 s of training on 2 cores, long enough (~110 steps) to be killed mid-run.
    return {
        "base_model": str(model_dir), "lora_rank": 8, "lora_alpha": 16, "lora_dropout": 0.0,
        "num_train_epochs": 2, "learning_rate": 5e-3, "per_device_train_batch_size": 1,
        "gradient_accumulation_steps": 1, "max_seq_length": 128,
        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        "load_in_4bit": True, "save_steps": 10, "logging_steps": 1, "seed": 42,
    }


def env(tmp: Path) -> dict[str, str]:
    e = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "MHD_"))}
    # No hub: the model is local; a stray download attempt must fail loudly, not hang.
    e.update(HF_HOME=str(tmp / "hf"), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1")
    return e


@dataclass
class Run:
    dir: Path
    rc: int | None = None
    wall_s: float = 0.0

    def progress(self) -> list[dict[str, Any]]:
        p = self.dir / "progress.jsonl"
        if not p.exists():
            return []
        return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]

    def train_steps(self) -> list[int]:
        return [line["step"] for line in self.progress() if line["phase"] == "train"]

    def manifest(self) -> dict[str, Any]:
        return dict(json.loads((self.dir / "manifest.json").read_text()))

    def log(self) -> str:
        return (self.dir / "train.log").read_text()


def prepare(dest: Path, model_dir: Path, memories: Path) -> Run:
    dest.mkdir(parents=True)
    build_dataset(memories, dest, DatasetConfig(persona_name="Maya", holdout_fraction=0.1))
    (dest / "config.json").write_text(json.dumps(trainer_config(model_dir)))
    return Run(dest)


def start(run: Run, **extra_env: str) -> subprocess.Popen[bytes]:
    log = (run.dir / "train.log").open("ab")  # the launcher's redirect: stdout and stderr to train.log
    try:
        return subprocess.Popen([sys.executable, str(TRAINER), "--run-dir", str(run.dir)], stdout=log,
                                stderr=subprocess.STDOUT, env={**env(run.dir.parent), **extra_env})
    finally:
        log.close()


def finish(run: Run, **extra_env: str) -> Run:
    t0 = time.monotonic()
    proc = start(run, **extra_env)
    run.rc = proc.wait(timeout=240)
    run.wall_s = time.monotonic() - t0
    return run


@pytest.fixture(scope="module")
def memories(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_examples_to(tmp_path_factory.mktemp("memories"))


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path, memories: Path) -> Run:  # noqa: F811
    run = finish(prepare(tmp_path_factory.mktemp("uninterrupted") / "run", tiny_model_dir, memories))
    assert run.rc == 0, run.log()
    return run


def test_two_epochs_write_progress_checkpoints_adapter_and_manifest(finished: Run) -> None:
    train = [line for line in finished.progress() if line["phase"] == "train"]
    total = train[0]["total_steps"]
    samples = sum(1 for _ in (finished.dir / "dataset.jsonl").open())
    assert total == 2 * samples  # batch 1, no accumulation, 2 epochs
    assert [line["step"] for line in train] == list(range(1, total + 1))
    assert {line["total_steps"] for line in train} == {total}
    for line in train:
        assert {"step", "total_steps", "epoch", "loss", "learning_rate", "samples_per_s", "eta_s", "time"} <= set(line)
        assert math.isfinite(line["loss"]) and line["learning_rate"] >= 0
        assert "gpu_util" not in line  # CPU: no GPU fields
    assert train[-1]["epoch"] == pytest.approx(2.0)
    assert train[-1]["eta_s"] == pytest.approx(0.0, abs=0.5)
    evals = [line for line in finished.progress() if line["phase"] == "eval"]
    assert evals and all(math.isfinite(e["eval_loss"]) for e in evals)

    checkpoints = sorted(p.name for p in (finished.dir / "checkpoints").glob("checkpoint-*"))
    assert len(checkpoints) == 2 and f"checkpoint-{total}" in checkpoints

    assert "\r" not in finished.log()
    assert not (finished.dir / "pid").exists() and not (finished.dir / "exit_code").exists()


def test_manifest_lists_adapter_files_with_matching_sha256(finished: Run) -> None:
    m = finished.manifest()
    paths = {f["path"] for f in m["files"]}
    assert {"adapter/adapter_config.json", "adapter/adapter_model.safetensors", "adapter/tokenizer.json",
            "adapter/tokenizer_config.json"} <= paths
    for f in m["files"]:
        data = (finished.dir / f["path"]).read_bytes()
        assert len(data) == f["size"] and hashlib.sha256(data).hexdigest() == f["sha256"]
    assert m["base_model"] == trainer_config(Path("x"))["base_model"] or Path(m["base_model"]).is_dir()
    assert m["steps"] == finished.train_steps()[-1]
    assert math.isfinite(m["final_loss"]) and m["wall_time_s"] > 0
    assert not list(finished.dir.glob("*.tmp"))


def test_adapter_loads_with_peft_and_changes_the_output(finished: Run, tiny_model_dir: Path) -> None:  # noqa: F811
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(finished.dir / "adapter")
    ids = tok.apply_chat_template([{"role": "user", "content": "How was the walk with Juniper?"}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        before = base(ids).logits
    tuned = PeftModel.from_pretrained(base, finished.dir / "adapter").eval()
    with torch.no_grad():
        after = tuned(ids).logits
        with tuned.disable_adapter():
            disabled = tuned(ids).logits

    assert torch.equal(before, disabled)  # the base weights were not touched
    assert (after - before).abs().max().item() > 1e-3


def test_relaunch_of_a_finished_run_exits_at_once(finished: Run) -> None:
    manifest_before = (finished.dir / "manifest.json").read_bytes()
    lines_before = finished.progress()

    again = finish(Run(finished.dir))

    assert again.rc == 0
    assert again.wall_s < 10  # no model load, no training
    assert (finished.dir / "manifest.json").read_bytes() == manifest_before
    assert finished.progress() == lines_before


def test_sigkill_after_a_checkpoint_then_relaunch_resumes_and_finishes(
        tmp_path: Path, tiny_model_dir: Path, memories: Path, finished: Run) -> None:  # noqa: F811
    run = prepare(tmp_path / "run", tiny_model_dir, memories)
    proc = start(run)
    ckpts = run.dir / "checkpoints"
    deadline = time.monotonic() + 120
    while not list(ckpts.glob("checkpoint-*/trainer_state.json")):
        assert proc.poll() is None, "trainer ended before its first checkpoint:\n" + run.log()
        assert time.monotonic() < deadline
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(10) == -signal.SIGKILL, "trainer finished before it could be killed; make the run longer"
    killed_at = run.train_steps()[-1]
    lines_before = len(run.progress())
    total = finished.train_steps()[-1]
    assert 0 < killed_at < total

    finish(run)

    assert run.rc == 0, run.log()
    new_steps = [p["step"] for p in run.progress()[lines_before:] if p["phase"] == "train"]
    resumed_from = new_steps[0] - 1
    assert 10 <= resumed_from <= killed_at and resumed_from % 10 == 0  # a saved checkpoint, not step 0
    assert new_steps == list(range(resumed_from + 1, total + 1))
    assert run.manifest()["steps"] == total
    assert "resuming at step" in run.log()
    # Same data order and RNG state after resume: the very adapter an uninterrupted run makes.
    from safetensors.torch import load_file

    resumed = load_file(run.dir / "adapter" / "adapter_model.safetensors")
    straight = load_file(finished.dir / "adapter" / "adapter_model.safetensors")
    assert resumed.keys() == straight.keys()
    for name in straight:
        assert (resumed[name] - straight[name]).abs().max().item() < 1e-5, name


def test_out_of_memory_exits_3_and_names_the_knob(tmp_path: Path, tiny_model_dir: Path, memories: Path) -> None:  # noqa: F811
    run = finish(prepare(tmp_path / "run", tiny_model_dir, memories), MHD_TRAIN_FAULT="oom@3")
    assert run.rc == 3
    last = run.log().strip().splitlines()[-1]
    assert "out of memory" in last and "per_device_train_batch_size" in last and "max_seq_length" in last
    assert not (run.dir / "manifest.json").exists()


def test_unknown_target_module_is_a_config_error(tmp_path: Path, tiny_model_dir: Path, memories: Path) -> None:  # noqa: F811
    run = prepare(tmp_path / "run", tiny_model_dir, memories)
    cfg = json.loads((run.dir / "config.json").read_text())
    (run.dir / "config.json").write_text(json.dumps({**cfg, "target_modules": ["no_such_proj"]}))
    finish(run)
    assert run.rc == 2
    assert "no_such_proj" in run.log().strip().splitlines()[-1]


def test_missing_base_model_is_a_config_error(tmp_path: Path, tiny_model_dir: Path, memories: Path) -> None:  # noqa: F811
    run = prepare(tmp_path / "run", tiny_model_dir, memories)
    cfg = json.loads((run.dir / "config.json").read_text())
    (run.dir / "config.json").write_text(json.dumps({**cfg, "base_model": str(tmp_path / "nope")}))
    finish(run)
    assert run.rc == 2
    assert "could not be loaded" in run.log().strip().splitlines()[-1]


def test_tiny_model_is_deterministic(tmp_path: Path, tiny_model_dir: Path) -> None:  # noqa: F811
    from mhd.devtools.tiny_model import build_tiny_model

    again = build_tiny_model(tmp_path / "again")
    for f in sorted(tiny_model_dir.iterdir()):
        assert (again / f.name).read_bytes() == f.read_bytes(), f.name
    shutil.rmtree(again)
