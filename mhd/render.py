"""Terminal views (rich) of the status and run history."""

from __future__ import annotations

import time
from typing import Any

from rich.console import Group
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

SPARKS = "▁▂▃▄▅▆▇█"


def sparkline(values: list[float], width: int = 40) -> str:
    if not values:
        return ""
    if len(values) > width:
        step = len(values) / width
        values = [values[int(i * step)] for i in range(width)]
    lo, hi = min(values), max(values)
    span = (hi - lo) or 1.0
    return "".join(SPARKS[min(len(SPARKS) - 1, int((v - lo) / span * (len(SPARKS) - 1)))] for v in values)


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = int(seconds)
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def render_status(st: dict[str, Any]) -> Group:
    t = Table.grid(padding=(0, 2))
    t.add_column(style="bold")
    t.add_column()
    t.add_row("state", Text(st["state"], style="green" if st["state"] == "Idle" else "yellow"))
    t.add_row("pending memories", f"{st['pending_memories']} / threshold {st['threshold']}")
    parts: list[Any] = [t]
    if st.get("run_id"):
        p = st["progress"]
        t.add_row("run", st["run_id"])
        step, total = p.get("step"), p.get("total_steps")
        t.add_row("step", f"{step if step is not None else '-'} / {total if total is not None else '-'}"
                  + (f"  ({p['phase']})" if p.get("phase") and p["phase"] != "train" else ""))
        t.add_row("loss", f"{p['loss']:.4f}" if p.get("loss") is not None else "-")
        t.add_row("ETA", duration(p.get("eta_s")))
        t.add_row("elapsed", duration(st.get("elapsed_s")))
        t.add_row("cost so far", f"${st.get('cost_usd') or 0:.2f}"
                  + (f" (${st['cost_per_hr']:.3f}/h)" if st.get("cost_per_hr") else ""))
        run = st.get("run") or {}
        if run.get("pod_interruptible") or run.get("preemptions"):
            t.add_row("pod", ("interruptible" if run.get("pod_interruptible") else "on-demand")
                      + f", {run.get('preemptions') or 0} preemption(s) so far"
                      + (f", checkpoint step {run['checkpoint_step']} kept here" if run.get("checkpoint_step") else ""))
        gpu = st.get("gpu")
        if gpu:
            t.add_row("GPU", f"{gpu.get('gpu_util', '-')}% util, {gpu.get('gpu_mem_used', '-')}"
                             f"/{gpu.get('gpu_mem_total', '-')} MiB")
        if st.get("loss_history"):
            t.add_row("loss curve", sparkline(st["loss_history"]))
        if step is not None and total:
            parts.append(ProgressBar(total=float(total), completed=float(step), width=50))
    elif st.get("last_run"):
        last = st["last_run"]
        t.add_row("last run", f"{last['id']}: {last['outcome'] or last['state']}"
                  + (f" — {last['error']}" if last.get("error") else ""))
        if (ev := last.get("eval")) and last.get("outcome") != "rejected":
            t.add_row("quality gate", str(ev.get("reason")))
    if mw := st.get("merge_waiting"):
        when = time.strftime("%H:%M:%S", time.localtime(mw["next_retry_at"])) if mw.get("next_retry_at") else "-"
        t.add_row("merge waiting", f"run {mw['run_id']}: {mw['attempts']} attempt(s), next at {when} "
                  f"(now: `mhd merge {mw['run_id']}`); no pod is rented meanwhile — {mw.get('error') or ''}")
    if (fg := st.get("forget")) and fg.get("pending"):
        models = ", ".join(fg.get("models_affected") or []) or "no registered model"
        todo = ("a run without them, then their removal" if fg.get("policy") == "retrain"
                else "`mhd forget --purge` to remove them")
        t.add_row("forgotten", f"{fg['pending']} memory(ies) still inside: {models} — {todo}")
    if st.get("next_schedule_at"):
        t.add_row("next scheduled", time.strftime("%Y-%m-%d %H:%M", time.localtime(st["next_schedule_at"])))
    return Group(*parts)


def _nll(ev: dict[str, Any] | None) -> str:
    if not ev or ev.get("heldout_nll_base") is None or ev.get("heldout_nll_new") is None:
        return "probe only" if ev and ev.get("probe_nll_new") is not None else "-"
    return f"{ev['heldout_nll_base']:.3f} → {ev['heldout_nll_new']:.3f}"


def _samples(r: dict[str, Any]) -> str:
    """``59 incr`` (started from another run's adapter) or ``450 full``; the reason is in --json and `mhd logs`."""
    if r["samples"] is None:
        return "-"
    mode = (r.get("training") or {}).get("mode")
    return f"{r['samples']}" + {"incremental": " incr", "full": " full"}.get(mode or "", "")


def render_runs(runs: list[dict[str, Any]]) -> Table:
    t = Table(title="mhd runs")
    for col in ("run", "trigger", "outcome", "duration", "pods", "pod time", "cost", "samples", "loss",
                "held-out NLL base → new", "decision", "model"):
        t.add_column(col)
    for r in runs:
        outcome = r["outcome"] or f"({r['state']})"
        if r.get("events"):
            outcome += " ↺" * len(r["events"])
        model = (r.get("model_name") or "-") + (" *" if r.get("model_active") else "")
        if r.get("purged_at"):
            model += " (purged)"
        elif r.get("forgotten_inside"):
            model += f" ⚠ {r['forgotten_inside']} forgotten"
        pods = len(r.get("pods") or [])
        pods_cell = f"{pods}" + (f" ({r['preemptions']} preempted)" if r.get("preemptions") else "")
        t.add_row(r["id"], r["trigger"], outcome, duration(r["duration_s"]), pods_cell, duration(r["billed_s"]),
                  f"${r['cost_usd']:.2f}", _samples(r),
                  f"{r['final_loss']:.3f}" if r.get("final_loss") is not None else "-", _nll(r.get("eval")),
                  (r.get("eval") or {}).get("decision") or "-", model)
    # Why a run did not succeed, under the table (the reason names the check and its fix).
    notes = [f"{r['id']}: {r['error']}" for r in runs if r.get("error") and r.get("outcome") != "succeeded"]
    if notes:
        t.caption = "\n".join(n if len(n) <= 400 else n[:399] + "…" for n in notes[:5])
        t.caption_justify = "left"
    return t
