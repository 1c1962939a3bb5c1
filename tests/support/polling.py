"""One way for tests and benchmarks to wait on something another process or thread does."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any


def wait_until(pred: Callable[[], Any], timeout: float, what: str, *, interval: float = 0.05,
               on_timeout: Callable[[], str] = lambda: "") -> Any:
    """Poll ``pred`` until it returns something truthy (returned); AssertionError after ``timeout``.

    ``on_timeout`` adds what helps to understand the failure (a log tail, the last value seen).
    """
    deadline = time.monotonic() + timeout
    while True:
        got = pred()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}\n{on_timeout()}")
        time.sleep(interval)
