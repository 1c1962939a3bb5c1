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

import errno
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
    for path, _entry, _linked in _walk(os.fspath(root), set(), False):
        yield Path(path)


def iter_memory_stats(root: Path) -> Iterator[tuple[str, os.stat_result, bool]]:
    """Like ``iter_memory_files`` but yields (path, stat, linked) from the directory scan itself.

    The daemon's rescan of 100k files needs only this: plain strings and ``DirEntry.stat``
    instead of a Path and a second lookup per file. ``linked`` is False when neither the file
    nor any folder between it and ``root`` is a symlink, so that it cannot lie outside ``root``
    (``memory_key_at`` then skips resolving it).
    """
    for path, entry, linked in _walk(os.fspath(root), set(), False):
        try:
            yield path, entry.stat(), linked
        except OSError:
            continue


def _walk(folder: str, seen: set[tuple[int, int]], linked: bool) -> Iterator[tuple[str, os.DirEntry[str], bool]]:
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
            # From the directory entry's type: no system call.
            is_link = linked or entry.is_symlink()
        except OSError:
            continue
        if is_dir:
            if not name.startswith("."):
                yield from _walk(entry.path, seen, is_link)
        elif is_memory_name(name):
            yield entry.path, entry, is_link


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
        obj = _load(os.fspath(path), os.fspath(root), max_bytes, not_ready_grace_s, now, inside=False)
        if isinstance(obj, _Pending):
            return NotReady(path, obj.detail)
        return Memory(path=path, **_fields(obj))
    except _Invalid as exc:
        return Reject(path, exc.reason, exc.detail)
    except Exception as exc:  # the daemon must survive any file; say what happened instead
        return Reject(path, "internal", f"{type(exc).__name__}: {exc}"[:300])


def memory_key_at(
    path: str,
    root: str,
    *,
    inside: bool = False,
    max_bytes: int = 1_000_000,
    not_ready_grace_s: float = 10.0,
) -> str | NotReady | None:
    """Just the content key of ``read_memory(path, root)``: None for a Reject. Never raises.

    The daemon's rescan calls this for every file, so it avoids what ``read_memory`` spends on
    pathlib and on building the Memory. ``inside=True`` (from ``iter_memory_stats``: no symlink
    on the way from ``root``) skips resolving the path; the file is then opened with
    O_NOFOLLOW, so one swapped for a symlink since the walk is resolved and checked after all.
    """
    try:
        obj = _load(path, root, max_bytes, not_ready_grace_s, None, inside=inside)
        if isinstance(obj, _Pending):
            return NotReady(Path(path), obj.detail)
        return str(_fields(obj)["key"])
    except Exception:  # _Invalid, or anything a hostile file provokes: not a usable memory
        return None


@dataclass(frozen=True)
class _Pending:
    detail: str


def _load(path: str, root: str, max_bytes: int, grace_s: float, now: float | None, *, inside: bool) -> Any:
    """The file's decoded JSON, or ``_Pending`` if it may still be being written."""
    if path.endswith(ENCRYPTED_SUFFIX):
        _resolve_inside(path, root)  # a vanished or escaping file says so first
        raise _Invalid("encrypted", "file: encrypted profile (.json.enc); cannot be read without the key")
    got = _read_bytes(path, max_bytes, nofollow=True) if inside else None
    if got is None:  # not known to be inside, or it became a symlink since the walk
        got = _read_bytes(_resolve_inside(path, root), max_bytes, nofollow=False)
        assert got is not None
    raw, mtime = got
    # Both directions: a small clock skew (network filesystems) must not turn a file being
    # written into a reject, and a far-future mtime must not make a broken file wait forever.
    recent = abs((time.time() if now is None else now) - mtime) < grace_s
    try:
        return _decode(raw)
    except _Invalid as exc:
        # A half-written file fails exactly like this; give the writer time to finish.
        if recent and exc.reason in ("bad_json", "binary"):
            return _Pending(exc.detail)
        raise


def _resolve_inside(path: str, root: str) -> str:
    """The file's real path, after checking that it (and any linked folder) stays in ``root``."""
    try:
        os.lstat(path)
        real = os.path.realpath(path, strict=True)
    except FileNotFoundError:
        raise _Invalid("vanished", "file: disappeared (or is a dangling symlink)") from None
    except (OSError, RuntimeError) as exc:  # RuntimeError: a symlink loop
        raise _Invalid("unreadable", f"file: cannot resolve ({exc})") from None
    real_root = _real_root(root)
    if real != real_root and not real.startswith(real_root.rstrip(os.sep) + os.sep):
        raise _Invalid("symlink_outside", f"file: resolves outside memory_dir, to {real}")
    return real


@functools.lru_cache(maxsize=16)
def _real_root(root: str) -> str:
    # Cached: resolving the root for each of 100k files doubles the cost of a scan. Re-pointing
    # memory_dir's own symlink while the daemon runs needs a restart to be seen.
    try:
        return os.path.realpath(root, strict=True)
    except (OSError, RuntimeError):
        return os.path.abspath(root)


# O_NONBLOCK: a FIFO named like a memory must not hang the daemon in open(); regular files
# ignore it.
_OPEN_FLAGS = os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK


def _read_bytes(path: str, max_bytes: int, *, nofollow: bool) -> tuple[bytes, float] | None:
    """(bytes, mtime); None only with ``nofollow`` when ``path`` is a symlink."""
    try:
        fd = os.open(path, _OPEN_FLAGS | (os.O_NOFOLLOW if nofollow else 0))
    except FileNotFoundError:
        raise _Invalid("vanished", "file: disappeared while being read") from None
    except OSError as exc:
        if nofollow and exc.errno == errno.ELOOP:
            return None
        raise _Invalid("unreadable", f"file: {exc.strerror or exc}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            kind = "is a directory" if stat.S_ISDIR(st.st_mode) else "not a regular file"
            raise _Invalid("not_file", f"file: {kind}")
        if st.st_size > max_bytes:
            raise _Invalid("too_large", f"file: {st.st_size} bytes, over max_file_bytes={max_bytes}")
        # Ask for one byte past the size seen: a single read() at EOF, and growth is noticed.
        chunks = []
        total = 0
        want = st.st_size + 1
        while total <= max_bytes:
            chunk = os.read(fd, min(want, max_bytes + 1 - total))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
            want = 1 << 16
    except OSError as exc:
        raise _Invalid("unreadable", f"file: {exc.strerror or exc}") from None
    finally:
        os.close(fd)
    if total > max_bytes:  # grew after the size check
        raise _Invalid("too_large", f"file: over max_file_bytes={max_bytes}")
    return (chunks[0] if len(chunks) == 1 else b"".join(chunks)), st.st_mtime


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


def _fields(obj: Any) -> dict[str, Any]:
    """Memory's fields but its path, from a decoded file; raises _Invalid."""
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
    return dict(
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


def content_key_of(path: Path, max_bytes: int = 1_000_000) -> str | None:
    """The key of the memory in this file whatever its consent or filters say (`mhd memory`,
    `mhd forget`: a memory excluded today may be inside a model made before). None if unreadable."""
    try:
        with open(path, "rb") as fh:
            obj = _decode(fh.read(max_bytes + 1)[:max_bytes])
        if not isinstance(obj, dict) or not isinstance(obj.get("content"), str) or not obj["content"].strip():
            return None
        return memory_key(_opt_str(obj, "type") or DEFAULT_TYPE, obj["content"], _opt_str(obj, "response"))
    except Exception:  # any file: the caller says it cannot tell
        return None
