"""progress.jsonl and train.log while training: one line each per logging step (the trainer callback)."""

from __future__ import annotations

import math
import os
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING or __package__:  # imported as mhd.pod.<module> (tests; mypy reads this branch)
    from .jsonfiles import append_line
    from .train_config import FAULT_ENV, TrainConfig, log
    from .train_rundir import RunDir
else:  # on the pod: train.py runs as a script and put its folder on sys.path
    from jsonfiles import append_line
    from train_config import FAULT_ENV, TrainConfig, log
    from train_rundir import RunDir


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
                             "epoch": rounded(state.epoch), "eval_loss": as_float(logs["eval_loss"]),
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
            line = {"phase": "train", "step": step, "total_steps": total, "epoch": rounded(state.epoch),
                    "loss": as_float(logs.get("loss")), "learning_rate": as_float(logs.get("learning_rate")),
                    "samples_per_s": rounded(sps), "eta_s": rounded(eta), "time": now}
            line.update(gpu_stats())
            log(f"step {step}/{total} epoch {_fmt(line['epoch'], '.2f')} loss {_fmt(line['loss'], '.4f')} "
                f"lr {_fmt(line['learning_rate'], '.2e')} {_fmt(sps, '.1f')} samples/s "
                f"eta {_fmt(eta, '.0f')} s")
            return line

        def _write(self, line: dict[str, Any]) -> None:
            append_line(run.progress, line)

    return Progress()


def as_float(value: Any) -> float | None:
    try:
        f = float(value)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def rounded(value: Any, digits: int = 4) -> float | None:
    f = as_float(value)
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
