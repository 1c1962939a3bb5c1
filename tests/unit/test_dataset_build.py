"""Building dataset.jsonl + dataset_manifest.json from a memory folder."""

from __future__ import annotations

import hashlib
import json
import shutil
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from mhd.config import DatasetConfig
from mhd.dataset.build import build_dataset
from mhd.dataset.memories import iter_memory_files, read_memory
from mhd.errors import DatasetError
from tests.support.memories import memory, one_of_each_reject, write, write_examples_to

NOW = datetime(2026, 7, 1, tzinfo=UTC)


def cfg(**kw: Any) -> DatasetConfig:
    kw.setdefault("persona_name", "Maya")
    return DatasetConfig(**kw)


def records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def stamp(days: float) -> str:
    return (NOW - timedelta(days=days)).isoformat().replace("+00:00", "Z")


@pytest.fixture
def mems(tmp_path: Path) -> Path:
    root = tmp_path / "episodic"
    root.mkdir()
    return root


def test_examples_build_counts_and_record_shape(tmp_path: Path) -> None:
    root = write_examples_to(tmp_path / "episodic")

    m = build_dataset(root, tmp_path / "out", cfg(), now=NOW)

    rows = records(tmp_path / "out" / "dataset.jsonl")
    assert m["samples"] == len(rows) > 40
    assert m["rejects"] == {"encrypted": 1, "negative_feedback": 1, "no_consent": 1}
    assert m["skipped"] == {"type_excluded": 4}  # task, tool_invocation, action, file_read
    assert m["memories_read"] == len(m["memory_keys"]) == m["samples"] + 4
    assert m["sha256"] == hashlib.sha256((tmp_path / "out" / "dataset.jsonl").read_bytes()).hexdigest()
    assert set(m["by_type"]) >= {"conversation", "reflection", "inner_dialogue", "dream", "observation"}
    assert sum(m["by_type"].values()) == m["samples"]
    assert m["time_range"][0].startswith("2025-09") and m["time_range"][1].startswith("2026-06")
    assert sorted(r["key"] for r in rows) == m["sample_keys"]
    assert set(m["sample_keys"]) <= set(m["memory_keys"])
    for r in rows:
        roles = [msg["role"] for msg in r["messages"]]
        assert roles == ["system", "user", "assistant"]
        assert r["messages"][2]["content"] == r["output"] and r["output"]
        assert r["messages"][1]["content"].startswith(r["instruction"])
        assert "Maya" in r["messages"][0]["content"] and "Maya" in r["instruction"]
        assert r["text"].startswith("### Instruction:\n") and r["text"].endswith(r["output"])
    assert json.loads((tmp_path / "out" / "dataset_manifest.json").read_text()) == m


def test_same_input_twice_gives_identical_bytes(tmp_path: Path) -> None:
    root = write_examples_to(tmp_path / "a")
    copy = tmp_path / "b"
    shutil.copytree(root, copy)  # new mtimes, same content

    m1 = build_dataset(root, tmp_path / "o1", cfg(max_samples=20, holdout_fraction=0.2), now=NOW)
    m2 = build_dataset(copy, tmp_path / "o2", cfg(max_samples=20, holdout_fraction=0.2),
                       now=NOW + timedelta(days=40))

    for name in ("dataset.jsonl", "eval.jsonl"):
        assert (tmp_path / "o1" / name).read_bytes() == (tmp_path / "o2" / name).read_bytes()
    assert m1["sha256"] == m2["sha256"] and m1["sample_keys"] == m2["sample_keys"]
    assert m1["samples"] + m1["eval_samples"] == 20


def test_exact_and_normalized_duplicates_are_dropped(mems: Path, tmp_path: Path) -> None:
    text = "The cottonwoods by the river are turning yellow again this week."
    write(mems, "2026/03/01/a.json", memory(text, timestamp=stamp(10)))
    write(mems, "2026/03/01/copy-of-a.json", memory(text, timestamp=stamp(9), id="evt-2"))  # exact
    write(mems, "2026/03/02/b.json", memory("  the COTTONWOODS by the river are turning yellow again, this week!! ",
                                             timestamp=stamp(8)))  # normalized duplicate
    write(mems, "2026/03/03/c.json", memory("A different memory about Juniper at the dog park.",
                                             timestamp=stamp(7)))

    m = build_dataset(mems, tmp_path / "out", cfg(), now=NOW)

    outputs = [r["output"] for r in records(tmp_path / "out" / "dataset.jsonl")]
    assert outputs == [text, "A different memory about Juniper at the dog park."]
    assert m["skipped"]["duplicate"] == 2
    assert m["memories_read"] == 3  # the exact copy is the same memory; the respaced one is not


def test_voice_owner_vs_assistant(mems: Path, tmp_path: Path) -> None:
    write(mems, "2026/a.json", memory("User: Should I take the staff role?\n\nAssistant: What would a good "
                                      "week in that role look like for you?", type="conversation",
                                      tags=["career"], timestamp=stamp(3)))
    write(mems, "2025/b.json", memory('Me: "I finally finished the Postgres migration this weekend."',
                                      type="conversation", response="That is a big win, well done.",
                                      timestamp=stamp(200)))

    build_dataset(mems, tmp_path / "owner", cfg(voice="owner"), now=NOW)
    build_dataset(mems, tmp_path / "assistant", cfg(voice="assistant"), now=NOW)

    owner = records(tmp_path / "owner" / "dataset.jsonl")
    assistant = records(tmp_path / "assistant" / "dataset.jsonl")
    assert [r["output"] for r in owner] == ["I finally finished the Postgres migration this weekend.",
                                            "Should I take the staff role?"]
    assert [r["output"] for r in assistant] == ["That is a big win, well done.",
                                                "What would a good week in that role look like for you?"]
    assert [r["input"] for r in assistant] == ["I finally finished the Postgres migration this weekend.",
                                               "Should I take the staff role?"]
    assert "career" in owner[1]["input"]


def test_assistant_voice_skips_conversations_without_a_reply(mems: Path, tmp_path: Path) -> None:
    write(mems, "2026/a.json", memory('Me: "Talking to myself about the garden plans."', type="conversation"))
    m = build_dataset(mems, tmp_path / "out", cfg(voice="assistant"), now=NOW)
    assert m["samples"] == 0 and m["skipped"] == {"no_reply": 1}


def test_no_consent_and_negative_feedback_never_reach_the_dataset(mems: Path, tmp_path: Path) -> None:
    write(mems, "a.json", memory("User: a private health worry\n\nAssistant: that is a lot to carry",
                                 type="conversation", metadata={"trainingConsent": False}))
    write(mems, "b.json", memory("User: where was the bakery?\n\nAssistant: ask someone else",
                                 type="conversation", metadata={"reinforcementSignal": -1}))
    write(mems, "c.json", memory("User: what should I plant next?\n\nAssistant: peas, they are easy",
                                 type="conversation", metadata={"reinforcementSignal": 1, "trainingConsent": True}))

    m = build_dataset(mems, tmp_path / "out", cfg(voice="assistant", min_chars=5), now=NOW)

    text = (tmp_path / "out" / "dataset.jsonl").read_text()
    assert "health" not in text and "bakery" not in text and "peas" in text
    assert m["rejects"] == {"negative_feedback": 1, "no_consent": 1}
    assert len(m["memory_keys"]) == 1


def test_rejects_are_counted_with_examples(mems: Path, tmp_path: Path) -> None:
    files = one_of_each_reject(mems, tmp_path / "outside")
    write(mems, "2026/ok.json", memory("One good memory among all the broken ones."))

    m = build_dataset(mems, tmp_path / "out", cfg(max_file_bytes=2048), now=NOW)

    listed = set(files) - {"not_file"}  # a folder named *.json is walked into, not read
    assert m["rejects"] == dict.fromkeys(sorted(listed), 1)
    # A file withdrawn from training is counted but never named (its name is a slug of its text).
    assert {e["reason"] for e in m["reject_examples"]} == listed - {"no_consent"}
    assert all(e["detail"] and e["path"] for e in m["reject_examples"])
    assert m["samples"] == 1


def test_half_written_file_is_counted_not_ready(mems: Path, tmp_path: Path) -> None:
    write(mems, "2026/new.json", text='{"content": "still being wri', mtime=None)
    write(mems, "2026/ok.json", memory("One good memory next to a file being written."))
    m = build_dataset(mems, tmp_path / "out", cfg())
    assert m["not_ready"] == 1 and m["rejects"] == {} and m["samples"] == 1


def test_type_filter_and_min_chars(mems: Path, tmp_path: Path) -> None:
    write(mems, "a.json", memory("calendar.search() -> 2 events, nothing else", type="tool_invocation"))
    write(mems, "b.json", memory("Too short.", type="reflection"))
    write(mems, "c.json", memory("A dream about the river flowing through the office.", type="dream"))

    m = build_dataset(mems, tmp_path / "out", cfg(min_chars=20), now=NOW)

    assert m["skipped"] == {"too_short": 1, "type_excluded": 1}
    assert m["by_type"] == {"dream": 1}
    assert len(m["memory_keys"]) == 3  # every valid memory is listed for the ledger


def test_cap_prefers_recent_memories(mems: Path, tmp_path: Path) -> None:
    for i in range(60):
        write(mems, f"2026/{i:03d}.json", memory(f"Memory number {i} about an ordinary day at home.",
                                                 timestamp=stamp(i * 30)))  # one a month, up to 5 years

    m = build_dataset(mems, tmp_path / "out", cfg(max_samples=10, half_life_days=30), now=NOW)

    ages = sorted(int(r["output"].split()[2]) for r in records(tmp_path / "out" / "dataset.jsonl"))
    assert m["samples"] == 10 and m["skipped"]["over_cap"] == 50
    assert sum(ages) / len(ages) < 12  # uniform picks would average ~30 months
    assert len(m["memory_keys"]) == 60


def test_undated_memories_are_picked_last(mems: Path, tmp_path: Path) -> None:
    write(mems, "a.json", {"content": "An undated memory with no timestamp field at all."})
    write(mems, "b.json", memory("A dated memory from last week about the garden.", timestamp=stamp(7)))
    build_dataset(mems, tmp_path / "out", cfg(max_samples=1), now=NOW)
    assert [r["output"] for r in records(tmp_path / "out" / "dataset.jsonl")] == [
        "A dated memory from last week about the garden."]


def test_holdout_split_is_disjoint_and_stale_eval_removed(tmp_path: Path) -> None:
    root = write_examples_to(tmp_path / "episodic")
    m = build_dataset(root, tmp_path / "out", cfg(holdout_fraction=0.25), now=NOW)
    train = {r["key"] for r in records(tmp_path / "out" / "dataset.jsonl")}
    held = {r["key"] for r in records(tmp_path / "out" / "eval.jsonl")}
    assert not train & held and len(held) == m["eval_samples"] > 0
    # The rule is per key: a memory is held out iff its key hashes below the fraction.
    u = {k: int(hashlib.sha256(f"holdout:{k}".encode()).hexdigest()[:16], 16) / 2.0**64 for k in train | held}
    assert held == {k for k, x in u.items() if x < 0.25}
    assert m["eval_sha256"] == hashlib.sha256((tmp_path / "out" / "eval.jsonl").read_bytes()).hexdigest()

    m = build_dataset(root, tmp_path / "out", cfg(holdout_fraction=0), now=NOW)
    assert m["eval_samples"] == 0 and not (tmp_path / "out" / "eval.jsonl").exists()


def test_held_out_memories_stay_held_out_as_memories_are_added(tmp_path: Path) -> None:
    root = write_examples_to(tmp_path / "episodic")
    first = build_dataset(root, tmp_path / "a", cfg(holdout_fraction=0.1, holdout_min=8), now=NOW)
    for i in range(30):
        write(root, f"extra-{i}.json", memory(f"An extra memory number {i} about the long walk home today.",
                                               timestamp=stamp(1)))
    second = build_dataset(root, tmp_path / "b", cfg(holdout_fraction=0.1, holdout_min=8), now=NOW)
    assert len(first["heldout_keys"]) >= 8

    def by_rule(keys: list[str]) -> set[str]:  # held out by the fraction itself (not a top-up to the minimum)
        return {k for k in keys if int(hashlib.sha256(f"holdout:{k}".encode()).hexdigest()[:16], 16) / 2.0**64 < 0.1}

    assert by_rule(first["heldout_keys"]) and by_rule(first["heldout_keys"]) <= set(second["heldout_keys"])
    assert not set(second["heldout_keys"]) & set(second["train_keys"])


def test_too_few_memories_for_the_minimum_hold_nothing_out(tmp_path: Path) -> None:
    root = write_examples_to(tmp_path / "episodic")
    m = build_dataset(root, tmp_path / "out", cfg(holdout_fraction=0.1, holdout_min=1000), now=NOW)
    assert m["eval_samples"] == 0 and m["heldout_keys"] == []


def test_control_characters_and_spacing_are_cleaned(mems: Path, tmp_path: Path) -> None:
    write(mems, "a.json", memory("Line one\x07 with a bell,\r\nline   two\u200b.\n\n\n\n\nLast\x00 line here.",
                                 type="reflection"))
    build_dataset(mems, tmp_path / "out", cfg(), now=NOW)
    (row,) = records(tmp_path / "out" / "dataset.jsonl")
    assert row["output"] == "Line one with a bell,\nline two.\n\nLast line here."


def test_unreadable_memory_dir_raises_dataset_error(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="does not exist"):
        build_dataset(tmp_path / "missing", tmp_path / "out", cfg())
    with pytest.raises(DatasetError, match="not a folder"):
        build_dataset(write(tmp_path, "file.json", {}), tmp_path / "out", cfg())


def test_empty_memory_dir_gives_an_empty_dataset(mems: Path, tmp_path: Path) -> None:
    m = build_dataset(mems, tmp_path / "out", cfg())
    assert m["samples"] == 0 and m["time_range"] is None
    assert (tmp_path / "out" / "dataset.jsonl").read_bytes() == b""


def test_build_holds_a_bounded_number_of_samples(mems: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Streaming: the candidate heap never grows past max_samples + 1, however many files."""
    import heapq

    import mhd.dataset.build as build

    for i in range(300):
        write(mems, f"2026/{i:04d}.json", memory(f"Memory {i}: another ordinary walk by the river.",
                                                 timestamp=stamp(i)))
    biggest = 0
    real_push = heapq.heappush

    def counting_push(heap: list[Any], item: Any) -> None:
        nonlocal biggest
        real_push(heap, item)
        biggest = max(biggest, len(heap))

    monkeypatch.setattr(build.heapq, "heappush", counting_push)
    m = build_dataset(mems, tmp_path / "out", cfg(max_samples=25), now=NOW)
    assert m["samples"] == 25 and biggest == 26


def test_keys_match_read_memory(tmp_path: Path) -> None:
    root = write_examples_to(tmp_path / "episodic")
    m = build_dataset(root, tmp_path / "out", cfg(), now=NOW)
    keys = set()
    for p in iter_memory_files(root):
        r = read_memory(p, root)
        if hasattr(r, "key"):
            keys.add(r.key)  # type: ignore[union-attr]
    assert sorted(keys) == m["memory_keys"]


def test_lone_surrogates_never_reach_the_utf8_output(mems: Path, tmp_path: Path) -> None:
    write(mems, "a.json", text='{"content": "A broken emoji \\ud83d in an otherwise fine memory.", '
                               '"tags": ["odd\\udc00tag"], "type": "observation"}')
    m = build_dataset(mems, tmp_path / "out", cfg(), now=NOW)
    (row,) = records(tmp_path / "out" / "dataset.jsonl")
    assert m["samples"] == 1 and row["output"] == "A broken emoji in an otherwise fine memory."
    assert row["input"] == "oddtag"
