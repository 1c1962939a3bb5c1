"""The committed demo memories follow MEMORY_FORMAT.md and match their generator."""

from __future__ import annotations

import json
import re
from pathlib import Path

from mhd.dataset.memories import Memory, read_memory
from mhd.devtools.examples import EXAMPLES, iter_example_files

REPO = Path(__file__).resolve().parents[2]
COMMITTED = REPO / "examples" / "memories"
NAME = re.compile(r"^(evt-\d{15})-([a-z0-9-]{1,50})\.json(\.enc)?$")
CATEGORIES = {"reflections", "dreams", "audio-dreams", "audio", "curated", "tool-invocations", "actions"}


def test_committed_files_match_the_generator() -> None:
    generated = {rel.as_posix(): text for rel, text in iter_example_files()}
    committed = {p.relative_to(COMMITTED).as_posix(): p.read_text(encoding="utf-8")
                 for p in COMMITTED.rglob("*") if p.is_file()}
    assert committed == generated, "regenerate: python -m mhd.devtools.examples examples/memories"


def test_names_layouts_and_fields_follow_the_format() -> None:
    assert len(EXAMPLES) >= 60
    for rel, text in iter_example_files():
        m = NAME.match(rel.name)
        assert m, rel
        folders = rel.parts[:-1]
        if folders[0] in CATEGORIES:
            folders = folders[1:]
        assert len(folders) in (1, 3) and all(f.isdigit() for f in folders), rel
        if rel.name.endswith(".enc"):
            assert set(json.loads(text)) == {"iv", "authTag", "ciphertext"}
            continue
        obj = json.loads(text)
        assert text.startswith('{\n  "id": ')  # 2-space pretty JSON, writer's key order
        assert obj["id"] == m.group(1)
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", obj["timestamp"])
        assert obj["id"][4:18] == re.sub(r"\D", "", obj["timestamp"])[:14]


def test_links_and_parents_point_at_the_right_memories() -> None:
    files = {rel.as_posix(): json.loads(text) for rel, text in iter_example_files() if rel.suffix == ".json"}
    ids = {o["id"]: o for o in files.values()}
    for obj in files.values():
        for link in obj.get("links", []):
            assert files[link["target"]]["type"] == "reflection"
        parent = obj.get("metadata", {}).get("parentEventId")
        if parent:
            assert ids[parent]["type"] == "conversation"
            assert ids[parent]["metadata"]["conversationId"] == obj["metadata"]["conversationId"]


def test_every_committed_example_parses() -> None:
    kinds = {type(read_memory(p, COMMITTED)).__name__ for p in COMMITTED.rglob("*.json")}
    assert kinds == {Memory.__name__, "Reject"}
