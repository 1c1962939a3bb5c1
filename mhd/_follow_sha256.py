"""Child process of ``mhd.hashing.FollowingSha256``: the sha256 of a file another process appends to.

Usage: ``python -I -S _follow_sha256.py FILE``. Standard library only (it imports nothing of mhd
and starts in ~15 ms).

stdin, one line each:
  ``N``     the first N bytes of FILE are final; hash up to there (N never decreases)
  ``done``  print the hex sha256 of the first N bytes (the last N given), exit 0
EOF before ``done`` (the parent went away) exits 1 without output. A FILE shorter than an N it
was told exits 3 with the reason on stderr.
"""

from __future__ import annotations

import hashlib
import mmap
import os
import sys

# Bytes mapped at a time. MAP_POPULATE maps a window's pages in one call; 4 KiB page faults one by
# one cost as much as a copy (measured: 1 GiB, 0.25 CPU-s more).
WINDOW = 64 << 20
_POPULATE = getattr(mmap, "MAP_POPULATE", 0)


class ShortFile(Exception):
    pass


def _hash_mapped(h: hashlib._Hash, fd: int, pos: int, end: int) -> None:
    at = pos - pos % mmap.ALLOCATIONGRANULARITY
    with (
        mmap.mmap(fd, end - at, flags=mmap.MAP_SHARED | _POPULATE, prot=mmap.PROT_READ, offset=at) as m,
        memoryview(m) as view,
    ):
        h.update(view[pos - at :])


def _hash_read(h: hashlib._Hash, fd: int, pos: int, end: int, buf: memoryview) -> None:
    while pos < end:
        n = os.preadv(fd, [buf[: min(len(buf), end - pos)]], pos)
        if n <= 0:
            raise ShortFile(f"ends at byte {pos}")
        h.update(buf[:n])
        pos += n


def follow(path: str, lines: object) -> str | None:
    h = hashlib.sha256()
    fd = os.open(path, os.O_RDONLY)
    buf: memoryview | None = None
    pos = 0
    try:
        for line in lines:  # type: ignore[attr-defined]
            word = line.strip()
            if word == b"done":
                return h.hexdigest()
            end = int(word)
            size = os.fstat(fd).st_size
            if end > size:  # mapping past the end would SIGBUS: say why instead
                raise ShortFile(f"has {size} bytes, {end} were promised")
            while pos < end:
                stop = min(end, pos + WINDOW)
                try:
                    _hash_mapped(h, fd, pos, stop)
                except (OSError, ValueError):  # a filesystem without mmap: read it
                    buf = buf or memoryview(bytearray(1 << 20))
                    _hash_read(h, fd, pos, stop, buf)
                pos = stop
        return None
    finally:
        os.close(fd)


def main(argv: list[str]) -> int:
    try:
        digest = follow(argv[1], iter(sys.stdin.buffer.readline, b""))
    except ShortFile as exc:
        print(f"{argv[1]} {exc}", file=sys.stderr)
        return 3
    if digest is None:
        return 1
    print(digest, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
