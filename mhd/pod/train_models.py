"""The base model with LoRA, loaded for the backend at hand (unsloth, plain transformers + peft, CPU),
and the process settings that go before it."""

from __future__ import annotations

import importlib.util
import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING or __package__:  # imported as mhd.pod.<module> (tests; mypy reads this branch)
    from .train_config import ConfigProblem, TrainConfig, is_oom, one_line
else:  # on the pod: train.py runs as a script and put its folder on sys.path
    from train_config import ConfigProblem, TrainConfig, is_oom, one_line


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


def import_unsloth_first() -> None:
    # Before transformers and trl: unsloth patches them (SFTTrainer included) as it is imported,
    # and only warns when it comes too late.
    import unsloth  # noqa: F401


def load_model(cfg: TrainConfig, backend: str, start: Path | None = None) -> tuple[Any, Any, Any]:
    """(model, tokenizer, peft_config or None when the model already carries LoRA).

    ``start``: an adapter folder whose weights become the LoRA's starting point (incremental
    training), trainable; its shape must be the config's.
    """
    if start is not None:
        check_start_adapter(cfg, start)
    try:
        if backend == "unsloth":
            return _load_unsloth(cfg, start)
        model, tokenizer, peft_config = _load_plain(cfg, backend)
    except (OSError, ValueError) as exc:
        if is_oom(exc):
            raise
        raise ConfigProblem(f"base_model {cfg.base_model!r} could not be loaded: {one_line(exc)}") from exc
    if start is None:
        return model, tokenizer, peft_config
    from peft import PeftModel

    # The adapter's own config (the same shape, checked above) and its weights, left trainable:
    # the trainer gets a PeftModel and no peft_config, as on the unsloth path.
    return PeftModel.from_pretrained(model, str(start), is_trainable=True), tokenizer, None


def check_start_adapter(cfg: TrainConfig, start: Path) -> None:
    """The daemon plans incremental runs only for the same shape; a mismatch here is a bad input."""
    import json

    try:
        have = json.loads((start / "adapter_config.json").read_text())
    except (OSError, ValueError) as exc:
        raise ConfigProblem(f"init_adapter {start.name}: adapter_config.json unreadable ({one_line(exc)})") from None
    if not (start / "adapter_model.safetensors").is_file():
        raise ConfigProblem(f"init_adapter {start.name}: adapter_model.safetensors is missing")
    want = {"r": cfg.lora_rank, "lora_alpha": cfg.lora_alpha, "target_modules": sorted(cfg.target_modules)}
    got = {"r": have.get("r"), "lora_alpha": have.get("lora_alpha"),
           "target_modules": sorted(have.get("target_modules") or [])}
    if got != want:
        raise ConfigProblem(f"init_adapter {start.name} has LoRA shape {got}, this run's config {want}: "
                            "train a full run (training.mode = \"full\")")


def _load_unsloth(cfg: TrainConfig, start: Path | None = None) -> tuple[Any, Any, Any]:
    from unsloth import FastLanguageModel  # before transformers/trl: it patches them on import

    model, tokenizer = FastLanguageModel.from_pretrained(**unsloth_load_kwargs(cfg, half_dtype()))
    model = FastLanguageModel.get_peft_model(model, **unsloth_peft_kwargs(cfg))
    if start is not None:
        # unsloth's own LoRA (its fast kernels, its gradient checkpointing) with the start's weights
        # copied in: the same tensors PeftModel.from_pretrained would load, in unsloth's modules.
        load_start_weights(model, start)
    return model, tokenizer, None


def load_start_weights(model: Any, start: Path) -> None:
    """Copy ``start``'s LoRA tensors into the PeftModel's (trainable) adapter; every one must land."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    weights = load_file(str(start / "adapter_model.safetensors"))
    result = set_peft_model_state_dict(model, weights)
    unexpected = list(getattr(result, "unexpected_keys", []) or [])
    if unexpected:
        raise ConfigProblem(f"init_adapter {start.name}: {len(unexpected)} tensor(s) fit no LoRA module of "
                            f"this model (e.g. {unexpected[0]})")


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


def versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {}
    for name in ("torch", "transformers", "peft", "trl", "unsloth"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    return out
