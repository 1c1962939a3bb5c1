"""Forgetting, in the daemon: notice a memory its owner took back, then retrain without it and purge.

A memory is forgotten when no file under ``memory_dir`` holds it any more although a run holds
it (file deleted, edited, or turned ``trainingConsent: false``: all three leave the key on no
file), or when the owner says so (`mhd forget`). The check runs once the watcher's events have
settled (``debounce_s``) and after the startup rescan, so a deletion while the daemon was down
counts too, and a file moved or rewritten in two steps is not mistaken for one deleted.

Then, with ``[forget] policy = "retrain"``:
1. an active run that holds the memory is cancelled (its pod terminated): its model could never
   be promoted (``states/merging.py`` refuses it), so finishing it would only cost money;
2. when the served model holds it, one run (trigger ``forget``) starts without it: the threshold
   is bypassed, the failed-run cooldown and the budget are not; several forgets inside the
   debounce make one run, and a forgetting run that failed or was rejected is not repeated for
   the same forgets (status says so; `mhd forget --purge` removes the model anyway);
3. once the served model is clean, :func:`mhd.purge.purge` removes every model and file that
   still holds a forgotten memory.
With ``policy = "flag"`` only step 1 happens; the rest waits for `mhd forget --purge`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

from mhd.config import Config
from mhd.daemon.watcher import MemoryIndex
from mhd.store import Store

log = logging.getLogger("mhd.forget")


class Forgetter:
    def __init__(self, cfg: Config, store: Store, index: MemoryIndex, *, start_run: Callable[[str], str | None],
                 cancel: Callable[[str, str], None], hold_until: Callable[[], float],
                 on_purged: Callable[[], None]) -> None:
        self.cfg = cfg
        self.store = store
        self.index = index
        self.start_run = start_run
        self.cancel = cancel
        self.hold_until = hold_until
        self.on_purged = on_purged
        self._timer: asyncio.TimerHandle | None = None
        self._task: asyncio.Task[Any] | None = None
        self.lock = asyncio.Lock()

    # When -----------------------------------------------------------------------------------------
    def changed(self, delay: float | None = None) -> None:
        """Memories changed, a run ended, or a merge landed: look again once things settle."""
        if self._timer is not None:
            self._timer.cancel()
        wait = self.cfg.debounce_s if delay is None else delay
        self._timer = asyncio.get_running_loop().call_later(max(0.0, wait), self._fire)

    def _fire(self) -> None:
        self._timer = None
        if self.index.not_ready:
            # A half-written file may be the new version of a memory that only seems gone.
            self.changed(2.0)
            return
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self.settle(), name="forget")
        else:
            self.changed()

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()

    # What -----------------------------------------------------------------------------------------
    def detect(self) -> list[str]:
        """Record the memories that left every file; returns those newly forgotten."""
        hints, self.index.hints = self.index.hints, {}
        if not self.cfg.memory_dir.is_dir():
            log.warning("memory_dir %s is missing: not treating its memories as forgotten", self.cfg.memory_dir)
            return []
        back = self.store.unforget_returned()
        if back:
            log.info("%d forgotten memory(ies) are back under memory_dir: no longer forgotten", len(back))
        vanished = self.store.vanished_keys()
        if vanished and not self.store.has_memory_files():
            # An unmounted or emptied folder looks like "everything deleted": never purge on that.
            log.warning("memory_dir %s holds no memory file at all: not treating %d memories as forgotten "
                        "(if the owner really deleted them all, `mhd forget --key KEY` each)",
                        self.cfg.memory_dir, len(vanished))
            return []
        new = self.store.forget({k: hints.get(k, "gone") for k in vanished})
        if new:
            by: dict[str, int] = {}
            for k in new:
                by[hints.get(k, "gone")] = by.get(hints.get(k, "gone"), 0) + 1
            log.warning("%d memory(ies) forgotten (%s); policy %s", len(new),
                        ", ".join(f"{n} {why}" for why, n in sorted(by.items())), self.cfg.forget.policy)
            self.index.pending = self.store.pending_count()
        return new

    def forget(self, reasons: Mapping[str, str]) -> list[str]:
        """`mhd forget`: the owner's word, by key."""
        new = self.store.forget(reasons)
        if new:
            log.warning("%d memory(ies) forgotten at the owner's request; policy %s", len(new),
                        self.cfg.forget.policy)
            self.index.pending = self.store.pending_count()
            self.react()
        self.changed()
        return new

    def react(self) -> None:
        """An active run holding a forgotten memory is cancelled (never promoted anyway)."""
        active = self.store.active_run()
        if active is None:
            return
        pending = self.store.forgotten_keys(pending_only=True)
        inside = self.store.runs_holding(pending).get(active.id)
        inherited = not inside and bool(self.store.forgotten_in(active.id, pending_only=True))
        if inside or inherited:
            # An incremental run inherits its parent's memories with its start weights.
            why = ("the adapter it started from holds a memory forgotten by its owner" if inherited
                   else "a memory in its dataset was forgotten by its owner")
            log.warning("run %s: cancelling: %s", active.id, why)
            self.store.add_event(active.id, "forget", f"cancelled: {why}")
            self.cancel(active.id, why)

    async def settle(self) -> None:
        async with self.lock:
            if self.detect():
                self.react()
            if self.cfg.forget.policy != "retrain" or self.store.active_run() is not None:
                return
            pending = self.store.forgotten_keys(pending_only=True)
            if not pending:
                return
            from mhd.quality.gate import promoted_run

            served = promoted_run(self.store)
            if served is not None and self.store.forgotten_in(served, pending_only=True):
                self._retrain()
                return
            await self.purge()

    def _retrain(self) -> None:
        wait = self.hold_until() - time.time()
        if wait > 0:
            log.info("a forgetting run waits for the failed-run cooldown (%.0fs)", wait)
            self.changed(wait + 0.5)
            return
        since = max((f.at for f in self.store.forgotten() if f.purged_at is None), default=0.0)
        tried = [r for r in self.store.list_runs(50) if r.trigger == "forget" and r.created_at >= since]
        if tried:
            r = tried[0]
            log.warning("the forgetting run %s ended %s: the served model still holds a forgotten memory; "
                        "`mhd forget --purge` removes it now", r.id, r.outcome.value if r.outcome else "?")
            return
        run_id = self.start_run("forget")
        if run_id is not None:
            log.info("run %s: retraining without the forgotten memories", run_id)

    async def purge(self) -> dict[str, Any]:
        from mhd.purge import purge

        report = await purge(self.cfg, self.store)
        if report.models_removed or report.runs_purged or report.runs_scrubbed or report.errors:
            log.warning("purge: %s", report.summary())
        self.on_purged()
        return {"ok": not report.errors, "summary": report.summary(), "models_removed": report.models_removed,
                "runs_purged": report.runs_purged, "alias": report.alias, "errors": report.errors}
