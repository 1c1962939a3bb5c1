"""The session seam: how the daemon talks to the machine a run trains on.

Two implementations share this contract: ``ssh.SshSession`` (asyncssh + SFTP, for pods and
bring-your-own hosts) and ``local.LocalSession`` (this machine, for the demo and core tests). The
detached-job logic in ``job.py`` is written once against it.

Paths are remote absolute paths (POSIX). Every method raises ``ConnectionLost`` when the link is
gone, so the state machine can go back through Connecting.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable


@dataclass(frozen=True)
class CommandResult:
    exit_status: int
    stdout: str
    stderr: str


@runtime_checkable
class Session(Protocol):
    async def run(self, command: str, *, input: str | None = None, timeout: float = 120.0) -> CommandResult:
        """Run a POSIX shell command; the real exit status, never a parsed guess."""
        ...

    async def upload(self, local: Path, remote: str, sha256: str) -> bool:
        """Put ``local`` at ``remote`` via a temp name, verify sha256 remotely, rename.

        Returns False when the remote file already had this sha256 (nothing sent).
        """
        ...

    async def download(self, remote: str, local: Path, sha256: str, size: int | None = None) -> int:
        """Stream ``remote`` into ``local``.part, resuming from its size, verify, move into place.

        Returns the number of bytes transferred this call (0 if ``local`` was already verified).
        """
        ...

    async def read_from(self, remote: str, offset: int, limit: int = 1 << 20) -> bytes:
        """Bytes of ``remote`` from ``offset`` (b"" if the file does not exist yet)."""
        ...

    async def write_file(self, remote: str, data: bytes, mode: int = 0o644) -> None:
        """Write a small file atomically (temp + rename) with ``mode``."""
        ...

    async def realpath(self, path: str) -> str:
        """The host's canonical path for ``path``, symlinks resolved; missing tails kept as is."""
        ...

    async def close(self) -> None: ...
