"""What follows training in the same job: the evaluation (evaluate.py) and the export (export.py),
each uploaded beside the trainer and loaded only when config.json asks for it."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING or __package__:  # imported as mhd.pod.<module> (tests; mypy reads this branch)
    from .jsonfiles import append_line, seal_progress
    from .train_config import ConfigProblem, TrainConfig, is_oom, log, one_line
    from .train_rundir import RunDir
else:  # on the pod: train.py runs as a script and put its folder on sys.path
    from jsonfiles import append_line, seal_progress
    from train_config import ConfigProblem, TrainConfig, is_oom, log, one_line
    from train_rundir import RunDir


MODEL_GGUF = "model.gguf"  # export.py's output, listed in the manifest


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


def phase_error(exc: BaseException, doing: str) -> str:
    """One line for a phase that failed (out of memory named as such); the traceback of anything
    unexpected goes to the log. Call it inside the ``except`` block."""
    if is_oom(exc):
        return f"out of memory while {doing}: " + one_line(exc)
    import traceback

    traceback.print_exc()
    return f"{type(exc).__name__}: {one_line(exc)}"


def run_export(cfg: TrainConfig, run: RunDir, ecfg: Any) -> tuple[dict[str, Any], list[Path]]:
    """(the manifest's ``export`` entry, files to list). Failures are recorded, never raised:
    the adapter the GPU time paid for is shipped whatever happens here."""
    export = load_exporter()

    def progress(line: dict[str, Any]) -> None:
        append_line(run.progress, line)

    exporter = export.Exporter(run.root, run.adapter, cfg.base_model, ecfg, progress)
    try:
        info = exporter.run()
    except export.ExportProblem as exc:
        error = str(exc)
    except Exception as exc:
        error = phase_error(exc, "building the merged model")
    else:
        size = info["size"]
        log(f"export done: {info['file']} ({info['quantize']}, "
            + (f"{size / 1e9:.2f} GB)" if size >= 1e8 else f"{size / 1e6:.2f} MB)"))
        return {"enabled": True, **info}, [run.root / info["file"]]
    progress({"phase": "export", "status": "failed", "error": error, "time": time.time()})
    log(f"export failed, shipping the adapter alone: {error}")
    return {"enabled": True, "error": error}, []


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


def run_evaluation(cfg: TrainConfig, run: RunDir, vcfg: Any, trained: Any = None, backend: str = "cpu",
                   retry: bool = False) -> tuple[dict[str, Any], list[Path]]:
    """(the manifest's ``eval`` entry, files to list). eval.json from an earlier attempt is reused.

    ``trained``: the trainer's model, still in memory after training (``backend`` trained it); the
    evaluation scores it instead of loading the base again. None (a relaunch, or the retry) loads it. ``retry`` says the
    caller evaluates again in a fresh process when this fails.

    A failure is recorded as ``{"error": ...}`` (no eval.json), never raised: the adapter is still
    shipped, and without numbers the daemon does not promote it."""
    evaluate = load_evaluator()
    done = evaluate.read_result(run.root)
    if done is not None:
        log(f"{evaluate.EVAL_FILE} is there already; not evaluating again")
        return done, [run.root / evaluate.EVAL_FILE]

    def progress(line: dict[str, Any]) -> None:
        append_line(run.progress, line)

    seal_progress(run.progress)
    job = evaluate.Evaluation(run.root, run.adapter, cfg.base_model, vcfg, cfg.max_seq_length,
                              cfg.load_in_4bit, progress)
    try:
        return job.run(None if trained is None else for_inference(trained, backend)), [job.out]
    except Exception as exc:
        error = phase_error(exc, "evaluating")
    again = trained is not None and retry
    progress({"phase": "evaluating", "status": "failed", "error": error, "retry": again, "time": time.time()})
    if again:
        log(f"evaluation on the training's model failed ({error}); evaluating again with the base reloaded")
    else:
        log(f"evaluation failed, shipping the adapter without numbers: {error}")
    return {"error": error}, []


def for_inference(model: Any, backend: str) -> Any:
    """The trainer's model switched to inference, the way its backend wants it."""
    if backend == "unsloth":
        # unsloth's documented switch: its inference kernels (and generate) instead of training's.
        from unsloth import FastLanguageModel

        FastLanguageModel.for_inference(model)
    return model


def restart_for_export(why: str = "the export") -> None:
    """Replace this process with a fresh run of the same command (see train.py's docstring)."""
    log(f"training done; restarting for {why} with fresh memory")
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])
