"""Training itself: the SFT arguments, the trainer, the run, and the adapter it leaves in adapter/."""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING or __package__:  # imported as mhd.pod.<module> (tests; mypy reads this branch)
    from . import train_models as models
    from .jsonfiles import seal_progress
    from .train_config import ConfigProblem, TrainConfig, log, one_line
    from .train_data import CHATML, drop_overlong, load_rows, make_collator
    from .train_progress import as_float, make_callback, rounded
    from .train_rundir import RunDir, newest_checkpoint, write_trained
else:  # on the pod: train.py runs as a script and put its folder on sys.path
    import train_models as models
    from jsonfiles import seal_progress
    from train_config import ConfigProblem, TrainConfig, log, one_line
    from train_data import CHATML, drop_overlong, load_rows, make_collator
    from train_progress import as_float, make_callback, rounded
    from train_rundir import RunDir, newest_checkpoint, write_trained


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
        have = ", ".join(f"{n} {v}" for n, v in models.versions().items() if n in ("trl", "transformers"))
        raise ConfigProblem(f"{getattr(cls, '__name__', cls)} of this trl/transformers ({have}) "
                            f"has no option {', '.join(repr(k) for k in missing)}: the pod's packages do not match "
                            "the lock (mhd/pod/requirements.lock)")
    return out


def sft_args(cfg: TrainConfig, run: RunDir, backend: str, has_eval: bool) -> Any:
    import torch
    from trl import SFTConfig

    half = None if backend == "cpu" else models.half_dtype()
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


def build_trainer(cfg: TrainConfig, run: RunDir, backend: str) -> tuple[Any, Any]:
    import inspect

    if backend == "unsloth":
        models.import_unsloth_first()

    from datasets import Dataset
    from transformers import PrinterCallback, set_seed
    from trl import SFTTrainer

    set_seed(cfg.seed)  # LoRA's initial weights come from the global generator
    start = run.root / cfg.init_adapter if cfg.init_adapter else None
    if start is not None:
        log(f"incremental: starting from the adapter of run {cfg.init_run or '?'} ({cfg.init_adapter}/)")
    model, tokenizer, peft_config = models.load_model(cfg, backend, start)
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
        raise ConfigProblem(one_line(exc)) from exc
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
        log(f"note: could not copy the base model's config.json into the adapter ({one_line(exc)})")


def final_loss(state: Any) -> float | None:
    for entry in reversed(state.log_history):
        if "loss" in entry:
            return as_float(entry["loss"])
    return None


def train(cfg: TrainConfig, run: RunDir, started: float) -> tuple[dict[str, Any], Any]:
    """(trained.json's summary, the trainer: its model is still loaded, for the evaluation)."""
    backend = models.pick_backend()
    log(f"backend {backend}; base model {cfg.base_model}")
    trainer, tokenizer = build_trainer(cfg, run, backend)
    resume = newest_checkpoint(run)
    seal_progress(run.progress)
    trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    export_adapter(trainer, tokenizer, run, cfg.base_model)
    state = trainer.state
    info = {
        "base_model": cfg.base_model, "final_loss": final_loss(state), "steps": state.global_step,
        "total_steps": state.max_steps, "epochs": rounded(state.epoch), "backend": backend,
        "train_samples": len(trainer.train_dataset), "wall_time_s": round(time.time() - started, 2),
        "versions": models.versions(),
    }
    write_trained(run, info)
    return info, trainer
