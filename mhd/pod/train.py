#!/usr/bin/env python3
"""mhd's trainer: LoRA fine-tuning of ``base_model`` on ``dataset.jsonl``. Runs on the pod.

    python train.py --run-dir DIR        (or MHD_RUN_DIR=DIR python train.py)

The daemon uploads this file with its sibling modules (``TRAINER_FILES`` in
mhd/states/provisioning.py) next to the run's inputs, so none of them imports anything from
``mhd``: only the standard library and each other at module level, and the training stack (torch,
transformers, peft, trl, and unsloth when present) once the inputs have been checked.

    train_config.py   config.json, exit codes, the errors that end the job
    train_rundir.py   the run folder: paths, trained.json / manifest.json listings, checkpoints
    train_models.py   the base model + LoRA for the backend (unsloth, transformers + peft, CPU)
    train_data.py     dataset rows, the padding-free collator
    train_progress.py the callback writing progress.jsonl and train.log lines
    train_loop.py     the SFT arguments, the trainer, training, the adapter
    train_phases.py   after training: the evaluation (evaluate.py) and the export (export.py)
    jsonfiles.py      atomic JSON and append-only JSON lines (shared with evaluate.py)

This file is the entry point, and it re-exports the names the tests and benchmarks use.

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

The evaluation runs right after training, in the same process, on the model training leaves in
memory (reloading a large base for it cost more than the scoring). With the export enabled the
trainer then re-executes itself, so that the merge starts in a fresh process (no training model,
optimizer or CUDA cache left in memory). A relaunch (after a kill, a pod restart, or that re-execution)
finds trained.json and goes straight to the evaluation, loading the base for it, unless eval.json
is there; then the export. An evaluation that fails on the training's model is tried once more
that way, after a restart. A failed export does not fail the job: the manifest
lists the adapter and carries ``"export": {"error": ...}``, so the adapter is still fetched.

Exit codes: 0 done (also: already done), 2 bad config or dataset (one line on stderr),
3 out of memory (the line names the knob), 1 anything else (traceback on stderr).
``pid`` and ``exit_code`` belong to the launcher (run.sh), never to this script.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING or __package__:  # imported as mhd.pod.train (tests; mypy reads this branch)
    from .jsonfiles import seal_progress, write_json_atomic
    from .train_config import (
        DEFAULT_TARGETS,
        EXIT_CONFIG,
        EXIT_CRASH,
        EXIT_OK,
        EXIT_OOM,
        FAULT_ENV,
        ConfigProblem,
        TrainConfig,
        is_oom,
        log,
        one_line,
        oom_advice,
    )
    from .train_data import CHATML, drop_overlong, load_rows, make_collator, packed_masks_supported
    from .train_loop import build_trainer, compat_kwargs, copy_base_config, export_adapter, final_loss, sft_args, train
    from .train_models import (
        _load_plain,
        _load_unsloth,
        check_start_adapter,
        half_dtype,
        import_unsloth_first,
        load_model,
        load_start_weights,
        pick_backend,
        prepare_environment,
        unsloth_load_kwargs,
        unsloth_peft_kwargs,
        versions,
    )
    from .train_phases import (
        MODEL_GGUF,
        check_evaluation,
        check_export,
        for_inference,
        load_beside,
        load_evaluator,
        load_exporter,
        restart_for_export,
        run_evaluation,
        run_export,
    )
    from .train_progress import gpu_stats, make_callback
    from .train_rundir import (
        RunDir,
        adapter_files,
        file_entries,
        is_complete,
        newest_checkpoint,
        read_trained,
        sha256_file,
        write_manifest,
        write_trained,
    )
else:  # run as a script on the pod: the sibling modules are in this file's folder
    _HERE = str(Path(__file__).resolve().parent)
    if _HERE not in sys.path:  # `python -I` leaves the script's folder out
        sys.path.insert(0, _HERE)
    from jsonfiles import seal_progress, write_json_atomic
    from train_config import (
        DEFAULT_TARGETS,
        EXIT_CONFIG,
        EXIT_CRASH,
        EXIT_OK,
        EXIT_OOM,
        FAULT_ENV,
        ConfigProblem,
        TrainConfig,
        is_oom,
        log,
        one_line,
        oom_advice,
    )
    from train_data import CHATML, drop_overlong, load_rows, make_collator, packed_masks_supported
    from train_loop import build_trainer, compat_kwargs, copy_base_config, export_adapter, final_loss, sft_args, train
    from train_models import (
        _load_plain,
        _load_unsloth,
        check_start_adapter,
        half_dtype,
        import_unsloth_first,
        load_model,
        load_start_weights,
        pick_backend,
        prepare_environment,
        unsloth_load_kwargs,
        unsloth_peft_kwargs,
        versions,
    )
    from train_phases import (
        MODEL_GGUF,
        check_evaluation,
        check_export,
        for_inference,
        load_beside,
        load_evaluator,
        load_exporter,
        restart_for_export,
        run_evaluation,
        run_export,
    )
    from train_progress import gpu_stats, make_callback
    from train_rundir import (
        RunDir,
        adapter_files,
        file_entries,
        is_complete,
        newest_checkpoint,
        read_trained,
        sha256_file,
        write_manifest,
        write_trained,
    )

# The names the tests, benchmarks and older callers use (they lived in this file).
__all__ = [
    "CHATML",
    "DEFAULT_TARGETS",
    "EXIT_CONFIG",
    "EXIT_CRASH",
    "EXIT_OK",
    "EXIT_OOM",
    "FAULT_ENV",
    "MODEL_GGUF",
    "ConfigProblem",
    "RunDir",
    "TrainConfig",
    "_load_plain",
    "_load_unsloth",
    "adapter_files",
    "build_trainer",
    "check_evaluation",
    "check_export",
    "check_start_adapter",
    "compat_kwargs",
    "copy_base_config",
    "drop_overlong",
    "export_adapter",
    "file_entries",
    "final_loss",
    "for_inference",
    "gpu_stats",
    "half_dtype",
    "import_unsloth_first",
    "is_complete",
    "is_oom",
    "load_beside",
    "load_evaluator",
    "load_exporter",
    "load_model",
    "load_rows",
    "load_start_weights",
    "log",
    "main",
    "make_callback",
    "make_collator",
    "newest_checkpoint",
    "one_line",
    "oom_advice",
    "packed_masks_supported",
    "parse_args",
    "pick_backend",
    "prepare_environment",
    "read_config",
    "read_trained",
    "restart_for_export",
    "run_evaluation",
    "run_export",
    "seal_progress",
    "sft_args",
    "sha256_file",
    "train",
    "unsloth_load_kwargs",
    "unsloth_peft_kwargs",
    "versions",
    "write_json_atomic",
    "write_manifest",
    "write_trained",
]


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
        raise ConfigProblem(f"config.json: not valid JSON ({one_line(exc)})") from None
    return TrainConfig.from_dict(data)


def main(argv: list[str] | None = None, *, restart: bool = False) -> int:
    """``restart``: after training, re-execute this script for the export, or to retry a failed
    evaluation with the base reloaded (the command line does; in-process callers keep one process)."""
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
        files: list[Path] = []
        info = read_trained(run)
        if info is None:
            load_rows(run.dataset, required=True)  # fail in a second, before minutes of model loading
            info, trainer = train(cfg, run, started)
            again = False
            if vcfg is not None:
                # On the model training just used: a second load of the base would cost more than
                # the scoring itself. A kill from here on relaunches into the evaluation alone.
                ev, files = run_evaluation(cfg, run, vcfg, trainer.model, info["backend"], retry=restart)
                again = "error" in ev and restart  # the fresh process evaluates with the base reloaded
                if not again:
                    info["eval"] = ev
            del trainer
            if restart and (ecfg is not None or again):
                restart_for_export("the evaluation" if again else "the export")
        else:
            log(f"the adapter was trained already ({info.get('steps')} steps); not training again")
        if vcfg is not None and "eval" not in info:
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
