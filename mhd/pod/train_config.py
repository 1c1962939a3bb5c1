"""The trainer's config.json, and how the job ends when it is wrong (exit 2) or too big (exit 3)."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, fields
from typing import Any

EXIT_OK, EXIT_CRASH, EXIT_CONFIG, EXIT_OOM = 0, 1, 2, 3
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# Test seam: "oom@N" raises a CUDA-style OOM at step N, to exercise the exit-3 path on CPU
# (export.py reads "kill@<phase>" from the same variable).
FAULT_ENV = "MHD_TRAIN_FAULT"


class ConfigProblem(Exception):
    """Bad config or dataset: exit 2 with this one-line message."""


def log(msg: str) -> None:
    print(f"{time.strftime('%Y-%m-%d %H:%M:%S')} mhd-train: {msg}", flush=True)


def one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:300] or type(exc).__name__


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
    # Incremental training: a folder in the run dir holding the adapter to start from (the served
    # one, uploaded as current_adapter/), loaded as trainable LoRA weights instead of fresh ones.
    init_adapter: str | None = None
    init_run: str | None = None  # the run that adapter came from (for the log)
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
