"""Preemption: tell a pod the provider took back from a dropped link, and what the run does next.

A lost connection alone proves nothing (SkyPilot #6787 read a transient SSH loss as the death of
the cluster). So the provider is asked about the pod first: only a pod that is gone, EXITED or
TERMINATED while mhd never stopped it counts as preempted; a pod still running means the
ordinary reconnect. When the provider cannot be asked right now, the run reconnects as before and
Connecting asks again.

The run then goes back to Provisioning for a new pod (its name carries the attempt, so the
look-up-before-create idempotency still holds). The count of preemptions and the on-demand
fallback are columns of the run, so a restarted daemon neither forgets nor resets them.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from typing import Any, Literal

from mhd.config import Config
from mhd.errors import ProviderError
from mhd.states.context import RunContext
from mhd.store import Run, now

NextPod = Literal["interruptible", "on_demand", "fail"]
EVENT = "preempted"  # the events table's kind, and how the journal's reason starts


def is_preemption(reason: str) -> bool:
    """Whether a journal row is a preemption (the web timeline marks those)."""
    return reason.startswith(EVENT + ":")


def uses_volume(cfg: Config) -> bool:
    """The run folder is on a network volume, which outlives any one pod."""
    return cfg.provider == "runpod" and bool(cfg.runpod.network_volume_id)


def next_pod(cfg: Config, preemptions: int, on_demand: bool) -> NextPod:
    """The pod after the ``preemptions``-th preemption (the one just seen counted).

    Below ``max_preemptions`` the run stays on interruptible pods; once the count reaches it,
    ``on_preemption`` decides. A run that fell back to on-demand stays there.
    """
    r = cfg.runpod
    if preemptions >= r.max_preemptions:
        if r.on_preemption == "fail":
            return "fail"
        if r.on_preemption == "resume_on_demand":
            return "on_demand"
    if on_demand or not r.interruptible:
        return "on_demand"
    return "interruptible"


async def pod_lost(ctx: RunContext, run: Run) -> str | None:
    """The pod's status word if the provider took it back, else None (reconnect as usual)."""
    if not run.pod_id or run.pod_stopped_at is not None:
        return None  # no pod yet, or mhd itself stopped it
    try:
        pod = await ctx.provider.get(run.pod_id)
    except ProviderError as exc:
        ctx.log.warning("run %s: cannot ask %s about pod %s (%s); reconnecting", run.id,
                        ctx.provider.name, run.pod_id, exc)
        return None
    if pod is None:
        return "gone"
    return pod.status if pod.gone else None


async def release(ctx: RunContext, run: Run, status: str, where: str) -> dict[str, Any]:
    """Close the books on the preempted pod; the run fields that start the next attempt.

    Its time is billed up to now (when mhd learnt of it) and carried into ``prior_*``. An EXITED
    pod still bills for its disk, so it is deleted; if that fails the reaper ends it, because no
    run owns it any more.
    """
    assert run.pod_id is not None
    t = now()
    pod_s = run.pod_billed_s(t)
    ctx.store.pod_terminated(run.pod_id, note=f"preempted ({status}) in {where}", at=t, preempted=True)
    try:
        await ctx.provider.terminate(run.pod_id)
    except ProviderError as exc:
        ctx.log.warning("run %s: deleting preempted pod %s failed (%s); the reaper retries", run.id, run.pod_id, exc)
    _set_aside_pod_files(ctx, run)
    fields: dict[str, Any] = {
        "preemptions": run.preemptions + 1,
        "prior_billed_s": (run.prior_billed_s or 0.0) + pod_s,
        "prior_cost_usd": (run.prior_cost_usd or 0.0) + (run.cost_per_hr or 0.0) * pod_s / 3600.0,
        "pod_id": None, "pod_name": None, "pod_started_at": None, "pod_stopped_at": None,
        "endpoint_host": None, "endpoint_port": None, "endpoint_user": None,
        # A new machine has a new host key: pin the new pod's on first contact.
        "host_key": None, "resume_state": None, "job_launches": 0,
    }
    if not uses_volume(ctx.cfg):
        # A fresh pod disk: a new run folder, progress.jsonl read from its start.
        fields.update(remote_dir=None, progress_offset=0)
    return fields


def _set_aside_pod_files(ctx: RunContext, run: Run) -> None:
    """Local copies tied to the lost pod: its train.log (kept, renamed) and a half-done fetch.

    The new pod writes a new train.log (the local copy's size is the read offset) and builds its
    own artifacts, so partial downloads of the old ones must not be resumed against them.
    """
    d = ctx.run_dir(run)
    log = d / "train.log"
    if log.exists():
        os.replace(log, d / f"train.pod{run.preemptions + 1}.log")
    with contextlib.suppress(OSError):
        shutil.rmtree(d / "output")
    (d / "fetch.json").unlink(missing_ok=True)
