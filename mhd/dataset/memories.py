"""Read and validate MetaHuman OS episodic memory files (see MEMORY_FORMAT.md).

``read_memory`` turns one file into exactly one of three answers and never raises:

    Memory    a valid memory, with a content ``key`` that survives rewrites and renames
    Reject    unusable, with a short ``reason`` code and a ``detail`` naming the field
    NotReady  a parse failure on a file modified moments ago: the writer does not use
              temp+rename, so this may be a half-written file; ask again later

Reject reasons: ``bad_json``, ``not_object``, ``wrong_type``, ``empty_content``, ``too_large``,
``binary``, ``vanished``, ``not_file``, ``unreadable``, ``symlink_outside``, ``encrypted``,
``no_consent``, ``negative_feedback``, ``internal``.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import stat
import time
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

SUFFIX = ".json"
ENCRYPTED_SUFFIX = ".json.enc"
KNOWN_FIELDS = frozenset({"id", "timestamp", "type", "content", "response", "tags", "entities", "metadata"})
DEFAULT_TYPE = "observation"

REJECT_REASONS = (
    "bad_json", "not_object", "wrong_type", "empty_content", "too_large", "binary", "vanished",
    "not_file", "unreadable", "symlink_outside", "encrypted", "no_consent", "negative_feedback",
    "internal",
)


@dataclass(frozen=True)
class Memory:
    path: Path
    id: str | None
    timestamp: datetime | None
    type: str
    content: str
    response: str | None
    tags: tuple[str, ...]
    entities: tuple[str, ...]
    metadata: dict[str, Any]
    extra: dict[str, Any]  # fields this module does not interpret (importance, links, userId, …)
    key: str


@dataclass(frozen=True)
class Reject:
    path: Path
    reason: str
    detail: str


@dataclass(frozen=True)
class NotReady:
    path: Path
    detail: str


class _Invalid(Exception):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason, self.detail = reason, detail


# --- finding files ------------------------------------------------------------------------


def is_memory_name(name: str) -> bool:
    # Dotfiles are editors' and sync tools' temp files, never the writer's.
    return not name.startswith(".") and (name.endswith(SUFFIX) or name.endswith(ENCRYPTED_SUFFIX))


def iter_memory_files(root: Path) -> Iterator[Path]:
    """Every ``*.json`` / ``*.json.enc`` under ``root``, sorted, depth-first.

    Unreadable or vanishing folders are skipped, never raised. Symlinked folders are followed
    once (a loop is cut by remembering visited inodes); whether their files lie inside
    ``root`` is ``read_memory``'s question.
    """
    for path, _entry in _walk(os.fspath(root), set()):
        yield Path(path)


def iter_memory_stats(root: Path) -> Iterator[tuple[str, os.stat_result]]:
    """Like ``iter_memory_files`` but yields (path, stat) from the directory scan itself.

    The daemon's warm rescan of 100k files only needs this: plain strings and ``DirEntry.stat``
    instead of a Path and a second lookup per file.
    """
    for path, entry in _walk(os.fspath(root), set()):
        try:
            yield path, entry.stat()
        except OSError:
            continue


def _walk(folder: str, seen: set[tuple[int, int]]) -> Iterator[tuple[str, os.DirEntry[str]]]:
    try:
        st = os.stat(folder)
        ident = (st.st_dev, st.st_ino)
        if ident in seen:
            return
        seen.add(ident)
        with os.scandir(folder) as it:
            entries = sorted((e.name, e) for e in it)
    except (OSError, ValueError):
        return
    for name, entry in entries:
        try:
            is_dir = entry.is_dir()  # follows symlinks
        except OSError:
            continue
        if is_dir:
            if not name.startswith("."):
                yield from _walk(entry.path, seen)
        elif is_memory_name(name):
            yield entry.path, entry


# --- reading one file ---------------------------------------------------------------------


def read_memory(
    path: Path,
    root: Path,
    *,
    max_bytes: int = 1_000_000,
    not_ready_grace_s: float = 10.0,
    now: float | None = None,
) -> Memory | Reject | NotReady:
    """Parse and validate one memory file. Never raises."""
    path = Path(path)
    try:
        return _read(path, Path(root), max_bytes, not_ready_grace_s, time.time() if now is None else now)
    except _Invalid as exc:
        return Reject(path, exc.reason, exc.detail)
    except Exception as exc:  # the daemon must survive any file; say what happened instead
        return Reject(path, "internal", f"{type(exc).__name__}: {exc}"[:300])


def _read(path: Path, root: Path, max_bytes: int, grace_s: float, now: float) -> Memory | NotReady:
    real = _resolve_inside(path, root)
    if path.name.endswith(ENCRYPTED_SUFFIX):
        raise _Invalid("encrypted", "file: encrypted profile (.json.enc); cannot be read without the key")
    raw, mtime = _read_bytes(real, max_bytes)
    # Both directions: a small clock skew (network filesystems) must not turn a file being
    # written into a reject, and a far-future mtime must not make a broken file wait forever.
    recent = abs(now - mtime) < grace_s
    try:
        obj = _decode(raw)
    except _Invalid as exc:
        # A half-written file fails exactly like this; give the writer time to finish.
        if recent and exc.reason in ("bad_json", "binary"):
            return NotReady(path, exc.detail)
        raise
    return _to_memory(path, obj)


def _resolve_inside(path: Path, root: Path) -> Path:
    """The file's real path, after checking that it (and any linked folder) stays in ``root``."""
    try:
        path.lstat()
        real = os.path.realpath(path, strict=True)
    except FileNotFoundError:
        raise _Invalid("vanished", "file: disappeared (or is a dangling symlink)") from None
    except (OSError, RuntimeError) as exc:  # RuntimeError: a symlink loop
        raise _Invalid("unreadable", f"file: cannot resolve ({exc})") from None
    real_root = _real_root(os.fspath(root))
    if real != real_root and not real.startswith(real_root.rstrip(os.sep) + os.sep):
        raise _Invalid("symlink_outside", f"file: resolves outside memory_dir, to {real}")
    return Path(real)


@functools.lru_cache(maxsize=16)
def _real_root(root: str) -> str:
    # Cached: resolving the root for each of 100k files doubles the cost of a scan. Re-pointing
    # memory_dir's own symlink while the daemon runs needs a restart to be seen.
    try:
        return os.path.realpath(root, strict=True)
    except (OSError, RuntimeError):
        return os.path.abspath(root)


def _read_bytes(path: Path, max_bytes: int) -> tuple[bytes, float]:
    try:
        with path.open("rb") as fh:
            st = os.fstat(fh.fileno())
            if not stat.S_ISREG(st.st_mode):
                raise _Invalid("not_file", "file: not a regular file")
            if st.st_size > max_bytes:
                raise _Invalid("too_large", f"file: {st.st_size} bytes, over max_file_bytes={max_bytes}")
            raw = fh.read(max_bytes + 1)
    except FileNotFoundError:
        raise _Invalid("vanished", "file: disappeared while being read") from None
    except IsADirectoryError:
        raise _Invalid("not_file", "file: is a directory") from None
    except OSError as exc:
        raise _Invalid("unreadable", f"file: {exc.strerror or exc}") from None
    if len(raw) > max_bytes:  # grew after the size check
        raise _Invalid("too_large", f"file: over max_file_bytes={max_bytes}")
    return raw, st.st_mtime


def _decode(raw: bytes) -> Any:
    if b"\x00" in raw:
        raise _Invalid("binary", "file: contains NUL bytes")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise _Invalid("binary", f"file: not UTF-8 (byte {exc.start})") from None
    if not text.strip():
        raise _Invalid("bad_json", "file: empty")
    try:
        return json.loads(text)
    except RecursionError:
        raise _Invalid("bad_json", "file: JSON nested too deeply") from None
    except ValueError as exc:  # JSONDecodeError, and int-conversion limits
        raise _Invalid("bad_json", f"file: {str(exc)[:200]}") from None


# --- validating fields --------------------------------------------------------------------


def _to_memory(path: Path, obj: Any) -> Memory:
    if not isinstance(obj, dict):
        raise _Invalid("not_object", f"file: top-level JSON is {_kind(obj)}, expected an object")
    mtype = _opt_str(obj, "type") or DEFAULT_TYPE
    content = obj.get("content")
    if content is None:
        raise _Invalid("empty_content", "content: missing")
    if not isinstance(content, str):
        raise _Invalid("wrong_type", f"content: expected string, got {_kind(content)}")
    if not content.strip():
        raise _Invalid("empty_content", "content: empty")
    response = _opt_str(obj, "response")
    metadata = obj.get("metadata")
    if metadata is None:
        metadata = {}
    elif not isinstance(metadata, dict):
        raise _Invalid("wrong_type", f"metadata: expected object, got {_kind(metadata)}")
    _check_consent(metadata)
    return Memory(
        path=path,
        id=_opt_str(obj, "id"),
        timestamp=_timestamp(obj.get("timestamp")),
        type=mtype,
        content=content,
        response=response,
        tags=_str_list(obj, "tags"),
        entities=_str_list(obj, "entities"),
        metadata=metadata,
        extra={k: v for k, v in obj.items() if k not in KNOWN_FIELDS},
        key=memory_key(mtype, content, response),
    )


def _check_consent(metadata: dict[str, Any]) -> None:
    if metadata.get("trainingConsent") is False:
        raise _Invalid("no_consent", "metadata.trainingConsent: false (the owner excluded it from training)")
    signal = metadata.get("reinforcementSignal")
    if isinstance(signal, int | float) and not isinstance(signal, bool) and signal < 0:
        raise _Invalid("negative_feedback", f"metadata.reinforcementSignal: {signal}")


def _opt_str(obj: dict[str, Any], name: str) -> str | None:
    value = obj.get(name)
    if value is None or isinstance(value, str):
        return value
    raise _Invalid("wrong_type", f"{name}: expected string, got {_kind(value)}")


def _str_list(obj: dict[str, Any], name: str) -> tuple[str, ...]:
    value = obj.get(name)
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise _Invalid("wrong_type", f"{name}: expected a list of strings, got {_kind(value)}")
    return tuple(value)


def _timestamp(value: Any) -> datetime | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise _Invalid("wrong_type", f"timestamp: expected ISO 8601 string, got {_kind(value)}")
    try:
        ts = datetime.fromisoformat(value.strip())
    except ValueError:
        raise _Invalid("wrong_type", f"timestamp: not ISO 8601: {value[:40]!r}") from None
    # The writer emits UTC with a Z; a naive stamp is taken as UTC too, so all compare.
    return ts.replace(tzinfo=UTC) if ts.tzinfo is None else ts.astimezone(UTC)


def _kind(value: Any) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null",
            int: "number", float: "number"}.get(type(value), type(value).__name__)


# --- identity -----------------------------------------------------------------------------


def normalize_space(text: str) -> str:
    return " ".join(unicodedata.normalize("NFC", text).split())


def memory_key(mtype: str, content: str, response: str | None) -> str:
    """sha256 of what makes a memory *this* memory: type, content, response.

    Ids, timestamps, tags and metadata are left out on purpose: the writer rewrites files to
    flip ``metadata.processed`` and may rename them, and neither makes a new memory.
    """
    ident = json.dumps([mtype, normalize_space(content), normalize_space(response or "")], ensure_ascii=False)
    # surrogatepass: JSON may carry lone surrogates ("\ud800"), which strict UTF-8 refuses.
    return hashlib.sha256(ident.encode("utf-8", "surrogatepass")).hexdigest()
