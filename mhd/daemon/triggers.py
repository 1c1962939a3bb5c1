"""When to start a run: pending ≥ threshold (debounced), a cron schedule, or `mhd train`."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from datetime import datetime

from apscheduler.schedulers.asyncio import AsyncIOScheduler
from apscheduler.triggers.cron import CronTrigger

log = logging.getLogger(__name__)


class Triggers:
    def __init__(self, *, threshold: int, debounce_s: float, schedule: str | None,
                 pending: Callable[[], int], busy: Callable[[], bool], start: Callable[[str], object]) -> None:
        self.threshold = threshold
        self.debounce_s = debounce_s
        self.schedule = schedule
        self.pending = pending
        self.busy = busy
        self.start = start
        self._timer: asyncio.TimerHandle | None = None
        self.scheduler: AsyncIOScheduler | None = None
        # After a run that did not succeed, the threshold waits until then: a lasting fault
        # (bad config, no capacity, no usable data) must not rent pod after pod in a loop.
        self.hold_until = 0.0

    def changed(self) -> None:
        """Memories changed: (re)arm the debounce timer while the threshold is met."""
        if self.busy() or self.pending() < self.threshold:
            return
        if self._timer is not None:
            self._timer.cancel()
        # Debounced: a burst of files (a sync, a bulk import) starts one run, after it settles.
        delay = max(self.debounce_s, self.hold_until - time.time())
        self._timer = asyncio.get_running_loop().call_later(delay, self._fire_threshold)

    def _fire_threshold(self) -> None:
        self._timer = None
        if time.time() < self.hold_until:
            self.changed()
            return
        if not self.busy() and self.pending() >= self.threshold:
            log.info("threshold met: %d pending ≥ %d", self.pending(), self.threshold)
            self.start("threshold")

    def _fire_schedule(self) -> None:
        if self.busy():
            log.info("schedule fired while a run is active; skipping")
        elif self.pending() == 0:
            log.info("schedule fired with no new memories; skipping")
        else:
            self.start("schedule")

    def start_scheduler(self) -> None:
        if not self.schedule:
            return
        self.scheduler = AsyncIOScheduler()
        self.scheduler.add_job(self._fire_schedule, CronTrigger.from_crontab(self.schedule), id="retrain",
                               coalesce=True, max_instances=1, misfire_grace_time=3600)
        self.scheduler.start()

    def next_schedule_at(self) -> float | None:
        if self.scheduler is None:
            return None
        job = self.scheduler.get_job("retrain")
        t: datetime | None = job.next_run_time if job is not None else None
        return t.timestamp() if t else None

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        if self.scheduler is not None:
            self.scheduler.shutdown(wait=False)
