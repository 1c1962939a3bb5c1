"""Parsing and validating single memory files: every answer is a Memory, a Reject or a NotReady."""

from __future__ import annotations

import json
import os
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mhd.dataset.memories import (
    REJECT_REASONS,
    Memory,
    NotReady,
    Reject,
    iter_memory_files,
    iter_memory_stats,
    memory_key_at,
    read_memory,
)
from tests.support.memories import OLD, file_name, memory, one_of_each_reject, write

MAX = 2048


def read(path: Path, root: Path, **kw: object) -> Memory | Reject | NotReady:
    return read_memory(path, root, max_bytes=MAX, **kw)  # type: ignore[arg-type]


@pytest.fixture
def root(tmp_path: Path) -> Path:
    r = tmp_path / "episodic"
    r.mkdir()
    return r


def test_valid_memory_keeps_fields_and_unknown_extras(root: Path) -> None:
    obj = memory("Walked Juniper along the river.", tags=["walk"], entities=["Juniper"], importance=0.7,
                 links=[{"type": "x", "target": "y"}], userId="u1", futureField={"a": 1},
                 metadata={"processed": True, "cognitiveMode": "dual"})
    path = write(root, "2026/03/01/" + file_name(obj["content"]), obj)

    m = read(path, root)

    assert isinstance(m, Memory)
    assert (m.type, m.content, m.tags, m.entities) == ("observation", obj["content"], ("walk",), ("Juniper",))
    assert m.timestamp == datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
    assert m.metadata == {"processed": True, "cognitiveMode": "dual"}
    assert m.extra == {"importance": 0.7, "links": [{"type": "x", "target": "y"}], "userId": "u1",
                       "futureField": {"a": 1}}
    assert len(m.key) == 64 and int(m.key, 16) >= 0


def test_missing_type_defaults_to_observation_and_missing_timestamp_is_none(root: Path) -> None:
    path = write(root, "2025/a.json", {"content": "Only content, nothing else at all."})
    m = read(path, root)
    assert isinstance(m, Memory)
    assert (m.type, m.timestamp, m.id, m.response) == ("observation", None, None, None)


def test_old_conversation_shape_keeps_response(root: Path) -> None:
    path = write(root, "2025/c.json", memory('Me: "Should I call Priya?"', type="conversation",
                                              response="Yes, a short message first."))
    m = read(path, root)
    assert isinstance(m, Memory) and m.response == "Yes, a short message first."


def test_every_reject_reason_from_a_file(root: Path, tmp_path: Path) -> None:
    files = one_of_each_reject(root, tmp_path / "outside")

    got = {reason: read(path, root) for reason, path in files.items()}

    for reason, result in got.items():
        assert isinstance(result, Reject), (reason, result)
        assert result.reason == reason, (reason, result)
        assert result.detail and result.path == files[reason]
    assert set(got) <= set(REJECT_REASONS)


@pytest.mark.parametrize(("field", "value", "named"), [
    ("content", 42, "content"),
    ("type", ["conversation"], "type"),
    ("response", {"text": "hi"}, "response"),
    ("entities", [1, 2], "entities"),
    ("metadata", "processed", "metadata"),
    ("timestamp", 1767225600, "timestamp"),
    ("timestamp", "yesterday", "timestamp"),
])
def test_wrong_type_detail_names_the_field(root: Path, field: str, value: object, named: str) -> None:
    path = write(root, "2026/x.json", {**memory("Some content that is long enough."), field: value})
    r = read(path, root)
    assert isinstance(r, Reject) and r.reason == "wrong_type"
    assert r.detail.startswith(named + ":")


def test_missing_content_is_empty_content(root: Path) -> None:
    r = read(write(root, "x.json", {"type": "observation", "tags": []}), root)
    assert isinstance(r, Reject) and (r.reason, r.detail) == ("empty_content", "content: missing")


def test_symlink_inside_root_is_read(root: Path) -> None:
    target = write(root, "2026/real.json", memory("Linked, but inside the memory folder."))
    link = root / "alias.json"
    link.symlink_to(target)
    assert isinstance(read(link, root), Memory)


def test_symlinked_folder_leading_outside_is_rejected(root: Path, tmp_path: Path) -> None:
    write(tmp_path / "other", "x.json", memory("Someone else's memory, outside the root."))
    (root / "linked").symlink_to(tmp_path / "other")
    r = read(root / "linked" / "x.json", root)
    assert isinstance(r, Reject) and r.reason == "symlink_outside"


def test_root_itself_may_be_a_symlink(tmp_path: Path) -> None:
    real = tmp_path / "real"
    write(real, "2026/a.json", memory("Reached through a symlinked memory_dir."))
    (tmp_path / "link").symlink_to(real)
    assert isinstance(read(tmp_path / "link" / "2026" / "a.json", tmp_path / "link"), Memory)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files regardless of permissions")
def test_unreadable_file(root: Path) -> None:
    path = write(root, "a.json", memory("Cannot be opened by this user."))
    path.chmod(0)
    r = read(path, root)
    assert isinstance(r, Reject) and r.reason == "unreadable"


def test_vanished_file(root: Path) -> None:
    r = read(root / "2026" / "never-written.json", root)
    assert isinstance(r, Reject) and r.reason == "vanished"


def test_half_written_recent_file_is_not_ready_then_a_reject_when_old(root: Path) -> None:
    full = json.dumps(memory("The writer was still busy with this one."), indent=2)
    path = write(root, "2026/03/01/partial.json", text=full[: len(full) // 2], mtime=None)

    assert isinstance(read(path, root), NotReady)
    later = time.time() + 60
    r = read(path, root, now=later)
    assert isinstance(r, Reject) and r.reason == "bad_json"


def test_just_created_empty_file_is_not_ready(root: Path) -> None:
    path = write(root, "new.json", text="", mtime=None)
    assert isinstance(read(path, root), NotReady)


def test_truncated_inside_a_multibyte_character_is_not_ready(root: Path) -> None:
    raw = json.dumps(memory("Café au lait by the river, in the morning."), ensure_ascii=False).encode()
    cut = raw[: raw.index("é".encode()) + 1]  # half of the two-byte é
    path = write(root, "cut.json", text=cut, mtime=None)
    assert isinstance(read(path, root), NotReady)


def test_lone_surrogate_in_content_is_a_memory(root: Path) -> None:
    text = '{"content": "half an emoji \\ud83d here, then text", "type": "observation"}'
    m = read(write(root, "s.json", text=text), root)
    assert isinstance(m, Memory) and "\ud83d" in m.content


def test_utf8_bom_is_accepted(root: Path) -> None:
    text = "\ufeff" + json.dumps(memory("Saved by an editor that writes a BOM."))
    assert isinstance(read(write(root, "bom.json", text=text), root), Memory)


def test_key_ignores_rewrites_and_renames(root: Path) -> None:
    obj = memory("User: hi there\n\nAssistant: hello, how was the walk?", type="conversation",
                 metadata={"processed": False})
    first = read(write(root, "2026/03/01/a.json", obj), root)
    rewritten = {**obj, "metadata": {"processed": True}, "tags": ["greeting"], "id": "evt-202603011200001"}
    second = read(write(root, "2026/03/02/renamed.json", rewritten), root)
    respaced = {**obj, "content": "User:  hi there\n\nAssistant:   hello, how was the walk?  "}
    third = read(write(root, "2026/03/03/b.json", respaced), root)
    changed = read(write(root, "2026/03/04/c.json", {**obj, "content": obj["content"] + "!"}), root)

    assert isinstance(first, Memory) and isinstance(second, Memory) and isinstance(third, Memory)
    assert isinstance(changed, Memory)
    assert first.key == second.key == third.key
    assert changed.key != first.key


def test_key_depends_on_type_and_response(root: Path) -> None:
    a = read(write(root, "a.json", memory("Same words here, twice over.", type="reflection")), root)
    b = read(write(root, "b.json", memory("Same words here, twice over.", type="dream")), root)
    c = read(write(root, "c.json", memory("Same words here, twice over.", type="reflection", response="x")), root)
    assert isinstance(a, Memory) and isinstance(b, Memory) and isinstance(c, Memory)
    assert len({a.key, b.key, c.key}) == 3


# --- iter_memory_files ----------------------------------------------------------------------


def test_iter_finds_every_layout_in_sorted_order_and_skips_hidden(root: Path) -> None:
    rels = [
        "2025/evt-202509040242073-old.json",
        "2026/03/01/evt-202603011200000-new.json",
        "reflections/2026/03/01/evt-202603011200001-r.json",
        "audio-dreams/2026/03/02/evt-202603021200000-a.json",
        "2026/03/01/evt-202603011200002-enc.json.enc",
    ]
    for rel in rels:
        write(root, rel, {})
    write(root, "2026/03/01/.evt-tmp.json", {})
    write(root, ".sync/evt-1.json", {})
    write(root, "2026/03/01/notes.txt", text="not a memory")

    found = [p.relative_to(root).as_posix() for p in iter_memory_files(root)]

    assert found == sorted(rels)
    assert found == [p.relative_to(root).as_posix() for p in iter_memory_files(root)]


def test_iter_survives_a_symlink_loop_and_a_missing_root(root: Path, tmp_path: Path) -> None:
    write(root, "2026/a.json", {})
    (root / "2026" / "loop").symlink_to(root)
    found = list(iter_memory_files(root))
    assert [p.name for p in found] == ["a.json"]
    assert list(iter_memory_files(tmp_path / "nope")) == []
    assert list(iter_memory_files(write(tmp_path, "file.json", {}))) == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root lists folders regardless of permissions")
def test_iter_skips_unreadable_folder(root: Path) -> None:
    write(root, "a/x.json", {})
    write(root, "b/y.json", {})
    (root / "a").chmod(0)
    try:
        assert [p.name for p in iter_memory_files(root)] == ["y.json"]
    finally:
        (root / "a").chmod(0o755)


# --- never raises -----------------------------------------------------------------------------

_settings = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@_settings
@given(data=st.binary(max_size=3000), recent=st.booleans())
def test_arbitrary_bytes_never_raise(root: Path, data: bytes, recent: bool) -> None:
    path = write(root, "f.json", text=data, mtime=None if recent else OLD)
    result = read(path, root)
    assert isinstance(result, Memory | Reject | NotReady)
    if isinstance(result, Reject):
        assert result.reason in REJECT_REASONS and result.reason != "internal", result


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=30),
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=10), kids, max_size=4),
    max_leaves=20,
)
_fields = st.fixed_dictionaries({}, optional={
    k: _json | st.text() for k in ("id", "timestamp", "content", "type", "response", "tags", "entities",
                                  "metadata")
})


@_settings
@given(obj=_fields | _json, surrogate=st.booleans())
def test_arbitrary_json_never_raises(root: Path, obj: object, surrogate: bool) -> None:
    text = json.dumps(obj)
    if surrogate and isinstance(obj, dict) and isinstance(obj.get("content"), str):
        text = text.replace('"content": "', '"content": "\\ud800', 1)  # a lone surrogate, valid JSON
    result = read(write(root, "f.json", text=text), root)
    assert isinstance(result, Memory | Reject)
    if isinstance(result, Reject):
        assert result.reason != "internal", result


# --- memory_key_at: the daemon's rescan path must agree with read_memory -------------------


def _key_of(result: Memory | Reject | NotReady) -> str | type[NotReady] | None:
    return result.key if isinstance(result, Memory) else NotReady if isinstance(result, NotReady) else None


def test_memory_key_at_agrees_with_read_memory_on_every_file_the_walk_finds(root: Path, tmp_path: Path) -> None:
    one_of_each_reject(root, tmp_path / "outside")
    write(root, "2026/03/02/ok.json", memory("A memory the rescan must count, like the builder."))
    write(root, "2026/03/02/conv.json", memory("User: hi\n\nAssistant: hello", type="conversation",
                                               response="hello"))
    (root / "linked").symlink_to(tmp_path / "outside")  # a folder leading outside
    write(root, "2026/03/02/recent.json", text='{"content": "half')  # NotReady: written just now

    seen = {}
    for path, _st, linked in iter_memory_stats(root):
        fast = memory_key_at(path, str(root), inside=not linked, max_bytes=MAX)
        seen[path] = linked
        expected = _key_of(read(Path(path), root))
        assert (NotReady if isinstance(fast, NotReady) else fast) == expected, path
    assert seen[str(root / "2026/03/01/link-out.json")] is True
    assert seen[str(root / "linked/elsewhere.json")] is True
    assert seen[str(root / "2026/03/02/ok.json")] is False
    assert sum(1 for p in seen if memory_key_at(p, str(root), inside=not seen[p], max_bytes=MAX)) == 2


def test_memory_key_at_resolves_a_file_swapped_for_a_symlink_after_the_walk(root: Path, tmp_path: Path) -> None:
    target = write(tmp_path / "outside", "secret.json", memory("Must never be counted from outside."))
    path = write(root, "2026/a.json", memory("An ordinary memory."))
    [(walked, _st, linked)] = list(iter_memory_stats(root))
    assert not linked
    path.unlink()
    path.symlink_to(target)  # the race: replaced between the walk and the read

    assert memory_key_at(walked, str(root), inside=True, max_bytes=MAX) is None
    r = read(path, root)
    assert isinstance(r, Reject) and r.reason == "symlink_outside"


def test_a_fifo_named_like_a_memory_is_rejected_without_blocking(root: Path) -> None:
    fifo = root / "2026" / "pipe.json"
    fifo.parent.mkdir(parents=True)
    os.mkfifo(fifo)  # nobody writes: a blocking open() would hang here forever

    r = read(fifo, root)
    assert isinstance(r, Reject) and r.reason == "not_file"
    assert memory_key_at(str(fifo), str(root), inside=True, max_bytes=MAX) is None

