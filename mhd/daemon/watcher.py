"""Which memories are new: a path → content-key index fed by a startup rescan and watchdog events.

Memories are counted by content key (``mhd.dataset.memories.Memory.key``), so a rewrite or a
rename of the same memory never counts twice. The DB keeps (mtime, size, key) per path, so a
warm rescan only stats files. Half-written files (``NotReady``) are re-read later.
"""

from __future__ import annotations

import asyncio
import ctypes
import gc
import logging
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from watchdog.events import (
    DirCreatedEvent,
    DirDeletedEvent,
    DirMovedEvent,
    FileClosedEvent,
    FileCreatedEvent,
    FileDeletedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers import Observer

from mhd.config import DatasetConfig
from mhd.dataset.memories import NotReady, iter_memory_files, iter_memory_stats, memory_key_at
from mhd.store import Store

log = logging.getLogger(__name__)

SUFFIXES = (".json", ".json.enc")

FileInfo = tuple[int, int, str | None]  # mtime_ns, size, key (None: not a usable memory)

# Only what can change a memory. Without this filter watchdog also subscribes to open and
# close-without-write: merely walking 100k files then overflows the kernel's inotify queue,
# watchdog re-adds every watch (walking the tree again) and the daemon spins forever.
EVENTS = [FileCreatedEvent, FileModifiedEvent, FileClosedEvent, FileMovedEvent, FileDeletedEvent,
          DirCreatedEvent, DirMovedEvent, DirDeletedEvent]


def is_memory_path(path: str) -> bool:
    return path.endswith(SUFFIXES) and not os.path.basename(path).startswith(".")


@dataclass
class ScanResult:
    not_ready: set[str]
    parsed: int
    cached: int
    dirty: dict[str, FileInfo] = field(default_factory=dict)
    removed: list[str] = field(default_factory=list)

    @property
    def files(self) -> int:
        """Memory files found (not counting those not ready yet)."""
        return self.cached + len(self.dirty)


def scan(root: Path, cache: dict[str, tuple[int, int]], cfg: DatasetConfig) -> ScanResult:
    """Walk ``root``; re-read only files whose (mtime, size) changed since ``cache``.

    ``cache`` (path → (mtime_ns, size), from ``Store.file_cache``) is consumed: what is left
    in it at the end are files that are gone.
    """
    dirty: dict[str, FileInfo] = {}
    not_ready: set[str] = set()
    removed: list[str] = []
    parsed = cached = 0
    root_s = os.fspath(root)
    for p, st, linked in iter_memory_stats(root):
        hit = cache.pop(p, None)
        if hit is not None and hit[0] == st.st_mtime_ns and hit[1] == st.st_size:
            cached += 1
            continue
        parsed += 1
        key = memory_key_at(p, root_s, inside=not linked, max_bytes=cfg.max_file_bytes,
                            not_ready_grace_s=cfg.not_ready_grace_s)
        if isinstance(key, NotReady):
            not_ready.add(p)
            if hit is not None:  # changed and not parseable yet: not counted until it is
                removed.append(p)
            continue
        dirty[p] = (st.st_mtime_ns, st.st_size, key)
    removed.extend(cache)
    return ScanResult(not_ready, parsed, cached, dirty, removed)


@dataclass(frozen=True)
class RescanSummary:
    files: int
    parsed: int
    cached: int
    not_ready: frozenset[str]
    pending: int


class MemoryIndex:
    """Counts pending (untrained) memories; owned by the event loop thread.

    The path → key map lives in the DB (``memory_files``), not here: with 100k files in
    memory it cost the idle daemon ~60 MiB. The daemon holds only the count, kept up to date
    from each change's effect, and the few paths that are not ready yet.
    """

    def __init__(self, root: Path, store: Store, cfg: DatasetConfig) -> None:
        self.root = root
        self.store = store
        self.cfg = cfg
        self.pending = 0
        self.not_ready: set[str] = set()
        # key → why it left its file ("deleted", "excluded", "edited"): the forgetting's reason
        self.hints: dict[str, str] = {}

    def rescan_blocking(self) -> RescanSummary:
        """Thread-safe part of the startup rescan (reads files and the DB, touches no state)."""
        result = scan(self.root, self.store.file_cache(), self.cfg)
        self.store.save_file_cache(result.dirty, result.removed)
        summary = RescanSummary(result.files, result.parsed, result.cached, frozenset(result.not_ready),
                                self.store.pending_count())
        del result
        release_heap()
        return summary

    def install(self, summary: RescanSummary) -> None:
        self.pending = summary.pending
        self.not_ready = set(summary.not_ready)

    def _change(self, path: str, info: FileInfo | None, *, half_written: bool = False) -> None:
        old = None if half_written else self.store.memory_file_key(path)
        self.pending = max(0, self.pending + self.store.change_memory_file(path, info))
        if old is not None and (info is None or info[2] != old):
            if info is not None:
                self.hints[old] = "edited" if info[2] else "excluded"
            else:
                self.hints[old] = "deleted"

    def update(self, path: str) -> bool:
        """Re-read one path after an event; returns True if it is still not ready (retry later)."""
        self.not_ready.discard(path)
        try:
            st = os.stat(path)
        except OSError:
            self._change(path, None)
            return False
        key = memory_key_at(path, os.fspath(self.root), max_bytes=self.cfg.max_file_bytes,
                            not_ready_grace_s=self.cfg.not_ready_grace_s)
        if isinstance(key, NotReady):
            # Not counted until it parses: it may yet turn out to be a reject.
            self._change(path, None, half_written=True)
            self.not_ready.add(path)
            return True
        self._change(path, (st.st_mtime_ns, st.st_size, key))
        return False

    def remove(self, path: str) -> None:
        self.not_ready.discard(path)
        self._change(path, None)

    def remove_tree(self, folder: str) -> None:
        prefix = folder.rstrip(os.sep) + os.sep
        self.not_ready = {p for p in self.not_ready if not p.startswith(prefix)}
        if self.store.drop_memory_files_under(folder):
            self.pending = self.store.pending_count()

    def mark_trained(self, keys: Iterable[str]) -> None:
        """A run's memories were recorded as trained (in the DB, by the caller): recount."""
        del keys
        self.pending = self.store.pending_count()


def release_heap() -> None:
    """Give the scan's freed memory back to the OS (glibc keeps it otherwise; ~30 MiB at 100k files)."""
    gc.collect()
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


class _Handler(FileSystemEventHandler):
    def __init__(self, emit: Callable[[str, str], None]) -> None:
        self.emit = emit

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.is_directory:
            if event.event_type in ("moved", "deleted"):
                self.emit("dirgone", str(event.src_path))
            if event.event_type in ("created", "moved"):
                # A folder moved in (or created with files already inside) brings its files along.
                self.emit("dir", str(getattr(event, "dest_path", "") or event.src_path))
            return
        src = str(event.src_path)
        if event.event_type in ("created", "modified", "closed"):
            if is_memory_path(src):
                self.emit("update", src)
        elif event.event_type == "moved":
            dest = str(getattr(event, "dest_path", ""))
            if is_memory_path(src):
                self.emit("remove", src)
            if dest and is_memory_path(dest):
                self.emit("update", dest)
        elif event.event_type == "deleted" and is_memory_path(src):
            self.emit("remove", src)


class Watcher:
    """watchdog's thread hands events to the loop; the loop updates the index."""

    def __init__(self, index: MemoryIndex, on_change: Callable[[], None], retry_after: float = 2.0) -> None:
        self.index = index
        self.on_change = on_change
        self.retry_after = retry_after
        self.queue: asyncio.Queue[tuple[str, str]] = asyncio.Queue()
        self.observer: Observer | None = None  # type: ignore[valid-type]
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> RescanSummary:
        """Watch, then rescan: in this order nothing written meanwhile is missed."""
        # One after the other, not overlapped: the observer's lasting objects (a watch per
        # folder) allocated among the scan's passing ones would pin ~30 MiB of freed memory.
        await asyncio.to_thread(self._start_observer, asyncio.get_running_loop())
        result = await asyncio.to_thread(self.index.rescan_blocking)
        self.index.install(result)
        log.info("rescan of %s: %d memory files (%d parsed, %d cached), %d pending, %d not ready yet",
                 self.index.root, result.files, result.parsed, result.cached, self.index.pending,
                 len(result.not_ready))
        for p in result.not_ready:
            self._retry_later(p)
        return result

    def _start_observer(self, loop: asyncio.AbstractEventLoop) -> None:
        def emit(kind: str, path: str) -> None:
            loop.call_soon_threadsafe(self.queue.put_nowait, (kind, path))

        self.index.root.mkdir(parents=True, exist_ok=True)
        observer = Observer()
        observer.schedule(_Handler(emit), str(self.index.root), recursive=True, event_filter=EVENTS)
        observer.daemon = True
        observer.start()
        self.observer = observer

    def start_consumer(self) -> None:
        self._task = asyncio.create_task(self._consume(), name="watcher")

    def _retry_later(self, path: str) -> None:
        loop = asyncio.get_running_loop()
        loop.call_later(self.retry_after, self.queue.put_nowait, ("update", path))

    async def _consume(self) -> None:
        while True:
            kind, path = await self.queue.get()
            try:
                if kind == "remove":
                    self.index.remove(path)
                elif kind == "dirgone":
                    self.index.remove_tree(path)
                elif kind == "dir":
                    for i, p in enumerate(iter_memory_files(Path(path)), 1):
                        if self.index.update(str(p)):
                            self._retry_later(str(p))
                        if i % 64 == 0:
                            await asyncio.sleep(0)
                elif self.index.update(path):
                    self._retry_later(path)
            except Exception:
                log.exception("watcher: could not handle %s %s", kind, path)
            if self.queue.empty():
                self.on_change()
            else:
                # A burst (10k files copied in: ~0.4 ms each) must not keep `mhd status` waiting.
                await asyncio.sleep(0)

    async def stop(self) -> None:
        if self.observer is not None:
            self.observer.stop()
            await asyncio.to_thread(self.observer.join, 5)
        if self._task is not None:
            self._task.cancel()
