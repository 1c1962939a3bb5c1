"""One streaming sha256 for every file mhd verifies (uploads, downloads, manifests, blobs)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import re
import sys
from pathlib import Path

CHUNK = 1 << 20
_HEX64 = re.compile(r"[0-9a-f]{64}")


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


_FOLLOWER = Path(__file__).with_name("_follow_sha256.py")


class FollowingSha256:
    """The sha256 of a file while it is being appended to, computed by a child process.

    ``advance(n)`` says the file's first ``n`` bytes are final; the child hashes them from the page
    cache while the writer goes on. ``digest(n)`` gives the hash of the first ``n`` bytes, or None
    when the child failed (killed, file truncated): the caller then hashes the file itself.

    Why a process and not a thread: a hashing thread needs the GIL around each update, and the
    event loop receiving the file holds it nearly all the time; the two then take turns instead
    of overlapping. With the hash in a child, a 1 GiB SFTP download on 2 cores that also run the
    server went from 0.93x to 0.95-1.10x scp (benchmarks/bench_transfer.py, medians of 5 or 8).
    """

    def __init__(self, proc: asyncio.subprocess.Process | None) -> None:
        self._proc = proc  # None: no process could be started; every digest is then None
        self.told = 0

    @classmethod
    async def start(cls, path: Path) -> FollowingSha256:
        """Start following ``path`` (which must exist)."""
        try:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-I", "-S", str(_FOLLOWER), str(path),
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )  # fmt: skip
        except OSError:  # no process to be had (EAGAIN, ENOMEM): the caller hashes the file itself
            return cls(None)
        return cls(proc)

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def advance(self, n: int) -> None:
        """The first ``n`` bytes of the file are written and will not change."""
        stdin = self._proc.stdin if self._proc else None
        if n > self.told and stdin is not None and not stdin.is_closing():
            stdin.write(b"%d\n" % n)
            self.told = n

    async def digest(self, n: int) -> str | None:
        """Hex sha256 of the first ``n`` bytes; None if the child could not give it."""
        if self._proc is None:
            return None
        try:
            self.advance(n)
            out, _ = await self._proc.communicate(b"done\n")
        except (OSError, ValueError):  # its stdin is gone: it died
            await self.close()
            return None
        digest = out.decode("ascii", "replace").strip()
        if self._proc.returncode != 0 or self.told != n or not _HEX64.fullmatch(digest):
            return None
        return digest

    async def close(self) -> None:
        """Stop the child if it still runs (after an error or a cancelled transfer)."""
        if self._proc is not None and self._proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self._proc.kill()
            await self._proc.wait()

    @property
    def returncode(self) -> int | None:
        return self._proc.returncode if self._proc else None
