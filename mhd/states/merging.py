"""Merging: local and repeatable. A failed merge keeps the adapter and the previous model.

The pod is terminated first (its work is on this disk, verified). A merge that fails ends the
run ``merge_failed`` with ``merge_retry_at`` set: the daemon's merge retrier
(``mhd/daemon/merges.py``) tries again with backoff, at once on ``mhd merge RUN`` or a config
reload, and the threshold rents no pod while that adapter waits — the GPU time it cost is
never paid twice. :func:`merge_adapter` and :func:`record_merged` are shared by all three.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mhd.config import Config
from mhd.errors import MergeError
from mhd.quality.gate import Decision, decide
from mhd.states.context import RunContext
from mhd.states.fetching import terminate_pod
from mhd.states.machine import RunMachine
from mhd.states.model import Outcome
from mhd.store import Run, Store, now

Log = Callable[[str], None]  # not mhd.merge's: importing that loads httpx into an idle daemon


def adapter_dir(cfg: Config, run_id: str) -> Path:
    return cfg.runs_dir / run_id / "output" / "adapter"


def merge_backoff(cfg: Config, attempts: int) -> float:
    """Seconds before merge retry number ``attempts + 1``: doubling from retry.merge_base_s, capped."""
    r = cfg.retry
    return float(min(r.merge_max_s, r.merge_base_s * 2 ** max(0, min(attempts - 1, 30))))


def trained_keys(cfg: Config, run_id: str) -> list[str]:
    manifest = json.loads((cfg.runs_dir / run_id / "input" / "dataset_manifest.json").read_text())
    return list(manifest.get("memory_keys") or [])


async def merge_adapter(cfg: Config, store: Store, run_id: str, log: Log) -> str | None:
    """Register (or merge) the run's fetched adapter; MergeError if that fails. Idempotent."""
    from mhd.merge import merge_run

    if cfg.merge.effective_mode == "none":
        return None
    return await merge_run(cfg, store, run_id, adapter_dir(cfg, run_id), log)


def record_merged(store: Store, cfg: Config, run_id: str) -> list[str]:
    """The run's memories are now inside a served model: they stop counting as pending."""
    keys = trained_keys(cfg, run_id)
    store.mark_trained(keys, run_id)
    return keys


def fetched_eval(cfg: Config, run_id: str) -> dict[str, Any] | None:
    return read_eval(cfg.runs_dir / run_id)


def read_eval(run_dir: Path) -> dict[str, Any] | None:
    """The pod's evaluation (eval.json, verified like the adapter), or the manifest's note of its failure."""
    out = run_dir / "output"
    try:
        return dict(json.loads((out / "eval.json").read_text()))
    except (OSError, ValueError):
        pass
    try:
        ev = json.loads((out / "manifest.json").read_text()).get("eval")
    except (OSError, ValueError, AttributeError):
        return None
    return dict(ev) if isinstance(ev, dict) else None


def decide_run(cfg: Config, store: Store, run_id: str) -> Decision:
    """The gate for this run. A run holding a memory its owner took back is never promoted; a
    run made while the served model still holds one is a forgetting run (the owner's deletion
    wins over the no-regression rule; it must still beat the base)."""
    from mhd.purge import forgotten_note
    from mhd.quality.gate import REJECTED, numbers, promoted_run

    ev = fetched_eval(cfg, run_id)
    if (why := forgotten_note(store, run_id)) is not None:
        return Decision(REJECTED, f"{why}: never promoted", ("forgotten",),
                        numbers(ev))
    current = promoted_run(store)
    forgetting = current is not None and current != run_id and bool(store.forgotten_in(current, pending_only=True))
    return decide(ev, cfg.eval, forgetting=forgetting)


def forgotten_refusal(store: Store, run_id: str) -> str | None:
    """Why this run's adapter must never be registered, when it holds a forgotten memory."""
    from mhd.purge import forgotten_note

    why = forgotten_note(store, run_id)
    return None if why is None else f"run {run_id}: {why}; it is never registered"


def gate(ctx: RunContext, run: Run) -> Decision:
    """Decide once per run (re-entering Merging reuses the recorded decision)."""
    if run.eval_json:
        d = json.loads(run.eval_json)
        return Decision(d["decision"], d["reason"], tuple(d.get("failed") or ()), d.get("numbers") or {})
    decision = decide_run(ctx.cfg, ctx.store, run.id)
    ctx.store.update_run(run.id, eval_json=decision.as_json(), eval_decision=decision.decision)
    ctx.append_log(run, f"quality gate: {decision.reason}")
    ctx.log.info("run %s: quality gate: %s", run.id, decision.reason)
    return decision


async def act(ctx: RunContext, m: RunMachine) -> None:
    run = ctx.check(m.run.id)
    run = await terminate_pod(ctx, run, "run reached Merging")
    decision = gate(ctx, run)
    if not decision.promote:
        # Kept on disk (adapter + eval report); nothing registered, the alias stays where it is.
        ctx.store.add_event(run.id, "gate", decision.reason)
        m.fire("merged", reason=decision.reason, outcome=Outcome.REJECTED, error=decision.reason,
               finished_at=now())
        return
    model: str | None = None
    try:
        async with ctx.merge_lock:
            model = await merge_adapter(ctx.cfg, ctx.store, run.id, lambda line: ctx.append_log(run, f"merge: {line}"))
    except MergeError as exc:
        _failed(ctx, m, run, exc)
        return
    keys = record_merged(ctx.store, ctx.cfg, run.id)
    ctx.on_trained(keys)
    m.fire("merged", reason=f"model {model}" if model else "adapter kept (merge.mode = none)",
           outcome=Outcome.SUCCEEDED, model_name=model, finished_at=now())


def _failed(ctx: RunContext, m: RunMachine, run: Run, exc: MergeError) -> None:
    delay = merge_backoff(ctx.cfg, 1)
    ctx.log.error("run %s: merge failed: %s — the adapter is kept and the merge is retried in %.0fs "
                  "(at once: `mhd merge %s`); no pod is rented for these memories meanwhile",
                  run.id, exc, delay, run.id)
    ctx.append_log(run, f"merge failed: {exc}; retry in {delay:.0f}s")
    m.fire("merged", reason=f"merge failed: {exc} (adapter kept; merge retried in {delay:.0f}s)",
           outcome=Outcome.MERGE_FAILED, error=str(exc), finished_at=now(), merge_attempts=1,
           merge_retry_at=now() + delay)
