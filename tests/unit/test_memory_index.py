"""The daemon's pending-memory count: kept from each file change, checked against a full recount."""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import pytest

from mhd.config import DatasetConfig
from mhd.daemon.watcher import MemoryIndex
from mhd.dataset.memories import Memory, iter_memory_files, read_memory
from mhd.store import Store
from tests.support.memories import OLD, memory, write


@pytest.fixture
def root(tmp_path: Path) -> Path:
    r = tmp_path / "episodic"
    r.mkdir()
    return r


@pytest.fixture
def store(tmp_path: Path) -> Store:
    s = Store(f"sqlite:///{tmp_path / 'mhd.db'}")
    yield s  # type: ignore[misc]
    s.close()


def started(root: Path, store: Store) -> MemoryIndex:
    index = MemoryIndex(root, store, DatasetConfig())
    index.install(index.rescan_blocking())
    return index


def brute_pending(root: Path, store: Store) -> int:
    """What the count must be: distinct keys of the readable memories, less the trained ones."""
    keys = {m.key for p in iter_memory_files(root) if isinstance(m := read_memory(p, root), Memory)}
    return len(keys - store.trained_keys())


def test_rescan_counts_distinct_memories_once_and_no_rejects(root: Path, store: Store) -> None:
    write(root, "2026/a.json", memory("The same memory, twice."))
    write(root, "2026/copy-of-a.json", memory("The same memory, twice.", id="other-id"))
    write(root, "2026/b.json", memory("Another one."))
    write(root, "2026/bad.json", text="{not json")
    write(root, "2026/recent.json", text='{"content": "half', mtime=None)

    index = started(root, store)

    assert index.pending == 2 == brute_pending(root, store)
    assert index.not_ready == {str(root / "2026/recent.json")}


def test_changes_move_the_count_like_a_recount(root: Path, store: Store) -> None:
    a = write(root, "2026/a.json", memory("First."))
    index = started(root, store)
    assert index.pending == 1

    b = write(root, "2026/b.json", memory("Second."), mtime=None)
    index.update(str(b))
    assert index.pending == 2

    dup = write(root, "2026/dup.json", memory("Second.", id="x"), mtime=None)
    index.update(str(dup))
    assert index.pending == 2  # same content: same memory

    b.unlink()
    index.remove(str(b))
    assert index.pending == 2  # its copy still holds it

    a.rename(root / "2026/a-renamed.json")
    index.remove(str(a))
    index.update(str(root / "2026/a-renamed.json"))
    assert index.pending == 2

    write(root, "2026/dup.json", memory("Rewritten to something new."), mtime=None)
    index.update(str(dup))
    assert index.pending == 2 == brute_pending(root, store)  # "Second." gone, a new one in

    write(root, "2026/dup.json", text="{broken", mtime=OLD)
    index.update(str(dup))
    assert index.pending == 1 == brute_pending(root, store)


def test_trained_memories_leave_the_count_and_do_not_come_back(root: Path, store: Store) -> None:
    a = write(root, "2026/a.json", memory("Trained soon."))
    write(root, "2026/b.json", memory("Still pending."))
    index = started(root, store)
    key = read_memory(a, root)
    assert isinstance(key, Memory)

    store.mark_trained([key.key], "run-1")
    index.mark_trained([key.key])
    assert index.pending == 1

    again = write(root, "2027/same-as-a.json", memory("Trained soon.", id="new"), mtime=None)
    index.update(str(again))
    assert index.pending == 1 == brute_pending(root, store)


def test_a_folder_moved_away_takes_its_memories(root: Path, store: Store, tmp_path: Path) -> None:
    write(root, "2025/x.json", memory("In 2025."))
    write(root, "2025-extra/y.json", memory("A sibling whose name starts the same."))
    write(root, "2026/z.json", memory("In 2026."))
    index = started(root, store)
    assert index.pending == 3

    shutil.move(str(root / "2025"), str(tmp_path / "moved-out"))
    index.remove_tree(str(root / "2025"))

    assert index.pending == 2 == brute_pending(root, store)


def test_a_restart_finds_the_same_count_without_parsing_again(root: Path, store: Store) -> None:
    for i in range(30):
        write(root, f"2026/{i:02d}.json", memory(f"Memory number {i % 20}."))
    first = MemoryIndex(root, store, DatasetConfig())
    cold = first.rescan_blocking()
    first.install(cold)

    second = MemoryIndex(root, store, DatasetConfig())
    warm = second.rescan_blocking()
    second.install(warm)

    assert (cold.parsed, cold.cached, cold.pending) == (30, 0, 20)
    assert (warm.parsed, warm.cached, warm.pending) == (0, 30, 20)


def test_random_changes_keep_the_count_equal_to_a_recount(root: Path, store: Store) -> None:
    rng = random.Random(7)
    contents = [f"Memory {i}." for i in range(12)]
    for i in range(20):
        write(root, f"d{i % 3}/{i}.json", memory(rng.choice(contents)))
    index = started(root, store)
    for step in range(200):
        op = rng.random()
        name = f"d{rng.randrange(4)}/{rng.randrange(30)}.json"
        path = root / name
        if op < 0.55:
            write(root, name, memory(rng.choice(contents)), mtime=None)
            index.update(str(path))
        elif op < 0.75:
            if path.exists():
                path.unlink()
            index.remove(str(path))
        elif op < 0.85:
            write(root, name, text=rng.choice(["{", "[]", '{"content": 3}']), mtime=OLD)
            index.update(str(path))
        elif op < 0.92:
            keys = [m.key for p in iter_memory_files(root) if isinstance(m := read_memory(p, root), Memory)]
            if keys:
                picked = rng.sample(keys, 1)
                store.mark_trained(picked, f"run-{step}")
                index.mark_trained(picked)
        else:
            folder = root / f"d{rng.randrange(4)}"
            shutil.rmtree(folder, ignore_errors=True)
            index.remove_tree(str(folder))
        assert index.pending == brute_pending(root, store), f"step {step}: {op:.2f} {name}"


def test_a_file_caught_mid_rewrite_at_startup_waits_uncounted_until_it_parses(root: Path, store: Store) -> None:
    a = write(root, "2026/a.json", memory("Before the rewrite."))
    assert started(root, store).pending == 1

    write(root, "2026/a.json", text='{"content": "After the re', mtime=None)  # the daemon was down
    index = started(root, store)
    assert (index.pending, index.not_ready) == (0, {str(a)})

    write(root, "2026/a.json", memory("After the rewrite."), mtime=None)
    assert index.update(str(a)) is False
    assert index.pending == 1 == brute_pending(root, store)
