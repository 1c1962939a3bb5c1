"""Big incompressible test files, written and hashed piecewise (never whole in memory)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

PIECE = 4 << 20


def random_file(path: Path, size: int) -> str:
    """Write ``size`` random bytes to ``path``; returns their sha256."""
    h = hashlib.sha256()
    with path.open("wb") as f:
        left = size
        while left:
            block = os.urandom(min(PIECE, left))
            f.write(block)
            h.update(block)
            left -= len(block)
    return h.hexdigest()
