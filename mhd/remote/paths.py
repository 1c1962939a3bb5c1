"""Manifest file names from the pod, checked before anything is fetched (any Session).

Kept apart from ``ssh.py`` so that the daemon's Fetching state can use them without importing
asyncssh (tens of MiB of an idle daemon's memory).
"""

from __future__ import annotations

import posixpath

from mhd.errors import IntegrityError
from mhd.remote.session import Session


def validate_manifest_path(rel: str) -> str:
    """A manifest's file name, checked and normalised (``"./a//b"`` → ``"a/b"``).

    Rejected with IntegrityError: empty, absolute, any ``..`` component, backslashes, NUL or other
    control characters. What is returned can be joined under a run dir on either side safely
    (symlinks on the remote aside: see :func:`resolve_manifest_path`).
    """
    if not isinstance(rel, str) or not rel:
        raise IntegrityError("manifest lists an empty file name; the manifest is corrupt")
    shown = repr(rel)[:120]
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in rel):
        raise IntegrityError(f"manifest file name {shown} contains control characters (NUL, newline, …)")
    if "\\" in rel:
        raise IntegrityError(f"manifest file name {shown} contains a backslash; only POSIX relative paths are allowed")
    if rel.startswith(("/", "~")):
        raise IntegrityError(f"manifest file name {shown} is absolute; only paths inside the run dir are allowed")
    parts = [p for p in rel.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise IntegrityError(f"manifest file name {shown} climbs out with '..'")
    if not parts:
        raise IntegrityError(f"manifest file name {shown} names the run dir itself, not a file")
    return "/".join(parts)


async def remote_realpath_inside(session: Session, root: str, rel: str) -> bool:
    """Whether ``root/rel`` on the host, symlinks resolved, stays inside ``root``."""
    rel = validate_manifest_path(rel)
    root_real = await session.realpath(root)
    target = await session.realpath(posixpath.join(root, rel))
    return target == root_real or target.startswith(root_real.rstrip("/") + "/")


async def resolve_manifest_path(session: Session, root: str, rel: str) -> str:
    """``root/rel`` after :func:`validate_manifest_path` and the symlink check, else IntegrityError."""
    clean = validate_manifest_path(rel)
    if not await remote_realpath_inside(session, root, clean):
        raise IntegrityError(f"manifest file {clean!r} resolves outside the run dir {root} (symlink); refusing it")
    return posixpath.join(root, clean)
