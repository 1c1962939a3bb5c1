"""Merging: local and repeatable. A failed merge keeps the adapter and the previous model."""

from __future__ import annotations

import json

from mhd.errors import MergeError
from mhd.states.context import RunContext
from mhd.states.fetching import terminate_pod
from mhd.states.machine import RunMachine
from mhd.states.model import Outcome
from mhd.store import now


async def act(ctx: RunContext, m: RunMachine) -> None:
    run = ctx.check(m.run.id)
    run = await terminate_pod(ctx, run, "run reached Merging")
    adapter_dir = ctx.run_dir(run) / "output" / "adapter"
    model: str | None = None
    if ctx.cfg.merge.effective_mode != "none":
        from mhd.merge import merge_run

        try:
            model = await merge_run(ctx.cfg, ctx.store, run.id, adapter_dir,
                                    lambda line: ctx.append_log(run, f"merge: {line}"))
        except MergeError as exc:
            ctx.log.error("run %s: merge failed: %s (retry with `mhd merge %s`)", run.id, exc, run.id)
            m.fire("merged", reason=f"merge failed: {exc}", outcome=Outcome.MERGE_FAILED,
                   error=str(exc), finished_at=now())
            return
    manifest = json.loads((ctx.run_dir(run) / "input" / "dataset_manifest.json").read_text())
    keys = list(manifest.get("memory_keys") or [])
    ctx.store.mark_trained(keys, run.id)
    ctx.on_trained(keys)
    m.fire("merged", reason=f"model {model}" if model else "adapter kept (merge.mode = none)",
           outcome=Outcome.SUCCEEDED, model_name=model, finished_at=now())
