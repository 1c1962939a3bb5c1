"""One streaming sha256 for every file mhd verifies (uploads, downloads, manifests, blobs)."""

from __future__ import annotations

import hashlib
from pathlib import Path

CHUNK = 1 << 20


def sha256_file(path: Path, *, limit: int | None = None) -> str:
    """Hex sha256 of ``path`` (of its first ``limit`` bytes if given), in bounded memory."""
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        remaining = limit
        while remaining is None or remaining > 0:
            block = f.read(CHUNK if remaining is None else min(CHUNK, remaining))
            if not block:
                break
            h.update(block)
            if remaining is not None:
                remaining -= len(block)
    return h.hexdigest()
