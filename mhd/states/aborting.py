"""Aborting: terminate the pod durably, record why, release to Idle."""

from __future__ import annotations

from mhd.states.context import RunContext
from mhd.states.fetching import terminate_pod
from mhd.states.machine import RunMachine
from mhd.states.model import Outcome
from mhd.store import now


async def act(ctx: RunContext, m: RunMachine) -> None:
    run = m.refresh()
    run = await terminate_pod(ctx, run, f"aborting: {run.error or 'no reason recorded'}")
    outcome = run.abort_outcome or Outcome.FAILED
    m.fire("aborted", reason=f"{outcome.value}: {run.error or ''}".strip(), outcome=outcome, finished_at=now())
