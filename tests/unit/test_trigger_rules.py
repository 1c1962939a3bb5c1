"""Trigger logic in the event loop: debounce, busy runs, schedule skip rules."""

from __future__ import annotations

import asyncio

from mhd.daemon.triggers import Triggers


def make(pending: list[int], busy: list[bool], started: list[str], schedule: str | None = None) -> Triggers:
    return Triggers(threshold=3, debounce_s=0.2, schedule=schedule, pending=lambda: pending[0],
                    busy=lambda: busy[0], start=started.append)


def test_threshold_is_debounced_into_one_run():
    async def go() -> list[str]:
        pending, busy, started = [0], [False], []
        t = make(pending, busy, started)
        for n in range(1, 8):  # a burst of files
            pending[0] = n
            t.changed()
            await asyncio.sleep(0.05)
        assert started == []  # still inside the quiet period
        await asyncio.sleep(0.4)
        return started

    assert asyncio.run(go()) == ["threshold"]


def test_below_threshold_or_busy_never_starts():
    async def go() -> list[str]:
        pending, busy, started = [2], [False], []
        t = make(pending, busy, started)
        t.changed()
        pending[0], busy[0] = 5, True
        t.changed()
        await asyncio.sleep(0.4)
        return started

    assert asyncio.run(go()) == []


def test_schedule_registers_a_next_fire_time_and_skips_without_pending():
    async def go() -> tuple[float | None, list[str]]:
        pending, busy, started = [0], [False], []
        t = make(pending, busy, started, schedule="0 3 * * *")
        t.start_scheduler()
        nxt = t.next_schedule_at()
        t._fire_schedule()  # nothing pending: skip
        pending[0] = 1
        busy[0] = True
        t._fire_schedule()  # a run is active: skip
        busy[0] = False
        t._fire_schedule()
        t.stop()
        return nxt, started

    nxt, started = asyncio.run(go())
    assert nxt is not None
    assert started == ["schedule"]


def test_threshold_waits_out_the_hold_after_a_failed_run():
    import time

    async def go() -> tuple[list[str], list[str]]:
        pending, busy, started = [5], [False], []
        t = make(pending, busy, started)
        t.hold_until = time.time() + 0.6
        t.changed()
        await asyncio.sleep(0.4)  # past the debounce, still inside the hold
        during = list(started)
        await asyncio.sleep(0.6)
        return during, started

    during, after = asyncio.run(go())
    assert during == []
    assert after == ["threshold"]
