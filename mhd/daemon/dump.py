"""What every asyncio task and thread of the daemon is waiting on: `kill -USR1` writes it to the log.

For a daemon that seems stuck (a state that does not move, `mhd status` answering but nothing
progressing): each task's whole await chain, down to the future it waits for, and each thread's
stack. docs/OPERATIONS.md says when to use it.
"""

from __future__ import annotations

import asyncio
import sys
import threading
import traceback
from types import FrameType
from typing import Any

MAX_DEPTH = 40


def _where(frame: FrameType) -> str:
    return f"{frame.f_code.co_filename}:{frame.f_lineno} in {frame.f_code.co_name}"


def _first(obj: Any, *names: str) -> Any:
    # coroutines, generator-based awaitables and async generators name the same things apart
    for name in names:
        value = getattr(obj, name, None)
        if value is not None:
            return value
    return None


def await_chain(coro: Any) -> tuple[list[FrameType], Any]:
    """The frames of ``coro`` and of what it awaits, outermost first, and the innermost awaited
    object that is not a coroutine (usually the future it is blocked on), or None."""
    frames: list[FrameType] = []
    for _ in range(MAX_DEPTH):
        frame = _first(coro, "cr_frame", "gi_frame", "ag_frame")
        if frame is None:
            return frames, coro
        frames.append(frame)
        inner = _first(coro, "cr_await", "gi_yieldfrom", "ag_await")
        if inner is None:
            return frames, None
        coro = inner
    return frames, coro


def describe(loop: asyncio.AbstractEventLoop | None = None) -> str:
    """A readable dump of all tasks of ``loop`` (the running one by default) and all threads."""
    tasks = sorted(asyncio.all_tasks(loop), key=lambda t: t.get_name())
    lines = [f"{len(tasks)} asyncio task(s):"]
    for task in tasks:
        frames, waiting_on = await_chain(task.get_coro())
        lines.append(f"  task {task.get_name()}{' (done)' if task.done() else ''}")
        lines += [f"    {_where(f)}" for f in frames]
        if waiting_on is not None:
            lines.append(f"    waiting on {waiting_on!r:.300}")
    names = {t.ident: t.name for t in threading.enumerate()}
    current = sys._current_frames()
    lines.append(f"{len(current)} thread(s):")
    for ident, frame in current.items():
        lines.append(f"  thread {names.get(ident, ident)}")
        lines += ["    " + line.strip() for line in traceback.format_stack(frame)[-12:] if line.strip()]
    return "\n".join(lines)
