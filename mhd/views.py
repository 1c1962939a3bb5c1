"""JSON views of runs and of the daemon's status — one source for the CLI, socket and web page."""

from __future__ import annotations

from typing import Any

from mhd.purge import forget_view
from mhd.quality.gate import eval_view
from mhd.states.model import RunState
from mhd.store import Run, Store, now

PROGRESS_KEYS = ("step", "total_steps", "epoch", "loss", "eta_s", "phase")


def progress_dict(run: Run | None) -> dict[str, Any]:
    if run is None:
        return {k: None for k in PROGRESS_KEYS}
    return {k: getattr(run, k) for k in PROGRESS_KEYS}


def run_dict(run: Run, at: float | None = None) -> dict[str, Any]:
    at = at or now()
    end = run.finished_at or at
    return {
        "id": run.id,
        "state": run.state.value,
        "trigger": run.trigger,
        "provider": run.provider,
        "outcome": run.outcome.value if run.outcome else None,
        "error": run.error,
        "created_at": run.created_at,
        "finished_at": run.finished_at,
        "duration_s": round(end - run.created_at, 3),
        "state_entered_at": run.state_entered_at,
        "pod_id": run.pod_id,
        "gpu_type": run.gpu_type,
        "cost_per_hr": run.cost_per_hr,
        "billed_s": round(run.billed_s(at), 3),
        "fetch_s": round(run.fetch_s or 0.0, 3),
        # The part of the pod's cost spent downloading (a merged GGUF can take a while).
        "fetch_cost_usd": round((run.cost_per_hr or 0.0) * (run.fetch_s or 0.0) / 3600.0, 4),
        "cost_usd": round(run.cost_usd(at), 4),
        "samples": run.samples,
        # full / incremental and why (the dataset build's decision, issue 15)
        "training": (run.report or {}).get("training"),
        "parent_run_id": run.parent_run_id,
        "report": run.report,
        "progress": progress_dict(run),
        "final_loss": run.loss,
        "job_launches": run.job_launches,
        "adapter_sha256": run.adapter_sha256,
        "model_name": run.model_name,
        "eval": eval_view(run),
        "merge_attempts": run.merge_attempts,
        "merge_retry_at": run.merge_retry_at,
        "purged_at": run.purged_at,
        "preemptions": run.preemptions or 0,
        "on_demand": bool(run.on_demand),
        "pod_interruptible": bool(run.pod_interruptible),
        "checkpoint_step": run.checkpoint_step,
    }


def pods_list(store: Store, run: Run, at: float | None = None) -> list[dict[str, Any]]:
    """Every pod the run rented, with its own time and cost (the run's are their sum)."""
    at = at or now()
    out = []
    for p in store.run_pods(run.id):
        end = p.terminated_at or (run.pod_stopped_at if p.pod_id == run.pod_id else None) or at
        billed = max(0.0, end - p.created_at)
        out.append({"pod_id": p.pod_id, "name": p.name, "interruptible": bool(p.interruptible),
                    "preempted": bool(p.preempted), "cost_per_hr": p.cost_per_hr,
                    "created_at": p.created_at, "terminated_at": p.terminated_at,
                    "billed_s": round(billed, 3), "cost_usd": round((p.cost_per_hr or 0.0) * billed / 3600.0, 4)})
    return out


def merge_waiting(store: Store) -> dict[str, Any] | None:
    """The fetched adapter that waits for a merge retry (no pod is rented meanwhile), if any."""
    run = store.waiting_merge()
    if run is None:
        return None
    return {"run_id": run.id, "attempts": run.merge_attempts, "next_retry_at": run.merge_retry_at,
            "error": run.error}


def gpu_dict(store: Store, run: Run | None) -> dict[str, Any] | None:
    p = store.last_gpu_point(run.id) if run is not None else None
    if p is None:
        return None
    return {"gpu_util": p.gpu_util, "gpu_mem_used": p.gpu_mem_used, "gpu_mem_total": p.gpu_mem_total}


def loss_history(store: Store, run: Run | None, limit: int = 200) -> list[float]:
    return store.recent_losses(run.id, limit) if run is not None else []


def status_snapshot(store: Store, *, pending: int, threshold: int, daemon: dict[str, Any],
                    schedule: str | None = None, next_schedule_at: float | None = None,
                    forget_policy: str = "retrain") -> dict[str, Any]:
    at = now()
    run = store.active_run()
    last = None if run else store.last_run()
    return {
        "state": run.state.value if run else RunState.IDLE.value,
        "run_id": run.id if run else None,
        "pending_memories": pending,
        "threshold": threshold,
        "progress": progress_dict(run),
        "elapsed_s": round(at - run.created_at, 3) if run else None,
        "cost_usd": round(run.cost_usd(at), 4) if run else None,
        "cost_per_hr": run.cost_per_hr if run else None,
        "billed_s": round(run.billed_s(at), 3) if run else None,
        "gpu": gpu_dict(store, run),
        "loss_history": loss_history(store, run),
        "run": run_dict(run, at) if run else None,
        "last_run": run_dict(last, at) if last else None,
        "merge_waiting": merge_waiting(store),
        "forget": forget_view(store, forget_policy),
        "schedule": schedule,
        "next_schedule_at": next_schedule_at,
        "daemon": daemon,
        "time": at,
    }


def runs_list(store: Store, limit: int = 20) -> list[dict[str, Any]]:
    at = now()
    events: dict[str | None, list[dict[str, Any]]] = {}
    for e in store.events(kind="rollback"):
        events.setdefault(e.run_id, []).append({"kind": e.kind, "detail": e.detail, "at": e.at})
    active = {m.name for m in store.models() if m.active}
    pending = store.forgotten_keys(pending_only=True)
    out = []
    for r in store.list_runs(limit):
        d = run_dict(r, at)
        # Forgotten memories its model (or its files) still hold: what a purge would remove.
        d["forgotten_inside"] = len(store.model_keys(r.id) & pending) if pending and not r.purged_at else 0
        d["model_active"] = bool(r.model_name and r.model_name in active)
        d["events"] = events.get(r.id, [])
        d["pods"] = pods_list(store, r, at)
        out.append(d)
    return out
