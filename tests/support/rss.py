"""Peak resident memory of this process while something runs (sampled by a thread)."""

from __future__ import annotations

import gc
import threading
import time
from collections.abc import Awaitable
from dataclasses import dataclass

import psutil


@dataclass(frozen=True)
class RssPeak:
    idle: int  # bytes, just before
    peak: int  # bytes, the most seen while it ran
    seconds: float

    @property
    def growth(self) -> int:
        return self.peak - self.idle


async def rss_peak_during(work: Awaitable[object], *, settle_s: float = 0.0, interval_s: float = 0.002) -> RssPeak:
    """Await ``work`` while a thread samples RSS; idle is taken after a collection (and ``settle_s``)."""
    me = psutil.Process()
    gc.collect()
    if settle_s:
        time.sleep(settle_s)
    idle = me.memory_info().rss
    peak = idle
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, me.memory_info().rss)
            time.sleep(interval_s)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    started = time.perf_counter()
    try:
        await work
    finally:
        done.set()
        sampler.join()
    return RssPeak(idle, max(peak, me.memory_info().rss), time.perf_counter() - started)
