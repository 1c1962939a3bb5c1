"""Memory files for tests, written the way the MetaHuman writer writes them (2-space JSON)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from mhd.devtools.examples import event_id, slug, write_examples

OLD = 1_600_000_000.0  # an mtime far in the past: never "recently written"


def memory(content: str, type: str = "observation", timestamp: str = "2026-03-01T12:00:00.000Z",
           **fields: Any) -> dict[str, Any]:
    obj: dict[str, Any] = {"id": "evt-202603011200000", "timestamp": timestamp, "content": content, "type": type,
                           "entities": [], "tags": []}
    obj.update(fields)
    return obj


def write(root: Path, rel: str, obj: Any = None, *, text: str | bytes | None = None,
          mtime: float | None = OLD) -> Path:
    """Write ``obj`` as pretty JSON (or raw ``text``) at ``root/rel``; back-date it by default."""
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    if text is None:
        text = json.dumps(obj, indent=2, ensure_ascii=False) + "\n"
    path.write_bytes(text.encode("utf-8") if isinstance(text, str) else text)
    if mtime is not None:
        os.utime(path, (mtime, mtime))
    return path


def file_name(content: str, ts_compact: str = "202603011200000") -> str:
    """``evt-<15 digits>-<slug>.json`` as MEMORY_FORMAT.md names files."""
    return f"evt-{ts_compact}-{slug(content)}.json"


def write_examples_to(root: Path, mtime: float | None = OLD) -> Path:
    """The committed demo memories (mhd.devtools.examples), written fresh under ``root``."""
    for path in write_examples(root):
        if mtime is not None:
            os.utime(path, (mtime, mtime))
    return root


def one_of_each_reject(root: Path, outside: Path) -> dict[str, Path]:
    """One file per reject reason that a file alone can cause; ``outside`` is a folder beyond root."""
    good = memory("A perfectly ordinary memory about the river trail.")
    files = {
        "bad_json": write(root, "2026/03/01/bad.json", text='{"content": "unterminated'),
        "not_object": write(root, "2026/03/01/list.json", ["a", "list"]),
        "wrong_type": write(root, "2026/03/01/wrong.json", {**good, "tags": "garden"}),
        "empty_content": write(root, "2026/03/01/empty.json", {**good, "content": "   \n"}),
        "too_large": write(root, "2026/03/01/huge.json", {**good, "content": "x" * 5000}),
        "binary": write(root, "2026/03/01/junk.json", text=b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR"),
        "encrypted": write(root, "2026/03/01/secret.json.enc", {"iv": "AA==", "authTag": "AA==",
                                                                 "ciphertext": "AA=="}),
        "no_consent": write(root, "2026/03/01/private.json",
                            {**good, "content": "A private note.", "metadata": {"trainingConsent": False}}),
        "negative_feedback": write(root, "2026/03/01/bad-reply.json",
                                   {**good, "content": "User: hi\n\nAssistant: go away",
                                    "type": "conversation", "metadata": {"reinforcementSignal": -1}}),
    }
    target = write(outside, "elsewhere.json", good)
    link = root / "2026/03/01/link-out.json"
    link.symlink_to(target)
    files["symlink_outside"] = link
    dangling = root / "2026/03/01/gone.json"
    dangling.symlink_to(root / "2026/03/01/never-existed.json")
    files["vanished"] = dangling
    folder = root / "2026/03/01/folder.json"
    folder.mkdir()
    files["not_file"] = folder
    return files


__all__ = ["OLD", "event_id", "file_name", "memory", "one_of_each_reject", "write", "write_examples_to"]
