"""Typed configuration: one TOML file plus ``MHD_*`` environment overrides.

Env overrides: ``MHD_THRESHOLD=10`` sets a top-level key, ``MHD_SSH__HOST=gpu1`` a key of a
section (double underscore). Values are read as TOML literals when they parse, else as strings.
Any bad value becomes one :class:`ConfigError` naming the key, the value and what is expected.
"""

from __future__ import annotations

import os
import re
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from mhd.errors import ConfigError

ENV_PREFIX = "MHD_"
# MHD_* variables that are not config keys.
NOT_CONFIG_ENV = frozenset({"MHD_CONFIG", "MHD_DEBUG_PAUSE"})
SYSTEM_CONFIG = Path("/etc/mhd/config.toml")

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|h|d)?\s*$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, None: 1}


def parse_duration(value: object) -> float:
    """``90``, ``"90s"``, ``"15m"``, ``"2h"`` → seconds."""
    if isinstance(value, bool):
        raise ValueError("expected a duration like 90, '15m' or '2h'")
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str) and (m := _DURATION.match(value)):
        return float(m.group(1)) * _UNITS[m.group(2)]
    raise ValueError("expected a duration like 90, '15m' or '2h'")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class SshConfig(_Section):
    host: str | None = None
    port: int = Field(22, ge=1, le=65535)
    user: str = "root"
    key_file: Path | None = None
    known_hosts: Path | None = None
    keepalive_interval: float = Field(15.0, gt=0)
    keepalive_count_max: int = Field(4, ge=1)
    connect_deadline_s: float = Field(600.0, gt=0)
    remote_root: str = "/workspace/mhd"


class RunpodConfig(_Section):
    api_key_file: Path | None = None
    api_url: str = "https://api.runpod.io/v2"
    gpu_types: list[str] = ["NVIDIA RTX A6000", "NVIDIA A40", "NVIDIA GeForce RTX 4090"]
    gpu_count: int = Field(1, ge=1)
    # RunPod's stock PyTorch image (CPython 3.11, the lock's): the pod installs the trainer's
    # packages from the lock on its first run (training.bootstrap), into /workspace when a volume
    # is there. The custom image (image/README.md, e.g. ghcr.io/<you>/mhd-trainer:0.1.0) starts
    # training minutes sooner.
    image: str = "runpod/pytorch:2.8.0-py3.11-cuda12.8.1-cudnn-devel-ubuntu22.04"
    # The pod's start command: "auto" sends mhd's (image/start.sh: sshd, installed if missing,
    # key-only login, the container's env for SSH sessions) unless the image is an mhd-trainer
    # image, which runs it itself; "always" / "never" force it.
    start_script: Literal["auto", "always", "never"] = "auto"
    cloud: Literal["SECURE", "COMMUNITY", "ALL"] = "SECURE"
    disk_gb: int = Field(100, ge=10)
    volume_gb: int = Field(0, ge=0)
    network_volume_id: str | None = None
    ssh_key_file: Path | None = None
    max_unattended: float = 7200.0
    reap_interval_s: float = Field(300.0, gt=0)
    # Where run folders live on the pod (the image's large disk).
    remote_root: str = "/workspace/mhd"
    ready_deadline_s: float = Field(900.0, gt=0)
    # Interruptible (spot) pods cost about half; a preempted run resumes on a new pod from its
    # newest checkpoint. REST's create body takes a plain ``interruptible`` flag and no bid: the
    # pod is billed at RunPod's spot price for the GPU type.
    interruptible: bool = False
    # Preemptions a run rides out on interruptible pods; after that (or when RunPod has no
    # interruptible capacity) ``on_preemption`` decides: "resume_on_demand" rents an on-demand
    # pod, "resume" keeps to interruptible pods, "fail" ends the run.
    max_preemptions: int = Field(3, ge=0)
    on_preemption: Literal["resume", "resume_on_demand", "fail"] = "resume_on_demand"

    _dur = field_validator("max_unattended", mode="before")(lambda v: parse_duration(v))

    @field_validator("gpu_types")
    @classmethod
    def _non_empty(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("expected at least one GPU type id")
        return v


class BudgetConfig(_Section):
    max_usd_per_run: float | None = Field(None, gt=0)
    max_hours_per_run: float | None = Field(None, gt=0)


class TrainingConfig(_Section):
    """The trainer's keys; passed as-is into the pod's ``config.json``."""

    base_model: str = "Qwen/Qwen3-8B"
    lora_rank: int = Field(8, ge=1)
    lora_alpha: int = Field(16, ge=1)
    lora_dropout: float = Field(0.05, ge=0, lt=1)
    num_train_epochs: float = Field(2, gt=0)
    learning_rate: float = Field(2e-4, gt=0)
    per_device_train_batch_size: int = Field(1, ge=1)
    gradient_accumulation_steps: int = Field(16, ge=1)
    max_seq_length: int = Field(2048, ge=16)
    target_modules: list[str] = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    load_in_4bit: bool = True
    save_steps: int = Field(50, ge=1)
    logging_steps: int = Field(1, ge=1)
    seed: int = 42
    # Trainer script to upload instead of the bundled one (tests, experiments).
    script: Path | None = None
    # Interpreter on the remote host (the pod image's python, or this venv for `local`).
    python: str = "python3"
    # The pod's packages from mhd/pod/requirements.lock (bootstrap.sh, before the trainer): "auto"
    # installs them when `python` lacks torch/transformers/peft/trl/datasets (a stock image),
    # "always" whatever it has, "never" trusts `python` as it is.
    bootstrap: Literal["auto", "always", "never"] = "auto"
    # Extra keys merged into config.json (forward-compatible knobs of the trainer).
    extra: dict[str, Any] = {}
    # "incremental": start from the promoted adapter and train on the memories no promoted model
    # has seen plus a replay sample of older ones; a full run still comes when there is no adapter
    # on this base and LoRA shape, when the served model holds a forgotten memory, and every
    # `full_every` runs (mhd/dataset/incremental.py). "full" trains from the base on all memories.
    mode: Literal["full", "incremental"] = "full"
    # Replayed (already learned) memories per new one, against forgetting: 0.3 → 3 per 10 new.
    replay_fraction: float = Field(0.3, ge=0, le=10)
    # Every Nth run in a chain is a full one: drift from many small runs does not pile up forever.
    full_every: int = Field(5, ge=1)
    # An incremental run's learning rate is ``learning_rate`` times this. It starts at its parent's
    # minimum and sees a few dozen samples: the full rate throws it off that minimum before it has
    # learned the new ones (benchmarks/RESULTS.md, "Incremental vs full").
    incremental_lr_scale: float = Field(0.5, gt=0, le=1)


class DatasetConfig(_Section):
    persona_name: str = "Owner"
    system_prompt: str | None = None
    voice: Literal["owner", "assistant"] = "owner"
    types: list[str] = [
        "conversation",
        "inner_dialogue",
        "reflection",
        "reflection_summary",
        "dream",
        "daydream",
        "observation",
        "summary",
        "audio",
    ]
    min_chars: int = Field(20, ge=0)
    max_samples: int = Field(500, ge=1)
    max_file_bytes: int = Field(1_000_000, ge=1024)
    holdout_fraction: float = Field(0.0, ge=0, lt=1)
    holdout_min: int = Field(0, ge=0)  # set from [eval] min_count when the gate is on
    half_life_days: float = Field(30.0, gt=0)
    not_ready_grace_s: float = Field(10.0, ge=0)


class MergeConfig(_Section):
    mode: Literal["ollama", "peft", "none"] | None = None
    ollama_url: str | None = None
    base: str | None = None
    model_prefix: str = "mhd"
    keep: int = Field(3, ge=1)
    route: Literal["auto", "adapter", "merged"] = "auto"
    quantize: str = "q4_K_M"
    # Where the pod has llama.cpp (convert_hf_to_gguf.py, llama-quantize) for the merged route.
    llama_cpp_dir: str = "/opt/llama.cpp"
    # Ollama chat template (Go template) for the merged model; unset: Ollama derives it from the GGUF.
    template: str | None = None
    # peft mode: local HF base to merge into (defaults to training.base_model).
    base_model_path: str | None = None

    @property
    def effective_mode(self) -> str:
        if self.mode is not None:
            return self.mode
        return "ollama" if self.ollama_url else "none"


class EvalConfig(_Section):
    """The quality gate: a run's model is promoted only if it beats the base (and today's model).

    ``enabled = false`` promotes every finished run unchecked: unsafe for an unattended daemon.
    """

    enabled: bool = True
    # Held-out memories: chosen by key (stable across runs), never trained on.
    fraction: float = Field(0.1, gt=0, lt=0.5)
    min_count: int = Field(8, ge=1)
    # held-out NLL(new) ≤ NLL(base) * (1 - min_gain)
    min_gain: float = Field(0.02, ge=0, lt=1)
    # held-out NLL(new) ≤ NLL(current) * (1 + tolerance), when a model is promoted already
    tolerance: float = Field(0.01, ge=0)
    # probe NLL(new) ≤ probe NLL(base) * (1 + max_probe_regression)
    max_probe_regression: float = Field(0.05, ge=0)
    generate: int = Field(3, ge=0, le=20)
    max_new_tokens: int = Field(48, ge=1, le=512)


class ForgetConfig(_Section):
    """What a forgotten memory (file deleted, ``trainingConsent: false``, `mhd forget`) sets off.

    ``retrain``: a run without it starts at once (threshold bypassed; budget and the failed-run
    cooldown still apply), and once its model is promoted every model and file holding the memory
    is removed. ``flag``: nothing automatic; status shows the models, `mhd forget --purge` removes.
    """

    policy: Literal["retrain", "flag"] = "retrain"


class WebConfig(_Section):
    enabled: bool = True
    listen: str = "127.0.0.1:8765"
    token: str | None = None

    @field_validator("listen")
    @classmethod
    def _hostport(cls, v: str) -> str:
        host, sep, port = v.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
            raise ValueError("expected HOST:PORT, e.g. 127.0.0.1:8765")
        return v


class LocalConfig(_Section):
    root: Path | None = None  # default <state_dir>/pods


class RetryConfig(_Section):
    base_s: float = Field(1.0, gt=0)
    max_s: float = Field(60.0, gt=0)
    state_deadline_s: float = Field(1800.0, gt=0)
    # Relaunches of a trainer that died by a signal (OOM killer, pod hiccup) before giving up.
    max_job_launches: int = Field(3, ge=1)
    # How long Aborting keeps trying to terminate before handing the pod to the reaper.
    abort_deadline_s: float = Field(600.0, gt=0)
    # After a run that did not succeed, how long the threshold trigger waits before another try
    # (`mhd train` and the schedule are not held).
    failed_run_cooldown_s: float = Field(3600.0, ge=0)
    # A failed merge (the adapter is here, the pod gone) is retried after merge_base_s, doubling
    # up to merge_max_s; the threshold rents no pod while it waits.
    merge_base_s: float = Field(60.0, gt=0)
    merge_max_s: float = Field(3600.0, gt=0)


class Config(_Section):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, validate_default=True)

    memory_dir: Path = Path("~/metahuman/memory/episodic")
    state_dir: Path = Path("~/.local/state/mhd")
    db_url: str | None = None
    threshold: int = Field(50, ge=1)
    schedule: str | None = None
    provider: Literal["local", "ssh", "runpod"] = "local"
    socket: Path | None = None
    socket_group: str | None = None
    debounce_s: float = Field(5.0, ge=0)
    poll_interval_s: float = Field(5.0, gt=0)
    heartbeat_interval_s: float = Field(60.0, gt=0)
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

    ssh: SshConfig = Field(default_factory=SshConfig)
    runpod: RunpodConfig = Field(default_factory=RunpodConfig)
    budget: BudgetConfig = Field(default_factory=BudgetConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    dataset: DatasetConfig = Field(default_factory=DatasetConfig)
    merge: MergeConfig = Field(default_factory=MergeConfig)
    web: WebConfig = Field(default_factory=WebConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    forget: ForgetConfig = Field(default_factory=ForgetConfig)
    local: LocalConfig = Field(default_factory=LocalConfig)
    retry: RetryConfig = Field(default_factory=RetryConfig)

    @field_validator("memory_dir", "state_dir", "socket", mode="after")
    @classmethod
    def _expand(cls, v: Path | None) -> Path | None:
        return None if v is None else Path(os.path.expandvars(str(v))).expanduser()

    @field_validator("schedule")
    @classmethod
    def _cron(cls, v: str | None) -> str | None:
        if v is None or not v.strip():
            return None
        from apscheduler.triggers.cron import CronTrigger

        try:
            CronTrigger.from_crontab(v)
        except ValueError as exc:
            raise ValueError(f"expected a 5-field cron expression like '0 3 * * *' ({exc})") from None
        return v

    @model_validator(mode="after")
    def _provider_needs(self) -> Config:
        if self.provider == "ssh" and not self.ssh.host:
            raise ValueError("ssh.host: provider 'ssh' needs [ssh] host")
        return self

    # Derived paths -------------------------------------------------------------------------
    @property
    def db_path_url(self) -> str:
        return self.db_url or f"sqlite:///{self.state_dir / 'mhd.db'}"

    @property
    def socket_path(self) -> Path:
        if self.socket is not None:
            return self.socket
        runtime = os.environ.get("RUNTIME_DIRECTORY")
        if runtime:
            return Path(runtime.split(":")[0]) / "mhd.sock"
        return self.state_dir / "mhd.sock"

    @property
    def runs_dir(self) -> Path:
        return self.state_dir / "runs"

    @property
    def local_root(self) -> Path:
        return self.local.root or self.state_dir / "pods"


def default_config_path() -> Path:
    xdg = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    user = Path(xdg) / "mhd" / "config.toml"
    if user.exists() or not SYSTEM_CONFIG.exists():
        return user
    return SYSTEM_CONFIG


def _env_value(raw: str) -> Any:
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw


def _apply_env(data: dict[str, Any], environ: dict[str, str]) -> None:
    for name, raw in environ.items():
        if not name.startswith(ENV_PREFIX) or name in NOT_CONFIG_ENV:
            continue
        parts = [p.lower() for p in name[len(ENV_PREFIX) :].split("__") if p]
        if not parts:
            continue
        target = data
        for p in parts[:-1]:
            target = target.setdefault(p, {})
            if not isinstance(target, dict):
                raise ConfigError(".".join(parts), raw, "a section, not a value")
        target[parts[-1]] = _env_value(raw)


def _first_error(exc: ValidationError, data: dict[str, Any]) -> ConfigError:
    err = exc.errors()[0]
    loc = [str(p) for p in err["loc"]]
    msg = str(err["msg"]).removeprefix("Value error, ")
    if not loc and ": " in msg and msg.split(": ", 1)[0].replace(".", "").isidentifier():
        key, msg = msg.split(": ", 1)
        loc = key.split(".")
    value: Any = err.get("input")
    if err["type"] == "extra_forbidden":
        msg = "a known key (see README, 'Config reference'); this one is unknown"
    elif err["type"] == "missing":
        value, msg = None, "a value (required)"
    else:
        msg = msg[0].lower() + msg[1:] if msg else "a valid value"
        msg = msg.removeprefix("expected ").removeprefix("input should be ")
    if not loc:
        loc = ["(config)"]
    # Show what the user wrote, not pydantic's wrapped model.
    if isinstance(value, dict) and loc:
        cursor: Any = data
        for p in loc:
            cursor = cursor.get(p) if isinstance(cursor, dict) else None
        value = cursor
    return ConfigError(".".join(loc), value, msg)


def load_config(path: Path | None = None, environ: dict[str, str] | None = None) -> Config:
    """Read the TOML file (missing file = all defaults) and apply env overrides."""
    environ = dict(os.environ if environ is None else environ)
    if path is None and environ.get("MHD_CONFIG"):
        path = Path(environ["MHD_CONFIG"])
    path = path or default_config_path()
    data: dict[str, Any] = {}
    if path.exists():
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(str(path), "(file)", f"valid TOML ({exc})") from None
        except OSError as exc:
            raise ConfigError(str(path), "(file)", f"a readable file ({exc.strerror})") from None
    _apply_env(data, environ)
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        raise _first_error(exc, data) from None
