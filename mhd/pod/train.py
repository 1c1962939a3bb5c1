#!/usr/bin/env python3
"""mhd's trainer: LoRA fine-tuning of ``base_model`` on ``dataset.jsonl``. Runs on the pod.

    python train.py --run-dir DIR        (or MHD_RUN_DIR=DIR python train.py)

The daemon uploads this one file next to the run's inputs, so it imports nothing from ``mhd``:
only the standard library at module level, and the training stack (torch, transformers, peft,
trl, and unsloth when present) once the inputs have been checked.

The run folder is the whole protocol (DESIGN.md, "Training"):

    in:   config.json  dataset.jsonl  [eval.jsonl]  [export.py]
          [evaluate.py  probe.jsonl  current_adapter/]   the quality gate ("evaluate")
    out:  progress.jsonl   one JSON line per logging step, append-only
          checkpoints/     every save_steps, newest 2 kept; a relaunch resumes from the newest
          adapter/         PEFT adapter + tokenizer files + base_config.json (the base's config.json)
          trained.json     written atomically once adapter/ is complete: a relaunch never retrains
          eval.json        base / new / current adapter scored on eval.jsonl and probe.jsonl by
                           evaluate.py (config.json "evaluate": {"enabled": true}), before the export
          export/          work folder of the export (config.json "export": {"enabled": true}):
          model.gguf       the merged, quantized model, built by export.py after training
          manifest.json    written last and atomically: its presence means "done"

With the export or the evaluation enabled, the trainer re-executes itself after training, so they
start in a fresh process (no training model, optimizer or CUDA cache left in memory); the new
process finds trained.json and goes straight to the evaluation (unless eval.json is there), then
the export. A failed export does not fail the job: the manifest
lists the adapter and carries ``"export": {"error": ...}``, so the adapter is still fetched.

Exit codes: 0 done (also: already done), 2 bad config or dataset (one line on stderr),
3 out of memory (the line names the knob), 1 anything else (traceback on stderr).
``pid`` and ``exit_code`` belong to the launcher (run.sh), never to this script.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import math
import os
import shutil
import sys
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

EXIT_OK, EXIT_CRASH, EXIT_CONFIG, EXIT_OOM = 0, 1, 2, 3
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
CHATML = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
# Test seam: "oom@N" raises a CUDA-style OOM at step N, to exercise the exit-3 path on CPU
# (export.py reads "kill@<phase>" from the same variable).
FAULT_ENV = "MHD_TRAIN_FAULT"
MODEL_GGUF = "model.gguf"  # export.py's output, listed in the manifest


class ConfigProblem(Exception):
    """Bad config or dataset: exit 2 with this one-line message."""


def log(msg: str) -> None:
    print(f"{time.strftime('%Y-%m-%d %H:%M:%S')} mhd-train: {msg}", flush=True)


# --- config -------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainConfig:
    base_model: str
    lora_rank: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    num_train_epochs: float = 2.0
    learning_rate: float = 2e-4
    per_device_train_batch_size: int = 1
    gradient_accumulation_steps: int = 16
    max_seq_length: int = 2048
    target_modules: tuple[str, ...] = DEFAULT_TARGETS
    load_in_4bit: bool = True
    save_steps: int = 50
    logging_steps: int = 1
    seed: int = 42
    save_total_limit: int = 2
    eval_steps: int | None = None
    lr_scheduler_type: str = "linear"
    warmup_ratio: float = 0.0
    weight_decay: float = 0.0
    optim: str | None = None
    # Concatenate each micro-batch into one row with per-sample position_ids instead of padding it
    # (make_collator); false goes back to padded batches, e.g. for an attention kernel that ignores them.
    padding_free: bool = True
    # {"enabled": bool, "quantize": "Q4_K_M", "llama_cpp_dir": "/opt/llama.cpp"}: checked by export.py.
    export: dict[str, Any] = field(default_factory=dict)
    # {"enabled": bool, "generate": 3, "max_new_tokens": 48, "current_adapter": "current_adapter"}:
    # checked by evaluate.py.
    evaluate: dict[str, Any] = field(default_factory=dict)
    unknown: tuple[str, ...] = field(default=())

    @classmethod
    def from_dict(cls, data: Any) -> TrainConfig:
        if not isinstance(data, dict):
            raise ConfigProblem("config.json: expected a JSON object")
        known = {f.name: f for f in fields(cls) if f.name != "unknown"}
        if not isinstance(data.get("base_model"), str) or not data["base_model"].strip():
            raise ConfigProblem("config.json: base_model is required (an HF model id or a local path)")
        values: dict[str, Any] = {}
        for name, value in data.items():
            if name in known and value is not None:
                values[name] = _coerce(name, value, cls._defaults().get(name))
        values["unknown"] = tuple(sorted(k for k in data if k not in known))
        cfg = cls(**values)
        cfg._check_ranges()
        return cfg

    @classmethod
    def _defaults(cls) -> dict[str, Any]:
        return {f.name: f.default for f in fields(cls)}

    def _check_ranges(self) -> None:
        positive = ("lora_rank", "lora_alpha", "per_device_train_batch_size", "gradient_accumulation_steps",
                    "save_steps", "logging_steps", "save_total_limit", "num_train_epochs", "learning_rate")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ConfigProblem(f"config.json: {name} = {getattr(self, name)!r}: expected a positive number")
        if not 0 <= self.lora_dropout < 1:
            raise ConfigProblem(f"config.json: lora_dropout = {self.lora_dropout!r}: expected 0 <= value < 1")
        if self.max_seq_length < 16:
            raise ConfigProblem(f"config.json: max_seq_length = {self.max_seq_length}: expected at least 16")
        if not self.target_modules:
            raise ConfigProblem("config.json: target_modules is empty: name the layers LoRA should adapt")

    @property
    def samples_per_step(self) -> int:
        return self.per_device_train_batch_size * self.gradient_accumulation_steps

    @property
    def export_enabled(self) -> bool:
        return self.export.get("enabled") is True

    @property
    def evaluate_enabled(self) -> bool:
        return self.evaluate.get("enabled") is True


def _coerce(name: str, value: Any, default: Any) -> Any:
    """Check one value against the type of its default; the message names key and value."""
    def bad(expected: str) -> ConfigProblem:
        return ConfigProblem(f"config.json: {name} = {value!r}: expected {expected}")

    if name == "export":
        if not isinstance(value, dict) or not isinstance(value.get("enabled", False), bool):
            raise bad('an object like {"enabled": true, "quantize": "q4_K_M"}')
        return dict(value)
    if name == "evaluate":
        if not isinstance(value, dict) or not isinstance(value.get("enabled", False), bool):
            raise bad('an object like {"enabled": true, "generate": 3, "max_new_tokens": 48}')
        return dict(value)
    if name == "target_modules":
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            raise bad("a list of module names")
        return tuple(value)
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise bad("true or false")
        return value
    if isinstance(default, int) or name == "eval_steps":
        if isinstance(value, bool) or not isinstance(value, int | float) or value != int(value):
            raise bad("an integer")
        return int(value)
    if isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise bad("a number")
        return float(value)
    if not isinstance(value, str):
        raise bad("a string")
    return value


# --- the run folder -----------------------------------------------------------------------


@dataclass(frozen=True)
class RunDir:
    root: Path

    @property
    def config(self) -> Path:
        return self.root / "config.json"

    @property
    def dataset(self) -> Path:
        return self.root / "dataset.jsonl"

    @property
    def eval(self) -> Path:
        return self.root / "eval.jsonl"

    @property
    def progress(self) -> Path:
        return self.root / "progress.jsonl"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def adapter(self) -> Path:
        return self.root / "adapter"

    @property
    def manifest(self) -> Path:
        return self.root / "manifest.json"

    @property
    def trained(self) -> Path:
        return self.root / "trained.json"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def is_complete(run: RunDir) -> bool:
    """manifest.json present and every file it lists has the recorded size and sha256."""
    return _verified(run, run.manifest) is not None


def read_trained(run: RunDir) -> dict[str, Any] | None:
    """The training summary from trained.json when adapter/ still matches it, else None."""
    data = _verified(run, run.trained)
    info = data.get("info") if data else None
    return dict(info) if isinstance(info, dict) else None


def _verified(run: RunDir, listing: Path) -> dict[str, Any] | None:
    """The JSON object at ``listing`` if every file it lists has the recorded size and sha256."""
    try:
        data = json.loads(listing.read_text())
        files = data["files"]
        if not files:
            return None
        for entry in files:
            path = run.root / entry["path"]
            if path.stat().st_size != entry["size"] or sha256_file(path) != entry["sha256"]:
                return None
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return data if isinstance(data, dict) else None


def newest_checkpoint(run: RunDir) -> Path | None:
    """The newest *complete* checkpoint; half-written ones (a kill mid-save) are removed."""
    if not run.checkpoints.is_dir():
        return None
    found = []
    for p in run.checkpoints.iterdir():
        step = p.name.removeprefix("checkpoint-")
        if p.is_dir() and step.isdigit():
            found.append((int(step), p))
    for _, path in sorted(found, reverse=True):
        if _checkpoint_complete(path):
            return path
        log(f"removing incomplete checkpoint {path.name}")
        shutil.rmtree(path, ignore_errors=True)
    return None


def _checkpoint_complete(path: Path) -> bool:
    # The Trainer writes trainer_state.json after the weights, optimizer and RNG state.
    try:
        json.loads((path / "trainer_state.json").read_text())
    except (OSError, ValueError):
        return False
    return any(path.glob("adapter_model.*")) or any(path.glob("model*.safetensors"))


def load_rows(path: Path, required: bool) -> list[dict[str, Any]]:
    """Chat rows → prompt/completion rows, so that only the assistant turn is trained on."""
    if not path.exists():
        if required:
            raise ConfigProblem(f"{path.name} is missing in {path.parent}: upload the dataset before training")
        return []
    rows = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigProblem(f"{path.name}: cannot be read ({exc})") from None
    for n, line in enumerate(lines, 1):
        if line.strip():
            rows.append(_row(path.name, n, line))
    if required and not rows:
        raise ConfigProblem(f"{path.name} has no samples: build the dataset from more memories")
    return rows


def _row(name: str, n: int, line: str) -> dict[str, Any]:
    try:
        record = json.loads(line)
        messages = record["messages"]
        ok = (isinstance(messages, list) and len(messages) >= 2 and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages) and messages[-1]["role"] == "assistant")
    except (ValueError, KeyError, TypeError):
        ok = False
    if not ok:
        raise ConfigProblem(f"{name} line {n}: expected {{\"messages\": [..., {{\"role\": \"assistant\", ...}}]}}")
    return {
        "prompt": [{"role": m["role"], "content": m["content"]} for m in messages[:-1]],
        "completion": [{"role": "assistant", "content": messages[-1]["content"]}],
    }


def file_entries(run: RunDir, paths: Sequence[Path], known: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """Manifest entries; ``known`` maps a relative path to a sha256 already computed."""
    out = []
    for path in paths:
        rel = path.relative_to(run.root).as_posix()
        digest = (known or {}).get(rel) or sha256_file(path)
        out.append({"path": rel, "size": path.stat().st_size, "sha256": digest})
    return out


def adapter_files(run: RunDir) -> list[Path]:
    return sorted(p for p in run.adapter.rglob("*") if p.is_file())


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w") as fh:
        json.dump(data, fh, indent=2)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def write_manifest(run: RunDir, info: dict[str, Any], extra: Sequence[Path] = (),
                   known: dict[str, str] | None = None) -> dict[str, Any]:
    """The adapter's files (and ``extra``, e.g. model.gguf) with sizes and sha256, then ``info``."""
    manifest = {"files": file_entries(run, [*adapter_files(run), *extra], known), **info}
    write_json_atomic(run.manifest, manifest)
    return manifest


def write_trained(run: RunDir, info: dict[str, Any]) -> None:
    """The adapter is complete: a relaunch (e.g. killed during the export) skips training."""
    write_json_atomic(run.trained, {"files": file_entries(run, adapter_files(run)), "info": info})


def seal_progress(path: Path) -> None:
    """A kill can leave a torn last line; end it so the next line starts clean."""
    try:
        with path.open("rb+") as fh:
            fh.seek(0, os.SEEK_END)
            if fh.tell() == 0:
                return
            fh.seek(-1, os.SEEK_END)
            if fh.read(1) != b"\n":
                fh.write(b"\n")
    except FileNotFoundError:
        pass


# --- environment --------------------------------------------------------------------------


def prepare_environment(workspace: Path = Path("/workspace")) -> None:
    # The pod's container disk is small and /workspace is the big volume (the seed once filled
    # the root disk with an 8B download).
    if "HF_HOME" not in os.environ and workspace.is_dir():
        os.environ["HF_HOME"] = str(workspace / "hf")
    # train.log is a file, not a terminal: progress bars would only add carriage-return noise.
    for name in ("TQDM_DISABLE", "HF_HUB_DISABLE_PROGRESS_BARS", "HF_DATASETS_DISABLE_PROGRESS_BARS"):
        os.environ.setdefault(name, "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # Library deprecation notices repeat on every run and bury the lines a person needs.
    warnings.filterwarnings("ignore", category=FutureWarning)


def is_oom(exc: BaseException) -> bool:
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, MemoryError) or type(cur).__name__ == "OutOfMemoryError":
            return True
        if isinstance(cur, RuntimeError) and "out of memory" in str(cur).lower():
            return True
        cur = cur.__cause__ or cur.__context__
    return False


def oom_advice(cfg: TrainConfig) -> str:
    return (f"out of memory: lower per_device_train_batch_size (now {cfg.per_device_train_batch_size}) "
            f"or max_seq_length (now {cfg.max_seq_length}); raise gradient_accumulation_steps "
            f"(now {cfg.gradient_accumulation_steps}) to keep the effective batch size")


# --- training -----------------------------------------------------------------------------


def pick_backend() -> str:
    """``unsloth`` (CUDA + unsloth installed), ``cuda`` (plain transformers), or ``cpu``."""
    import torch

    if not torch.cuda.is_available():
        return "cpu"
    return "unsloth" if importlib.util.find_spec("unsloth") is not None else "cuda"


def half_dtype() -> Any:
    """One precision for both the weights and the trainer's autocast (the seed mixed them)."""
    import torch

    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def load_model(cfg: TrainConfig, backend: str) -> tuple[Any, Any, Any]:
    """(model, tokenizer, peft_config or None when the model already carries LoRA)."""
    try:
        if backend == "unsloth":
            return _load_unsloth(cfg)
        return _load_plain(cfg, backend)
    except (OSError, ValueError) as exc:
        if is_oom(exc):
            raise
        raise ConfigProblem(f"base_model {cfg.base_model!r} could not be loaded: {_one_line(exc)}") from exc


def _load_unsloth(cfg: TrainConfig) -> tuple[Any, Any, Any]:
    from unsloth import FastLanguageModel  # before transformers/trl: it patches them on import

    model, tokenizer = FastLanguageModel.from_pretrained(**unsloth_load_kwargs(cfg, half_dtype()))
    model = FastLanguageModel.get_peft_model(model, **unsloth_peft_kwargs(cfg))
    return model, tokenizer, None


# The keywords of the two unsloth calls, apart from the calls: a CPU test checks each name against
# the signatures in the locked unsloth's source (tests/integration/test_trainer_lock.py).
def unsloth_load_kwargs(cfg: TrainConfig, dtype: Any) -> dict[str, Any]:
    return {"model_name": cfg.base_model, "max_seq_length": cfg.max_seq_length, "dtype": dtype,
            "load_in_4bit": cfg.load_in_4bit}


def unsloth_peft_kwargs(cfg: TrainConfig) -> dict[str, Any]:
    return {"r": cfg.lora_rank, "lora_alpha": cfg.lora_alpha, "lora_dropout": cfg.lora_dropout,
            "target_modules": list(cfg.target_modules), "bias": "none",
            "use_gradient_checkpointing": "unsloth", "random_state": cfg.seed}


def _load_plain(cfg: TrainConfig, backend: str) -> tuple[Any, Any, Any]:
    import torch
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(cfg.base_model)
    kwargs: dict[str, Any] = {"dtype": torch.float32}
    if backend == "cuda":
        kwargs = {"dtype": half_dtype(), "device_map": {"": 0}}
        if cfg.load_in_4bit and importlib.util.find_spec("bitsandbytes") is not None:
            from transformers import BitsAndBytesConfig

            kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=half_dtype())
    model = AutoModelForCausalLM.from_pretrained(cfg.base_model, **kwargs)
    if "quantization_config" in kwargs:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    peft_config = LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                             target_modules=list(cfg.target_modules), bias="none", task_type="CAUSAL_LM")
    return model, tokenizer, peft_config


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:300] or type(exc).__name__


def drop_overlong(rows: list[dict[str, Any]], tokenizer: Any, max_len: int) -> list[dict[str, Any]]:
    """Drop rows whose prompt alone fills max_length: truncation would leave nothing to learn."""
    kept = []
    for row in rows:
        ids = tokenizer.apply_chat_template(row["prompt"], add_generation_prompt=True, tokenize=True,
                                            return_dict=False)
        if len(ids) < max_len - 8:
            kept.append(row)
    if len(kept) < len(rows):
        log(f"skipping {len(rows) - len(kept)} samples whose prompt exceeds max_seq_length={max_len}")
    return kept


def compat_kwargs(cls: Any, wanted: dict[str, Any]) -> dict[str, Any]:
    """Map our argument names onto this trl/transformers version's (older trl used other names).

    An option this version has under neither name is an error, never dropped: a silently missing
    ``max_length`` or ``bf16`` changes what the GPU hours buy. The pod installs the lock
    (requirements.lock), and CI runs these arguments against its versions."""
    names = {f.name for f in fields(cls)}
    # our name → the name in versions that lack it (older trl for the first four; transformers 5
    # folded warmup_ratio into a fractional warmup_steps).
    renames = {"max_length": "max_seq_length", "activation_checkpointing": "gradient_checkpointing",
               "eval_strategy": "evaluation_strategy", "use_cpu": "no_cuda", "warmup_ratio": "warmup_steps"}
    out: dict[str, Any] = {}
    missing: list[str] = []
    for key, value in wanted.items():
        if key in names:
            out[key] = value
        elif key in renames and renames[key] in names:
            out[renames[key]] = (not value) if key == "use_cpu" else value
        else:
            missing.append(key)
    if missing:
        have = ", ".join(f"{n} {v}" for n, v in _versions().items() if n in ("trl", "transformers"))
        raise ConfigProblem(f"{getattr(cls, '__name__', cls)} of this trl/transformers ({have}) "
                            f"has no option {', '.join(repr(k) for k in missing)}: the pod's packages do not match "
                            "the lock (mhd/pod/requirements.lock)")
    return out


def sft_args(cfg: TrainConfig, run: RunDir, backend: str, has_eval: bool) -> Any:
    import torch
    from trl import SFTConfig

    half = None if backend == "cpu" else half_dtype()
    wanted: dict[str, Any] = {
        "output_dir": str(run.checkpoints),
        "num_train_epochs": cfg.num_train_epochs,
        "learning_rate": cfg.learning_rate,
        "per_device_train_batch_size": cfg.per_device_train_batch_size,
        "per_device_eval_batch_size": cfg.per_device_train_batch_size,
        "gradient_accumulation_steps": cfg.gradient_accumulation_steps,
        "max_length": cfg.max_seq_length,
        "lr_scheduler_type": cfg.lr_scheduler_type,
        "weight_decay": cfg.weight_decay,
        "logging_steps": cfg.logging_steps,
        "save_strategy": "steps",
        "save_steps": cfg.save_steps,
        "save_total_limit": cfg.save_total_limit,
        "eval_strategy": "steps" if has_eval else "no",
        "seed": cfg.seed,
        "data_seed": cfg.seed,
        "bf16": half is torch.bfloat16,
        "fp16": half is torch.float16,
        "use_cpu": backend == "cpu",
        # unsloth checkpoints activations itself; on CPU the tiny models don't need it.
        "activation_checkpointing": backend == "cuda",
        # No packing: bins of max_length would change how many samples make one optimizer step
        # (a dozen short memories per bin), so the loss curve and the step count would drift from
        # the config. Padding goes away in make_collator instead, sample for sample.
        "packing": False,
        "report_to": "none",
        "disable_tqdm": True,
        "dataloader_num_workers": 0,
    }
    if has_eval:
        wanted["eval_steps"] = cfg.eval_steps or cfg.save_steps
    if cfg.warmup_ratio > 0:
        wanted["warmup_ratio"] = cfg.warmup_ratio
    if cfg.optim:
        wanted["optim"] = cfg.optim
    return SFTConfig(**compat_kwargs(SFTConfig, wanted))


def make_callback(run: RunDir, cfg: TrainConfig) -> Any:
    import torch
    from transformers import TrainerCallback

    fault = os.environ.get(FAULT_ENV, "")
    fault_step = int(fault[4:]) if fault.startswith("oom@") and fault[4:].isdigit() else None

    class Progress(TrainerCallback):
        """One progress.jsonl line and one human log line per logging step."""

        def __init__(self) -> None:
            self.t0 = self.t_last = time.time()
            self.step0 = self.step_last = 0

        def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            self.t0 = self.t_last = time.time()
            self.step0 = self.step_last = state.global_step
            how = f"resuming at step {state.global_step}" if state.global_step else "starting"
            log(f"training {state.max_steps} steps ({how}); effective batch {cfg.samples_per_step}")

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            if fault_step is not None and state.global_step >= fault_step:
                raise torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate 2.00 GiB ({FAULT_ENV})")

        def on_save(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            log(f"checkpoint saved at step {state.global_step}")

        def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None,
                   **kw: Any) -> None:
            logs = logs or {}
            if "loss" in logs:
                self._write(self._train_line(state, logs))
            elif "eval_loss" in logs:
                self._write({"phase": "eval", "step": state.global_step, "total_steps": state.max_steps,
                             "epoch": _round(state.epoch), "eval_loss": _num(logs["eval_loss"]),
                             "time": time.time()})
                log(f"eval at step {state.global_step}: eval_loss {logs['eval_loss']:.4f}")

        def _train_line(self, state: Any, logs: dict[str, Any]) -> dict[str, Any]:
            now = time.time()
            step, total = state.global_step, state.max_steps
            dt, dsteps = now - self.t_last, step - self.step_last
            sps = dsteps * cfg.samples_per_step / dt if dt > 0 and dsteps > 0 else None
            done = step - self.step0
            eta = (now - self.t0) / done * (total - step) if done > 0 else None
            self.t_last, self.step_last = now, step
            line = {"phase": "train", "step": step, "total_steps": total, "epoch": _round(state.epoch),
                    "loss": _num(logs.get("loss")), "learning_rate": _num(logs.get("learning_rate")),
                    "samples_per_s": _round(sps), "eta_s": _round(eta), "time": now}
            line.update(gpu_stats())
            log(f"step {step}/{total} epoch {_fmt(line['epoch'], '.2f')} loss {_fmt(line['loss'], '.4f')} "
                f"lr {_fmt(line['learning_rate'], '.2e')} {_fmt(sps, '.1f')} samples/s "
                f"eta {_fmt(eta, '.0f')} s")
            return line

        def _write(self, line: dict[str, Any]) -> None:
            with run.progress.open("a") as fh:
                fh.write(json.dumps(line) + "\n")

    return Progress()


def _num(value: Any) -> float | None:
    try:
        f = float(value)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _round(value: Any, digits: int = 4) -> float | None:
    f = _num(value)
    return None if f is None else round(f, digits)


def _fmt(value: float | None, spec: str) -> str:
    return "?" if value is None else format(value, spec)


def gpu_stats() -> dict[str, Any]:
    import torch

    if not torch.cuda.is_available():
        return {}
    stats: dict[str, Any] = {}
    try:
        free, total = torch.cuda.mem_get_info()
        stats["gpu_mem_used"] = round((total - free) / 2**20)
        stats["gpu_mem_total"] = round(total / 2**20)
        stats["gpu_util"] = torch.cuda.utilization()
    except Exception:  # utilization needs pynvml; memory alone is still worth reporting
        pass
    return stats


def packed_masks_supported() -> bool:
    """Whether this transformers builds block-diagonal masks from position_ids for sdpa/eager.

    Its masking_utils turns "position_ids restart at 0" into one causal block per sample when no
    attention_mask is passed (flash-attention reads the same boundaries from cu_seq_lens). Without
    that, a concatenated row would be one long causal sequence: samples would attend to each other.
    """
    try:
        from transformers import masking_utils
    except ImportError:
        return False
    return hasattr(masking_utils, "find_packed_sequence_indices")


def make_collator(cfg: TrainConfig, tokenizer: Any, backend: str) -> Any | None:
    """trl's collator in padding-free mode, or None for trl's default (padded) one.

    Padding-free without packing: each micro-batch's samples are concatenated into one row, with
    position_ids restarting at 0 per sample and no attention_mask, so no token is padding and no
    sample sees another. The labels (prompt tokens already -100 from trl's completion mask) travel
    with the tokens, and the batches hold the same samples in the same order as padded ones, so the
    loss is the same. It is passed as our own collator, with SFTConfig.padding_free left off,
    because trl refuses padding_free with max_length unless packing: that way trl still truncates
    every sample to max_length while preparing the dataset.
    """
    if not cfg.padding_free:
        return None
    if backend == "unsloth":
        # unsloth turns padding-free on itself, with its own attention kernels; a collator from us
        # would replace the one it instruments.
        return None
    try:
        from trl.trainer.sft_trainer import DataCollatorForLanguageModeling
    except ImportError:
        return None
    if "padding_free" not in {f.name for f in fields(DataCollatorForLanguageModeling)} or not packed_masks_supported():
        log("note: this trl/transformers cannot keep concatenated samples apart; padding batches instead")
        return None
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return DataCollatorForLanguageModeling(pad_token_id=pad, padding_free=True)


def import_unsloth_first() -> None:
    # Before transformers and trl: unsloth patches them (SFTTrainer included) as it is imported,
    # and only warns when it comes too late.
    import unsloth  # noqa: F401


def build_trainer(cfg: TrainConfig, run: RunDir, backend: str) -> tuple[Any, Any]:
    import inspect

    if backend == "unsloth":
        import_unsloth_first()

    from datasets import Dataset
    from transformers import PrinterCallback, set_seed
    from trl import SFTTrainer

    set_seed(cfg.seed)  # LoRA's initial weights come from the global generator
    model, tokenizer, peft_config = load_model(cfg, backend)
    if not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = CHATML  # a base model without one: plain ChatML
    train_rows = drop_overlong(load_rows(run.dataset, required=True), tokenizer, cfg.max_seq_length)
    if not train_rows:
        raise ConfigProblem(f"no sample fits max_seq_length={cfg.max_seq_length}: raise it")
    eval_rows = drop_overlong(load_rows(run.eval, required=False), tokenizer, cfg.max_seq_length)
    args = sft_args(cfg, run, backend, has_eval=bool(eval_rows))
    params = inspect.signature(SFTTrainer.__init__).parameters
    kwargs: dict[str, Any] = {
        "model": model, "args": args, "train_dataset": Dataset.from_list(train_rows),
        "eval_dataset": Dataset.from_list(eval_rows) if eval_rows else None,
        ("processing_class" if "processing_class" in params else "tokenizer"): tokenizer,
    }
    if peft_config is not None:
        kwargs["peft_config"] = peft_config
    collator = make_collator(cfg, tokenizer, backend)
    if collator is not None:
        kwargs["data_collator"] = collator
    try:
        trainer = SFTTrainer(**kwargs)
    except ValueError as exc:  # e.g. target_modules that the model does not have
        raise ConfigProblem(_one_line(exc)) from exc
    trainer.remove_callback(PrinterCallback)  # it prints raw dicts; our callback writes readable lines
    trainer.add_callback(make_callback(run, cfg))
    return trainer, tokenizer


def export_adapter(trainer: Any, tokenizer: Any, run: RunDir, base_model: str) -> None:
    tmp = run.root / "adapter.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    trainer.model.save_pretrained(str(tmp))
    tokenizer.save_pretrained(str(tmp))
    copy_base_config(base_model, tmp / "base_config.json")
    shutil.rmtree(run.adapter, ignore_errors=True)
    os.replace(tmp, run.adapter)


def copy_base_config(base_model: str, dest: Path) -> None:
    """The base's own config.json beside the adapter: the daemon's GGUF LoRA converter reads it
    (it never downloads the base)."""
    try:
        local = Path(base_model) / "config.json"
        if local.is_file():
            shutil.copyfile(local, dest)
            return
        from huggingface_hub import hf_hub_download

        shutil.copyfile(hf_hub_download(base_model, "config.json"), dest)
    except Exception as exc:  # only a convenience for the adapter route: never fail the run for it
        log(f"note: could not copy the base model's config.json into the adapter ({_one_line(exc)})")


def final_loss(state: Any) -> float | None:
    for entry in reversed(state.log_history):
        if "loss" in entry:
            return _num(entry["loss"])
    return None


def train(cfg: TrainConfig, run: RunDir, started: float) -> dict[str, Any]:
    backend = pick_backend()
    log(f"backend {backend}; base model {cfg.base_model}")
    trainer, tokenizer = build_trainer(cfg, run, backend)
    resume = newest_checkpoint(run)
    seal_progress(run.progress)
    trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    export_adapter(trainer, tokenizer, run, cfg.base_model)
    state = trainer.state
    info = {
        "base_model": cfg.base_model, "final_loss": final_loss(state), "steps": state.global_step,
        "total_steps": state.max_steps, "epochs": _round(state.epoch), "backend": backend,
        "train_samples": len(trainer.train_dataset), "wall_time_s": round(time.time() - started, 2),
        "versions": _versions(),
    }
    write_trained(run, info)
    return info


# --- export (merged GGUF) -----------------------------------------------------------------


def load_beside(name: str, wanted: str) -> Any:
    """``<name>.py``, uploaded beside this file (``wanted`` says what the config asked for)."""
    import importlib

    here = str(Path(__file__).resolve().parent)
    if here not in sys.path:  # `python -I` leaves the script's folder out
        sys.path.insert(0, here)
    try:
        return importlib.import_module(name)
    except ImportError:
        raise ConfigProblem(f"config.json asks for {wanted}, but {name}.py is not next to train.py "
                            f"in {here}: upload it with the trainer") from None


def load_exporter() -> Any:
    """export.py, uploaded beside this file."""
    return load_beside("export", "an export")


def load_evaluator() -> Any:
    """evaluate.py, uploaded beside this file."""
    return load_beside("evaluate", "an evaluation")


def check_export(cfg: TrainConfig) -> Any:
    """Before any training: the export's settings and tools (a bad one is exit 2, not a lost hour)."""
    export = load_exporter()
    try:
        ecfg = export.ExportConfig.from_dict(cfg.export)
        export.check_tools(ecfg)
    except ValueError as exc:
        raise ConfigProblem(f"config.json: {exc}") from None
    except export.ExportProblem as exc:
        raise ConfigProblem(str(exc)) from None
    return ecfg


def run_export(cfg: TrainConfig, run: RunDir, ecfg: Any) -> tuple[dict[str, Any], list[Path]]:
    """(the manifest's ``export`` entry, files to list). Failures are recorded, never raised:
    the adapter the GPU time paid for is shipped whatever happens here."""
    export = load_exporter()

    def progress(line: dict[str, Any]) -> None:
        with run.progress.open("a") as fh:
            fh.write(json.dumps(line) + "\n")

    exporter = export.Exporter(run.root, run.adapter, cfg.base_model, ecfg, progress)
    try:
        info = exporter.run()
    except export.ExportProblem as exc:
        error = str(exc)
    except Exception as exc:
        if is_oom(exc):
            error = "out of memory while building the merged model: " + _one_line(exc)
        else:
            import traceback

            traceback.print_exc()
            error = f"{type(exc).__name__}: {_one_line(exc)}"
    else:
        size = info["size"]
        log(f"export done: {info['file']} ({info['quantize']}, "
            + (f"{size / 1e9:.2f} GB)" if size >= 1e8 else f"{size / 1e6:.2f} MB)"))
        return {"enabled": True, **info}, [run.root / info["file"]]
    progress({"phase": "export", "status": "failed", "error": error, "time": time.time()})
    log(f"export failed, shipping the adapter alone: {error}")
    return {"enabled": True, "error": error}, []


# --- evaluation (the quality gate) ----------------------------------------------------------


def check_evaluation(cfg: TrainConfig, run: RunDir) -> Any:
    """Before any training: the evaluation's settings and inputs."""
    evaluate = load_evaluator()
    try:
        vcfg = evaluate.EvalConfig.from_dict(cfg.evaluate)
        evaluate.check(vcfg, run.root)
    except ValueError as exc:
        raise ConfigProblem(f"config.json: {exc}") from None
    except evaluate.EvaluationProblem as exc:
        raise ConfigProblem(str(exc)) from None
    return vcfg


def run_evaluation(cfg: TrainConfig, run: RunDir, vcfg: Any) -> tuple[dict[str, Any], list[Path]]:
    """(the manifest's ``eval`` entry, files to list). eval.json from an earlier attempt is reused.
    A failure is recorded as ``{"error": ...}`` (no eval.json), never raised: the adapter is still
    shipped, and without numbers the daemon does not promote it."""
    evaluate = load_evaluator()
    done = evaluate.read_result(run.root)
    if done is not None:
        log(f"{evaluate.EVAL_FILE} is there already; not evaluating again")
        return done, [run.root / evaluate.EVAL_FILE]

    def progress(line: dict[str, Any]) -> None:
        with run.progress.open("a") as fh:
            fh.write(json.dumps(line) + "\n")

    seal_progress(run.progress)
    job = evaluate.Evaluation(run.root, run.adapter, cfg.base_model, vcfg, cfg.max_seq_length,
                              cfg.load_in_4bit, progress)
    try:
        return job.run(), [job.out]
    except Exception as exc:
        if is_oom(exc):
            error = "out of memory while evaluating: " + _one_line(exc)
        else:
            import traceback

            traceback.print_exc()
            error = f"{type(exc).__name__}: {_one_line(exc)}"
    progress({"phase": "evaluating", "status": "failed", "error": error, "time": time.time()})
    log(f"evaluation failed, shipping the adapter without numbers: {error}")
    return {"error": error}, []


def restart_for_export() -> None:
    """Replace this process with a fresh run of the same command (see the module docstring)."""
    log("training done; restarting for the evaluation / export with fresh memory")
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {}
    for name in ("torch", "transformers", "peft", "trl", "unsloth"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    return out


# --- entry point --------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> Path:
    parser = argparse.ArgumentParser(description="mhd LoRA trainer (runs on the pod)")
    parser.add_argument("--run-dir", type=Path, default=os.environ.get("MHD_RUN_DIR"),
                        help="run folder with config.json and dataset.jsonl (env MHD_RUN_DIR)")
    ns = parser.parse_args(argv)
    if ns.run_dir is None:
        raise ConfigProblem("no run folder: pass --run-dir DIR or set MHD_RUN_DIR")
    if not Path(ns.run_dir).is_dir():
        raise ConfigProblem(f"run folder {ns.run_dir} does not exist")
    return Path(ns.run_dir)


def read_config(run: RunDir) -> TrainConfig:
    try:
        data = json.loads(run.config.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigProblem(f"config.json is missing in {run.root}") from None
    except (OSError, ValueError) as exc:
        raise ConfigProblem(f"config.json: not valid JSON ({_one_line(exc)})") from None
    return TrainConfig.from_dict(data)


def main(argv: list[str] | None = None, *, restart: bool = False) -> int:
    """``restart``: after training, re-execute this script for the export (the command line does)."""
    started = time.time()
    cfg: TrainConfig | None = None
    try:
        run = RunDir(parse_args(argv))
        prepare_environment()
        if is_complete(run):
            log(f"{run.manifest} is complete; nothing to do")
            return EXIT_OK
        cfg = read_config(run)
        if cfg.unknown:
            log(f"note: ignoring unknown config keys {', '.join(cfg.unknown)}")
        ecfg = check_export(cfg) if cfg.export_enabled else None
        vcfg = check_evaluation(cfg, run) if cfg.evaluate_enabled else None
        info = read_trained(run)
        if info is None:
            load_rows(run.dataset, required=True)  # fail in a second, before minutes of model loading
            info = train(cfg, run, started)
            if (ecfg is not None or vcfg is not None) and restart:
                restart_for_export()
        else:
            log(f"the adapter was trained already ({info.get('steps')} steps); not training again")
        files: list[Path] = []
        if vcfg is not None:
            info["eval"], files = run_evaluation(cfg, run, vcfg)
        known: dict[str, str] = {}
        if ecfg is not None:
            info["export"], exported = run_export(cfg, run, ecfg)
            if exported:
                known[MODEL_GGUF] = info["export"]["sha256"]  # hashed once, by the export
            files += exported
        manifest = write_manifest(run, info, files, known)
    except ConfigProblem as exc:
        print(f"mhd-train: {exc}", file=sys.stderr, flush=True)
        return EXIT_CONFIG
    except BaseException as exc:
        if cfg is not None and not isinstance(exc, KeyboardInterrupt) and is_oom(exc):
            print(f"mhd-train: {oom_advice(cfg)}", file=sys.stderr, flush=True)
            return EXIT_OOM
        raise
    log(f"done: {manifest['steps']} steps, final loss {manifest['final_loss']}, "
        f"{manifest['wall_time_s']} s; adapter in {run.adapter}"
        + (f", model in {run.root / MODEL_GGUF}" if "sha256" in manifest.get("export", {}) else ""))
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main(restart=True))
