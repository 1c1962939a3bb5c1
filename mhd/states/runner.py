"""Drive one run from its committed state to Idle, classifying every failure on the way.

- transient (``errors.is_transient``): retry the same state with exponential backoff + full
  jitter, attempts counted in the DB, bounded by the state's deadline;
- connection lost while the pod is needed: the provider is asked about the pod first. Gone or
  EXITED without mhd asking is a preemption (``preemption.py``): a new pod per the policy, or
  Aborting once the policy says fail. Still running: back through Connecting, then resume;
- cancel / budget / no data / preflight / anything else: Aborting, with the outcome that says which.
"""

from __future__ import annotations

import asyncio
import random
import traceback
from collections.abc import Awaitable, Callable

from mhd.errors import (
    BudgetExceeded,
    Cancelled,
    ConnectionLost,
    MhdError,
    NoSamples,
    Preempted,
    PreflightFailed,
    TransientProviderError,
    is_transient,
)
from mhd.states import aborting, connecting, fetching, merging, preemption, provisioning, training, uploading
from mhd.states.context import RunContext
from mhd.states.machine import RunMachine
from mhd.states.model import SESSION_STATES, Outcome, RunState
from mhd.store import Run, now

Action = Callable[[RunContext, RunMachine], Awaitable[None]]

ACTIONS: dict[RunState, Action] = {
    RunState.PROVISIONING: provisioning.act,
    RunState.CONNECTING: connecting.act,
    RunState.UPLOADING: uploading.act,
    RunState.TRAINING: training.act,
    RunState.FETCHING: fetching.act,
    RunState.MERGING: merging.act,
    RunState.ABORTING: aborting.act,
}


def backoff_delay(attempt: int, base: float, cap: float, rng: random.Random | None = None) -> float:
    """Full jitter: uniform in [0, min(cap, base·2^attempt)] — spreads reconnect storms."""
    r = rng or random
    return r.uniform(0, min(cap, base * (2 ** min(attempt, 30))))


def deadline_for(ctx: RunContext, state: RunState) -> float:
    r = ctx.cfg.retry
    if state is RunState.CONNECTING:
        return max(r.state_deadline_s, ctx.cfg.ssh.connect_deadline_s)
    if state is RunState.ABORTING:
        return r.abort_deadline_s
    return r.state_deadline_s


class Runner:
    def __init__(self, ctx: RunContext) -> None:
        self.ctx = ctx

    async def drive(self, run: Run) -> Run:
        ctx = self.ctx
        m = RunMachine(ctx.store, run)
        ctx.log.info("run %s: entering %s", run.id, m.state.value)
        while m.state is not RunState.IDLE:
            state = m.state
            try:
                await ctx.fault_point(state.value)
                await ACTIONS[state](ctx, m)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                await self._handle(m, state, exc)
            if m.state is not state:
                ctx.log.info("run %s: %s → %s (%s)", m.run.id, state.value, m.state.value,
                             _last_reason(ctx, m.run.id))
        await ctx.drop_session()
        return m.refresh()

    async def _handle(self, m: RunMachine, state: RunState, exc: Exception) -> None:
        ctx = self.ctx
        run = m.refresh()
        if state is RunState.ABORTING:
            await self._retry_or_release(m, run, exc)
            return
        if isinstance(exc, Cancelled):
            self._abort(m, Outcome.CANCELLED, str(exc))
        elif isinstance(exc, BudgetExceeded):
            self._abort(m, Outcome.BUDGET_EXCEEDED, str(exc))
        elif isinstance(exc, NoSamples):
            self._abort(m, Outcome.NO_DATA, str(exc))
        elif isinstance(exc, PreflightFailed):
            self._abort(m, Outcome.PREFLIGHT_FAILED, str(exc))
        elif isinstance(exc, Preempted):
            await self._preempted(m, run, state, exc.status)
        elif isinstance(exc, ConnectionLost) and state in SESSION_STATES:
            await ctx.drop_session()
            # Asked before reconnecting: a dropped link and a pod taken back look the same here.
            if (status := await preemption.pod_lost(ctx, run)) is not None:
                await self._preempted(m, run, state, status)
                return
            ctx.append_log(run, f"connection lost in {state.value}: {exc}")
            m.fire("lost", reason=f"connection lost: {exc}", resume_state=state)
        elif is_transient(exc):
            attempts = ctx.store.bump_attempts(run.id)
            elapsed = now() - run.state_entered_at
            if elapsed > deadline_for(ctx, state):
                self._abort(m, Outcome.FAILED, f"gave up in {state.value} after {attempts} attempts "
                                               f"over {elapsed:.0f}s: {exc}")
                return
            await self._sleep_backoff(run, state, attempts, exc)
        else:
            if not isinstance(exc, MhdError):
                ctx.log.error("run %s: unexpected error in %s:\n%s", run.id, state.value,
                              "".join(traceback.format_exception(exc)))
            self._abort(m, Outcome.FAILED, f"{state.value}: {exc}")

    async def _sleep_backoff(self, run: Run, state: RunState, attempts: int, exc: Exception) -> None:
        r = self.ctx.cfg.retry
        delay = backoff_delay(attempts, r.base_s, r.max_s)
        if isinstance(exc, TransientProviderError) and exc.retry_after:
            delay = max(delay, exc.retry_after)
        self.ctx.log.warning("run %s: %s: %s — retry %d in %.1fs", run.id, state.value, exc, attempts, delay)
        await self.ctx.pause(delay)

    async def _retry_or_release(self, m: RunMachine, run: Run, exc: Exception) -> None:
        ctx = self.ctx
        attempts = ctx.store.bump_attempts(run.id)
        if now() - run.state_entered_at < deadline_for(ctx, RunState.ABORTING):
            await self._sleep_backoff(run, RunState.ABORTING, attempts, exc)
            return
        # Never forgotten: the reaper keeps terminating mhd-* pods that no active run owns.
        msg = f"{run.error or ''}; terminating pod {run.pod_id} failed: {exc} (the reaper will retry)"
        ctx.log.error("run %s: %s", run.id, msg)
        m.fire("aborted", reason=msg, outcome=run.abort_outcome or Outcome.FAILED, error=msg,
               finished_at=now())

    async def _preempted(self, m: RunMachine, run: Run, state: RunState, status: str) -> None:
        ctx = self.ctx
        await ctx.drop_session()
        fields = await preemption.release(ctx, run, status, state.value)
        count = fields["preemptions"]
        nxt = preemption.next_pod(ctx.cfg, count, run.on_demand)
        r = ctx.cfg.runpod
        what = f"pod {run.pod_id} {status} in {state.value} (preemption {count} of max_preemptions {r.max_preemptions})"
        ctx.store.add_event(run.id, preemption.EVENT, f"{what}; next: {nxt}")
        ctx.append_log(run, f"preempted: {what}; next: {nxt}")
        ctx.log.warning("run %s: preempted: %s; next: %s", run.id, what, nxt)
        if nxt == "fail":
            # Billing of the lost pod ends now; Aborting has nothing left to terminate.
            ctx.store.update_run(run.id, **{k: v for k, v in fields.items() if k in
                                            ("preemptions", "prior_billed_s", "prior_cost_usd")},
                                 pod_started_at=None, pod_stopped_at=None)
            m.refresh()
            self._abort(m, Outcome.FAILED, f"preempted: {what}; runpod.on_preemption = \"fail\"")
            return
        ckpt = f"checkpoint step {run.checkpoint_step}" if run.checkpoint_step else "its newest checkpoint"
        m.fire("preempted", reason=f"preempted: {what}; resuming on a new {nxt.replace('_', '-')} pod from {ckpt}",
               on_demand=run.on_demand or nxt == "on_demand", **fields)

    def _abort(self, m: RunMachine, outcome: Outcome, message: str) -> None:
        self.ctx.log.error("run %s: aborting (%s): %s", m.run.id, outcome.value, message)
        self.ctx.append_log(m.run, f"aborting ({outcome.value}): {message}")
        m.fire("abort", reason=message, abort_outcome=outcome, error=message)


def _last_reason(ctx: RunContext, run_id: str) -> str:
    j = ctx.store.journal(run_id)
    return j[-1].reason if j else ""
