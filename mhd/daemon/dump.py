"""What every asyncio task and thread of the daemon is waiting on: `kill -USR1` writes it to the log.

For a daemon that seems stuck (a state that does not move, `mhd status` answering but nothing
progressing): each task's await chain, down to the future it waits for, and each busy thread's
stack. docs/OPERATIONS.md says when to use it.

Kept short on purpose (it is read in logs and in CI output that keeps only a tail): frames of the
standard library and of installed packages are dropped except the innermost one, and idle
executor threads are counted instead of listed.
"""

from __future__ import annotations

import asyncio
import sys
import threading
from pathlib import Path
from types import FrameType
from typing import Any

MAX_DEPTH = 40
THREAD_FRAMES = 12
_OURS = str(Path(__file__).resolve().parents[1])  # the mhd package folder


def _ours(frame: FrameType) -> bool:
    return frame.f_code.co_filename.startswith(_OURS)


def _trim(frames: list[FrameType]) -> list[FrameType]:
    """Our frames, and the innermost frame whatever it is (what the chain ends on)."""
    return [f for i, f in enumerate(frames) if _ours(f) or i == len(frames) - 1]


def _stack(frame: FrameType) -> list[FrameType]:
    """A thread's frames, outermost first."""
    frames: list[FrameType] = []
    f: FrameType | None = frame
    while f is not None:
        frames.append(f)
        f = f.f_back
    return frames[::-1]


def _idle_worker(frame: FrameType) -> bool:
    # A ThreadPoolExecutor worker waiting for work sits in its own `_worker` frame (the queue's get
    # is C code); one that runs a work item has the item's frames below it.
    return frame.f_code.co_name == "_worker" and frame.f_code.co_filename.endswith("concurrent/futures/thread.py")


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
        lines += [f"    {_where(f)}" for f in _trim(frames)]
        if waiting_on is not None:
            lines.append(f"    waiting on {waiting_on!r:.300}")
    names = {t.ident: t.name for t in threading.enumerate()}
    current = sys._current_frames()
    idle = {ident for ident, frame in current.items() if _idle_worker(frame)}
    lines.append(f"{len(current)} thread(s), {len(idle)} of them idle executor workers:")
    for ident, frame in current.items():
        if ident in idle:
            continue
        lines.append(f"  thread {names.get(ident, ident)}")
        lines += [f"    {_where(f)}" for f in _trim(_stack(frame))[-THREAD_FRAMES:]]
    return "\n".join(lines)
