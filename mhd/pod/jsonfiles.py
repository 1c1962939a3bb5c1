"""JSON files the pod's jobs write: atomic documents and append-only JSON lines.

Shared by the trainer's modules and evaluate.py (uploaded beside them); standard library only.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w") as fh:
        json.dump(data, fh, indent=2)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def append_line(path: Path, line: dict[str, Any]) -> None:
    """One JSON line at the end of ``path`` (progress.jsonl: the daemon tails it)."""
    with path.open("a") as fh:
        fh.write(json.dumps(line) + "\n")


def seal_progress(path: Path) -> None:
    """A kill can leave a torn last line; end it so the next line starts clean."""
    try:
        with path.open("rb+") as fh:
            fh.seek(0, os.SEEK_END)
            if fh.tell() == 0:
                return
            fh.seek(-1, os.SEEK_END)
            if fh.read(1) != b"\n":
                fh.write(b"\n")
    except FileNotFoundError:
        pass
