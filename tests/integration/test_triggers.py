"""Threshold triggering from a watched folder, restart rescans, and no double counting."""

from __future__ import annotations

import json
import os

import pytest

from tests.support.daemon import write_memories, write_memory

pytestmark = pytest.mark.slow


def test_threshold_from_files_written_into_the_watched_folder_starts_a_run(denv):
    denv.configure(threshold=4)
    d = denv.daemon().start()
    write_memories(denv.memories, 3)
    d.wait_for(lambda: d.status()["pending_memories"] == 3, 10, "3 pending")
    assert d.status()["state"] == "Idle"  # below threshold: nothing starts
    write_memory(denv.memories, "one more memory makes four, which is the threshold")
    d.wait_for(lambda: (d.status()["last_run"] and d.status()["last_run"]["trigger"] == "threshold")
               or d.status()["run"] is not None, 20, "threshold run")
    d.wait_for(lambda: d.status()["state"] == "Idle" and d.status()["last_run"], 60, "run end")
    assert d.status()["last_run"]["outcome"] == "succeeded"


def test_memories_written_while_daemon_is_down_are_counted_at_restart(denv):
    d = denv.daemon().start()
    d.stop()
    write_memories(denv.memories, 3)
    d2 = denv.daemon().start()
    assert d2.status()["pending_memories"] == 3


def test_rewrite_or_rename_of_the_same_memory_does_not_count_twice(denv):
    d = denv.daemon().start()
    p = write_memory(denv.memories, "the same memory, written by the assistant once")
    d.wait_for(lambda: d.status()["pending_memories"] == 1, 10, "1 pending")
    body = json.loads(p.read_text())
    body["metadata"] = {"processed": True}  # the writer rewrites files in place
    p.write_text(json.dumps(body, indent=2))
    renamed = p.with_name("evt-202607182230000-renamed.json")
    os.rename(p, renamed)
    copy = renamed.parent / "evt-202607182230001-copy.json"
    copy.write_text(renamed.read_text())
    write_memory(denv.memories, "a genuinely different memory about the garden")
    d.wait_for(lambda: d.status()["pending_memories"] == 2, 10, "2 pending")
    d.stop()
    d2 = denv.daemon().start()
    assert d2.status()["pending_memories"] == 2


def test_malformed_files_never_stop_the_daemon(denv):
    d = denv.daemon().start()
    (denv.memories / "2026").mkdir(exist_ok=True)
    (denv.memories / "2026" / "evt-1-bad.json").write_text("{not json")
    (denv.memories / "2026" / "evt-2-bin.json").write_bytes(os.urandom(300))
    write_memory(denv.memories, "a fine memory among broken ones, long enough")
    d.wait_for(lambda: d.status()["pending_memories"] == 1, 10, "1 pending")
    assert d.ping()


def test_a_folder_moved_out_and_back_in_is_uncounted_and_recounted(denv, tmp_path):
    d = denv.daemon().start()
    write_memories(denv.memories, 3)
    d.wait_for(lambda: d.status()["pending_memories"] == 3, 10, "3 pending")
    year = next(denv.memories.iterdir())
    outside = tmp_path / "parked"
    os.rename(year, outside)
    d.wait_for(lambda: d.status()["pending_memories"] == 0, 10, "0 pending after move-out")
    os.rename(outside, year)
    d.wait_for(lambda: d.status()["pending_memories"] == 3, 10, "3 pending after move-in")
