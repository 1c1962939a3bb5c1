"""Connecting: fresh endpoint from the provider, connect with backoff, pin the host key, resume."""

from __future__ import annotations

from mhd.errors import Preempted, ProviderError, TransientProviderError
from mhd.states.context import RunContext
from mhd.states.machine import RESUME_TRIGGER, RunMachine
from mhd.states.model import RunState


async def act(ctx: RunContext, m: RunMachine) -> None:
    run = ctx.check(m.run.id)
    await ctx.drop_session()
    if not run.pod_id:
        raise ProviderError(f"run {run.id} reached Connecting without a pod id")
    pod = await ctx.provider.get(run.pod_id)
    if (pod is None or pod.gone) and run.pod_stopped_at is None:
        # mhd never stopped it: the provider took it back (the runner rents a new one).
        raise Preempted(run.pod_id, "gone" if pod is None else pod.status)
    if pod is None or pod.gone:
        raise ProviderError(
            f"pod {run.pod_id} is {'gone' if pod is None else pod.status}: its work cannot be reached "
            "(was it terminated outside mhd?)"
        )
    if pod.cost_per_hr is not None and pod.cost_per_hr != run.cost_per_hr:
        run = ctx.store.update_run(run.id, cost_per_hr=pod.cost_per_hr)
    # Never a cached endpoint: a restarted pod may come back on another port.
    ep = await ctx.provider.endpoint(pod)
    if ep is None:
        raise TransientProviderError(f"pod {pod.id} is {pod.status}; its SSH port is not mapped yet")
    session, host_key = await ctx.connector(run, ep)
    ctx.session = session
    if host_key and not run.host_key:
        ctx.store.update_run(run.id, host_key=host_key)
    target = run.resume_state or RunState.UPLOADING
    m.fire(RESUME_TRIGGER[target], reason=f"connected to {ep.user}@{ep.host}:{ep.port}",
           endpoint_host=ep.host, endpoint_port=ep.port, endpoint_user=ep.user, resume_state=None)
