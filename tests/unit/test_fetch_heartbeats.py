"""The heartbeats that run beside a fetch end when the fetch does, even if a cancel is lost.

Python 3.11's ``asyncio.wait_for`` swallows a cancel that arrives as its inner call finishes; the
beat's status round trip is such a call. The stand-in job below loses the cancel the same way
(catches it and returns normally), which is what left a CI run waiting in Fetching.
"""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

from mhd.states.fetching import _heartbeats


class CancelLosingJob:
    def __init__(self) -> None:
        self.calls = 0

    async def status(self) -> None:
        self.calls += 1
        try:
            await asyncio.sleep(0.05)
        except asyncio.CancelledError:
            return  # the cancel is lost, as in wait_for on 3.11


def test_heartbeats_end_with_the_fetch_even_when_the_status_call_loses_the_cancel():
    job = CancelLosingJob()
    ctx = SimpleNamespace(cfg=SimpleNamespace(heartbeat_interval_s=0.01))

    async def fetch() -> None:
        async with _heartbeats(ctx, job):  # type: ignore[arg-type]
            while job.calls < 3:  # inside a status call, most of the time
                await asyncio.sleep(0.01)

    async def main() -> None:
        await asyncio.wait_for(fetch(), 5)

    asyncio.run(main())
    assert job.calls >= 3  # the beat did run, and beat more than once
