"""What a state's action gets to work with: config, store, provider, the session (if any)."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from mhd.config import Config
from mhd.errors import BudgetExceeded, Cancelled, ConnectionLost
from mhd.remote.provider import Endpoint, Provider
from mhd.remote.session import Session
from mhd.store import Run, Store

Connector = Callable[[Run, Endpoint], Awaitable[tuple[Session, str | None]]]


def _debug_pauses() -> dict[str, float]:
    """``MHD_DEBUG_PAUSE="Training=3,Provisioning.created=5"``: fault-injection pauses.

    Tests use them to SIGKILL the daemon at a precise point (e.g. after the provider created a
    pod but before the DB knows it). Unset in production, where every point costs nothing.
    """
    out: dict[str, float] = {}
    for item in os.environ.get("MHD_DEBUG_PAUSE", "").split(","):
        name, _, secs = item.partition("=")
        try:
            out[name.strip()] = float(secs)
        except ValueError:
            continue
    return out


class NoSession(ConnectionLost):
    """The state needs the pod but this daemon has no connection yet (e.g. just restarted)."""


@dataclass
class RunContext:
    cfg: Config
    store: Store
    provider: Provider
    connector: Connector
    remote_root: str
    log: logging.Logger
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    session: Session | None = None
    on_trained: Callable[[Iterable[str]], None] = lambda keys: None
    # One merge at a time: the Merging state and the merge retrier both move the alias.
    merge_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    pauses: dict[str, float] = field(default_factory=_debug_pauses)

    async def fault_point(self, name: str) -> None:
        if name in self.pauses:
            self.log.warning("debug pause at %s for %.1fs (MHD_DEBUG_PAUSE)", name, self.pauses[name])
            await asyncio.sleep(self.pauses[name])

    def run_dir(self, run: Run) -> Path:
        """Local folder for this run: input/ (dataset), output/ (fetched), logs."""
        return self.cfg.runs_dir / run.id

    def remote_dir(self, run: Run) -> str:
        return run.remote_dir or f"{self.remote_root.rstrip('/')}/runs/{run.pod_name}"

    def require_session(self) -> Session:
        if self.session is None:
            raise NoSession("no SSH session to the pod yet")
        return self.session

    async def drop_session(self) -> None:
        if self.session is not None:
            try:
                await self.session.close()
            except Exception:
                pass
            self.session = None

    def check(self, run_id: str) -> Run:
        """Safe point: honour `mhd cancel` and the budget before doing more work."""
        run = self.store.get_run(run_id)
        assert run is not None
        if run.cancel_requested:
            # The daemon cancels by itself only when a memory of the run was forgotten: say so.
            why = self.store.events(run_id, "forget")
            raise Cancelled(f"{why[-1].detail.removeprefix('cancelled: ')}: cancelled" if why
                            else "cancelled by `mhd cancel`")
        b = self.cfg.budget
        if b.max_usd_per_run is not None and run.cost_usd() > b.max_usd_per_run:
            raise BudgetExceeded(
                f"cost ${run.cost_usd():.2f} exceeds budget.max_usd_per_run = ${b.max_usd_per_run:.2f}"
            )
        if b.max_hours_per_run is not None and run.billed_s() > b.max_hours_per_run * 3600:
            raise BudgetExceeded(
                f"pod time {run.billed_s() / 3600:.2f} h exceeds budget.max_hours_per_run = "
                f"{b.max_hours_per_run} h"
            )
        return run

    async def pause(self, seconds: float) -> None:
        """Sleep, but wake early for `mhd cancel` / `mhd train` pokes."""
        self.wake.clear()
        try:
            await asyncio.wait_for(self.wake.wait(), seconds)
        except TimeoutError:
            pass

    def append_log(self, run: Run, line: str) -> None:
        path = self.run_dir(run) / "run.log"
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a", encoding="utf-8") as f:
            f.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {line}\n")
