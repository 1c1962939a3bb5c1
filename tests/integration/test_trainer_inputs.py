"""The trainer's checks and run-folder bookkeeping, without torch: these paths must stay fast."""

from __future__ import annotations

import ast
import hashlib
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from mhd.pod import train as T
from mhd.states.provisioning import EVALUATOR, EXPORTER, TRAINER_MODULES

REPO = Path(__file__).resolve().parents[2]
POD = REPO / "mhd" / "pod"
TRAINER = POD / "train.py"
GOOD_ROW = {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"},
                         {"role": "assistant", "content": "a"}]}


def run_dir(tmp_path: Path, config: Any = None, rows: list[Any] | None = None) -> Path:
    d = tmp_path / "run"
    d.mkdir(exist_ok=True)
    if config is not None:
        (d / "config.json").write_text(config if isinstance(config, str) else json.dumps(config))
    if rows is not None:
        (d / "dataset.jsonl").write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return d


def standalone(args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """Run train.py as the pod does: the files Provisioning uploads, in a folder of their own (not
    the script's working directory), with no mhd package importable (-I)."""
    upload = cwd / "upload"
    upload.mkdir(exist_ok=True)
    for name in ("train.py", *TRAINER_MODULES):
        (upload / name).write_bytes((POD / name).read_bytes())
    return subprocess.run([sys.executable, "-I", str(upload / "train.py"), *args], cwd=cwd, capture_output=True,
                          text=True, timeout=60, env={"PATH": os.environ.get("PATH", ""), **env})


def imported(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and not n.level}
    names |= {f"{n.module or ''}.{a.name}".lstrip(".") for n in ast.walk(tree)
              if isinstance(n, ast.ImportFrom) and n.level for a in n.names}
    return names | {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}


def test_trainer_imports_nothing_from_mhd_and_every_sibling_it_imports_is_uploaded() -> None:
    uploaded = {"train.py", *TRAINER_MODULES, EVALUATOR, EXPORTER}
    siblings = {p.name for p in POD.glob("*.py")} - {"__init__.py"}
    for name in uploaded:
        names = imported(POD / name)
        assert not {n for n in names if n == "mhd" or n.startswith("mhd.")}, name
        # A module missing from the upload would fail on the pod only: `import train_x` or
        # `from .train_x import ...` of a file in mhd/pod must name an uploaded one.
        wanted = {f"{n.split('.')[0]}.py" for n in names} & siblings
        assert wanted <= uploaded, (name, wanted - uploaded)


def test_image_train_py_is_the_packaged_trainer() -> None:
    link = REPO / "image" / "train.py"
    assert link.is_symlink() and link.resolve() == TRAINER.resolve()


@pytest.mark.parametrize(("config", "rows", "says"), [
    (None, [GOOD_ROW], "config.json is missing"),
    ("{not json", [GOOD_ROW], "config.json: not valid JSON"),
    ({"lora_rank": 8}, [GOOD_ROW], "base_model is required"),
    ({"base_model": "m", "lora_rank": "eight"}, [GOOD_ROW], "lora_rank = 'eight': expected an integer"),
    ({"base_model": "m", "lora_rank": 0}, [GOOD_ROW], "lora_rank = 0: expected a positive number"),
    ({"base_model": "m", "learning_rate": "fast"}, [GOOD_ROW], "learning_rate = 'fast': expected a number"),
    ({"base_model": "m", "load_in_4bit": "yes"}, [GOOD_ROW], "load_in_4bit = 'yes': expected true or false"),
    ({"base_model": "m", "target_modules": "q_proj"}, [GOOD_ROW], "target_modules = 'q_proj'"),
    ({"base_model": "m", "lora_dropout": 1.5}, [GOOD_ROW], "lora_dropout = 1.5"),
    ({"base_model": "m"}, None, "dataset.jsonl is missing"),
    ({"base_model": "m"}, [], "dataset.jsonl has no samples"),
    ({"base_model": "m"}, [GOOD_ROW, "{broken"], "dataset.jsonl line 2"),
    ({"base_model": "m"}, [{"messages": [{"role": "user", "content": "only a question"}]}], "line 1"),
])
def test_bad_inputs_exit_2_with_one_line(tmp_path: Path, config: Any, rows: Any, says: str) -> None:
    d = run_dir(tmp_path, config, rows)
    result = standalone(["--run-dir", str(d)], tmp_path)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and says in lines[0], lines


def test_run_dir_from_environment_and_missing_run_dir(tmp_path: Path) -> None:
    d = run_dir(tmp_path, {"base_model": "m"}, None)
    via_env = standalone([], tmp_path, MHD_RUN_DIR=str(d))
    assert via_env.returncode == 2 and "dataset.jsonl is missing" in via_env.stderr
    nothing = standalone([], tmp_path)
    assert nothing.returncode == 2 and "--run-dir" in nothing.stderr


def test_unknown_keys_are_tolerated_and_reported() -> None:
    cfg = T.TrainConfig.from_dict({"base_model": "m", "script": None, "future_knob": 1, "seed": 7,
                                   "num_train_epochs": 1})
    assert cfg.unknown == ("future_knob", "script") and cfg.seed == 7 and cfg.num_train_epochs == 1.0


def complete_run(tmp_path: Path) -> Path:
    d = run_dir(tmp_path)
    (d / "adapter").mkdir()
    (d / "adapter" / "adapter_model.safetensors").write_bytes(b"weights")
    T.write_manifest(T.RunDir(d), {"base_model": "m", "steps": 3})
    return d


def test_complete_run_exits_0_without_reading_config(tmp_path: Path) -> None:
    d = complete_run(tmp_path)
    result = standalone(["--run-dir", str(d)], tmp_path)
    assert result.returncode == 0 and "nothing to do" in result.stdout


def test_manifest_is_checked_against_the_files(tmp_path: Path) -> None:
    d = complete_run(tmp_path)
    run = T.RunDir(d)
    m = json.loads(run.manifest.read_text())
    assert m["files"] == [{"path": "adapter/adapter_model.safetensors", "size": 7,
                           "sha256": hashlib.sha256(b"weights").hexdigest()}]
    assert T.is_complete(run)
    (d / "adapter" / "adapter_model.safetensors").write_bytes(b"WEIGHTS")  # same size, other bytes
    assert not T.is_complete(run)
    (d / "adapter" / "adapter_model.safetensors").unlink()
    assert not T.is_complete(run)


def test_newest_complete_checkpoint_wins_and_torn_ones_are_removed(tmp_path: Path) -> None:
    run = T.RunDir(run_dir(tmp_path))
    assert T.newest_checkpoint(run) is None
    for step, state in ((10, "{}"), (20, "{}"), (30, None), (40, '{"global_st')):
        c = run.checkpoints / f"checkpoint-{step}"
        c.mkdir(parents=True)
        (c / "adapter_model.safetensors").write_bytes(b"w")
        if state is not None:
            (c / "trainer_state.json").write_text(state)
    (run.checkpoints / "README.md").write_text("peft writes this")

    assert T.newest_checkpoint(run) == run.checkpoints / "checkpoint-20"
    assert sorted(p.name for p in run.checkpoints.iterdir()) == ["README.md", "checkpoint-10", "checkpoint-20"]


def test_torn_progress_line_is_sealed(tmp_path: Path) -> None:
    p = tmp_path / "progress.jsonl"
    T.seal_progress(p)  # missing: fine
    p.write_text('{"step": 1}\n{"step": 2, "lo')
    T.seal_progress(p)
    T.seal_progress(p)  # idempotent
    assert p.read_text() == '{"step": 1}\n{"step": 2, "lo\n'


@dataclass
class OldSFTConfig:  # the names an older trl (as pinned next to unsloth) uses
    output_dir: str = ""
    max_seq_length: int = 1024
    gradient_checkpointing: bool = False
    evaluation_strategy: str = "no"
    no_cuda: bool = False
    warmup_ratio: float = 0.0


@dataclass
class NewSFTConfig:
    output_dir: str = ""
    max_length: int = 1024
    activation_checkpointing: bool = False
    eval_strategy: str = "no"
    use_cpu: bool = False
    warmup_steps: float = 0


def test_compat_kwargs_maps_renamed_options() -> None:
    wanted = {"output_dir": "x", "max_length": 128, "activation_checkpointing": True, "eval_strategy": "steps",
              "use_cpu": True, "warmup_ratio": 0.1}
    assert T.compat_kwargs(OldSFTConfig, wanted) == {
        "output_dir": "x", "max_seq_length": 128, "gradient_checkpointing": True,
        "evaluation_strategy": "steps", "no_cuda": False, "warmup_ratio": 0.1}
    assert T.compat_kwargs(NewSFTConfig, wanted) == {
        "output_dir": "x", "max_length": 128, "activation_checkpointing": True, "eval_strategy": "steps",
        "use_cpu": True, "warmup_steps": 0.1}


def test_compat_kwargs_fails_loudly_on_an_option_this_trl_lacks() -> None:
    # Dropping it (as the trainer once did) would train with the library's default instead.
    with pytest.raises(T.ConfigProblem, match=r"has no option 'packing'.*requirements\.lock"):
        T.compat_kwargs(NewSFTConfig, {"output_dir": "x", "packing": False})


def test_oom_detection_follows_the_cause_chain() -> None:
    class OutOfMemoryError(RuntimeError):
        pass

    try:
        try:
            raise OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 MiB")
        except RuntimeError as inner:
            raise ValueError("accelerate wrapped it") from inner
    except ValueError as outer:
        assert T.is_oom(outer)
    assert T.is_oom(RuntimeError("CUDA error: out of memory"))
    assert T.is_oom(MemoryError())
    assert not T.is_oom(RuntimeError("shape mismatch"))
    advice = T.oom_advice(T.TrainConfig(base_model="m", per_device_train_batch_size=4))
    assert "per_device_train_batch_size (now 4)" in advice and "gradient_accumulation_steps" in advice


def test_hf_home_goes_to_the_workspace_volume(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A private copy: the progress-bar switches it sets must not leak into other tests.
    monkeypatch.setattr(os, "environ", {k: v for k, v in os.environ.items() if k != "HF_HOME"})
    T.prepare_environment(workspace=tmp_path / "absent")
    assert "HF_HOME" not in os.environ
    T.prepare_environment(workspace=tmp_path)
    assert os.environ["HF_HOME"] == str(tmp_path / "hf")
    os.environ["HF_HOME"] = "/elsewhere"
    T.prepare_environment(workspace=tmp_path)
    assert os.environ["HF_HOME"] == "/elsewhere"
