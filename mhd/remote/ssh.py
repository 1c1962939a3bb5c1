"""asyncssh transport: connect under a deadline, pin host keys, move files with SFTP and sha256.

One :func:`connect` call gives an :class:`SshSession` (the ``Session`` protocol of
``session.py``) plus the host key it saw, which the caller stores with the run and passes back as
``pinned_host_key`` next time.

Error boundary (every public coroutine here):

    connect()   refused / reset / timeout / sshd not up yet  → retried with backoff + full jitter;
                                                               deadline passed → ConnectionLost
                authentication refused, unusable key_file    → RemoteError (permanent)
                host key differs from the pin                → HostKeyMismatch (never retried)
    session     link dropped (any asyncssh / socket error)   → ConnectionLost (from the original)
                remote file-system refusal (SFTP status)     → RemoteError
                sha256 mismatch, unsafe manifest path        → IntegrityError
                non-zero exit of a command                   → CommandResult.exit_status, no raise

Local file-system errors (disk full, permissions on this machine) are not link problems and pass
through unchanged as ``OSError``: retrying the connection would not fix them.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import posixpath
import random
import re
import secrets
import shlex
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import TracebackType
from typing import Any

import asyncssh
from asyncssh.encryption import get_default_encryption_algs
from asyncssh.public_key import get_default_public_key_algs

from mhd.errors import ConnectionLost, HostKeyMismatch, IntegrityError, MhdError, RemoteError
from mhd.hashing import FollowingSha256, sha256_file
from mhd.remote.provider import Endpoint
from mhd.remote.session import CommandResult

# OpenSSH's sftp-server drops the connection for requests above 255 KiB (measured, issue 3).
SFTP_BLOCK = 255 * 1024
# Outstanding SFTP writes during upload: 32 blocks of 255 KiB (8 MiB), which keeps loopback
# faster than scp and a 50 ms link at 160 MiB/s. Memory: those and asyncssh's packet copies of
# them; a 1 GiB upload raised RSS by 26 MiB (128 in flight: ~100 MiB, and no faster here).
UPLOAD_MAX_REQUESTS = 32
# Outstanding SFTP reads during download. This window bounds the memory a download uses
# (≈ 8 MiB of blocks in flight) whatever the file size, and still keeps a WAN link busy.
DOWNLOAD_WINDOW = 32
# Received bytes handed to the writer thread at a time (one batch queued, one being written).
SINK_BATCH = 4 << 20
# Receive window of our SSH channels. OpenSSH's (and asyncssh's) 2 MiB caps a download at
# 2 MiB per round trip (20 MiB/s at 100 ms to a far-away pod); 8 MiB matches what the SFTP
# read window above keeps in flight. Memory is still bounded by the reads we ask for.
CHANNEL_WINDOW = 8 << 20
# AES-GCM first: with AES-NI (every GPU server) it moved 40-50% more SFTP MiB/s than asyncssh's
# default chacha20-poly1305 on loopback, on both the client and sshd side. The rest follow as is.
_FAST_CIPHERS = ["aes256-gcm@openssh.com", "aes128-gcm@openssh.com"]
ENCRYPTION_ALGS = _FAST_CIPHERS + [a.decode() for a in get_default_encryption_algs() if a.decode() not in _FAST_CIPHERS]
# Longest single connection attempt (TCP + handshake + auth); a pod's sshd under load is slow.
ATTEMPT_TIMEOUT_S = 30.0
# How long a liveness probe may take after a command timed out, before we call the link dead.
PROBE_TIMEOUT_S = 10.0
_SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")

# Remote helper scripts (run through `sh -c`, arguments positional, so no path needs quoting).
# They hash with python's hashlib or else sha256sum, and signal by exit status:
_SHA_MISSING = 3  # the file does not exist
_SHA_NO_TOOL = 4  # neither sha256sum nor python on the host
_SHA_DIFFERS = 7  # upload commit: the temp file's hash is not the expected one
_PY_SHA256 = (
    "import hashlib,sys\n"
    "h=hashlib.sha256()\n"
    "with open(sys.argv[1],'rb') as f:\n"
    "    for b in iter(lambda: f.read(1<<20), b''): h.update(b)\n"
    "print(h.hexdigest())\n"
)
# Python first: its hashlib (OpenSSL) uses the CPU's SHA extensions, Debian's sha256sum does not
# (1 GiB: 0.65 s vs 2.2 s measured), and the trainer's host has python anyway. sha256sum reads
# stdin so that it cannot escape odd file names in its output.
_HASH_FN = (
    "hash_file() { "
    # A python that fails (a pyenv shim with no version behind it) falls through to sha256sum.
    'for py in python3 python; do command -v $py >/dev/null 2>&1 && $py -c "$PY" "$1" 2>/dev/null && return; done; '
    "if command -v sha256sum >/dev/null 2>&1; then "
    'sha256sum -b < "$1" | { read -r s _; [ -n "$s" ] && echo "$s"; }; return; fi; '
    f"return {_SHA_NO_TOOL}; }}; "
)
# $1 file, $2 python hasher → its sha256.
_SHA256_SH = f'PY=$2; {_HASH_FN}[ -f "$1" ] || exit {_SHA_MISSING}; hash_file "$1"'
# $1 target, $2 python hasher → drop stale temp files, target's sha256. For the skip-if-present
# check, run only when the target has the local file's size. (Temp files of uploads a drop
# interrupted would otherwise pile up on the pod's disk.)
_UPLOAD_PREP_SH = f'PY=$2; {_HASH_FN}rm -f -- "$1".tmp-*; [ -f "$1" ] || exit {_SHA_MISSING}; hash_file "$1"'
# $1 temp, $2 target, $3 expected sha256, $4 python hasher → rename if the hash matches (mv within
# one directory is rename(2): atomic), else delete the temp file and print the hash seen. Only for
# hosts where the overlapped hasher below cannot run (no python): it reads the whole file again.
_UPLOAD_COMMIT_SH = (
    f'PY=$4; {_HASH_FN}got=$(hash_file "$1") || exit $?; '
    'if [ "$got" = "$3" ]; then exec mv -f -- "$1" "$2"; fi; '
    f'rm -f -- "$1"; echo "$got"; exit {_SHA_DIFFERS}'
)

# The overlapped upload hash. While the client writes the temp file, this process hashes it
# sequentially, never past what the client says is complete: each stdin line is a byte count N
# ("the first N bytes are written", i.e. acknowledged by the SFTP server) or "end" (the client is
# done: hash to the end of the file, print the sha256). EOF without "end" means the client went
# away: exit without hashing the rest. The file is opened at the first line (it exists by then).
# It reads through mmap: a read() copy of pages the SFTP server has just written cost 3x the
# kernel time and slowed the transfer beside it (1 GiB on 2 cores: 2.0 s vs 2.2 s); pread where a
# file system cannot map. Python 3 only: a python 2 fails, and upload() falls back.
_PY_HASHER = (
    "import hashlib,mmap,os,sys\n"
    "h=hashlib.sha256();fd=None;pos=0;fast=True\n"
    "def upto(end):\n"
    "    global pos,fast\n"
    "    if fast and end>pos:\n"
    "        at=pos-pos%mmap.ALLOCATIONGRANULARITY\n"
    "        try: m=mmap.mmap(fd,end-at,access=mmap.ACCESS_READ,offset=at)\n"
    "        except (OSError,ValueError): fast=False\n"
    "        else:\n"
    "            v=memoryview(m)\n"
    "            for i in range(pos-at,end-at,1<<20): h.update(v[i:min(i+(1<<20),end-at)])\n"
    "            v.release();m.close();pos=end\n"
    "    while pos<end:\n"
    "        b=os.pread(fd,min(1<<20,end-pos),pos)\n"
    "        if not b: sys.exit(8)\n"
    "        h.update(b);pos+=len(b)\n"
    "for line in iter(sys.stdin.buffer.readline,b''):\n"
    "    if fd is None: fd=os.open(sys.argv[1],os.O_RDONLY)\n"
    "    size=os.fstat(fd).st_size\n"
    "    if line.strip()==b'end': upto(size);print(h.hexdigest());sys.exit(0)\n"
    "    if int(line)>size: sys.exit(8)\n"
    "    upto(int(line))\n"
    "sys.exit(9)\n"
)
_NO_PYTHON = 5  # the hasher script found no working python
# $1 target, $2 temp, $3 _PY_HASHER, $4… python commands to try → drop the target's stale temp
# files (not ours: the client creates it meanwhile), then exec the first python found on the temp
# file, else exit _NO_PYTHON. A python that fails (a pyenv shim with no version behind it) exits
# non-zero too: either way upload() falls back to _UPLOAD_COMMIT_SH, which also tries sha256sum.
_UPLOAD_HASHER_SH = (
    'tgt=$1 tmp=$2 PY=$3; shift 3; for f in "$tgt".tmp-*; do [ "$f" = "$tmp" ] || rm -f -- "$f"; done; '
    'for py in "$@"; do command -v "$py" >/dev/null 2>&1 && exec "$py" -c "$PY" "$tmp"; done; '
    f"exit {_NO_PYTHON}"
)
# How often (in bytes of acknowledged prefix) the client tells the hasher how far it may read. Fewer,
# larger bites disturb the transfer less where the host's CPUs are busy with it (1 GiB on 2 cores,
# both ends: 2.2 s with 8 MiB, 2.1 s with 32, 2.0 s with 64); the last bite is hashed after the
# transfer, ~35 ms for 64 MiB.
HASH_FEED_STEP = 64 << 20
# Remote hashing may take this long per byte on top of a command's timeout (a slow pod disk).
_HASH_S_PER_BYTE = 1 / (20 << 20)


def _hash_timeout(size: int) -> float:
    """How long a command that hashes ``size`` bytes on the host may take."""
    return 120.0 + size * _HASH_S_PER_BYTE


# ---- host keys ----------------------------------------------------------------------------------


def openssh_public_key(key: asyncssh.SSHKey) -> str:
    """``"ssh-ed25519 AAAA…"``: the form stored with a run (no comment, no newline)."""
    return " ".join(key.export_public_key("openssh").decode("ascii").split()[:2])


def host_key_fingerprint(key_text: str) -> str:
    """``SHA256:…`` of an OpenSSH public key string, as ``ssh-keygen -l`` prints it."""
    return str(asyncssh.import_public_key(key_text).get_fingerprint("sha256"))


def pinned_key_from_known_hosts(path: Path, host: str, port: int) -> str | None:
    """The host key an OpenSSH ``known_hosts`` file lists for ``host:port`` (ed25519 preferred).

    For ``[ssh] known_hosts``: a bring-your-own host whose key the owner pinned up front.
    """
    try:
        known = asyncssh.read_known_hosts(str(path))
    except (OSError, ValueError) as exc:
        raise RemoteError(f"known_hosts file {path} is unreadable ({exc}); fix [ssh] known_hosts") from exc
    trusted = sorted(known.match(host, host, port)[0], key=lambda k: k.algorithm != b"ssh-ed25519")
    return openssh_public_key(trusted[0]) if trusted else None


class _HostKeyCheck(asyncssh.SSHClient):
    """Decides on the server's host key before any credential is offered.

    asyncssh calls ``validate_host_public_key`` for keys not in the trusted set we pass (empty
    for first contact, the pin otherwise), after the server proved it holds the private key.
    """

    def __init__(self, pinned: asyncssh.SSHKey | None) -> None:
        self.pinned = pinned
        self.seen: asyncssh.SSHKey | None = None

    def validate_host_public_key(self, host: str, addr: str, port: int, key: asyncssh.SSHKey) -> bool:
        self.seen = key
        return self.pinned is None  # trust on first use; a pinned match never reaches this


def _host_key_algs(pinned: asyncssh.SSHKey | None) -> list[str] | str:
    """Prefer the pinned key's algorithms but still accept others.

    Restricting to the pinned type (asyncssh's known_hosts default) makes a server that no longer
    has that key type hang up during key exchange — indistinguishable from a flaky link, so it
    would be retried until the deadline. Listing the other types after it lets such a server
    present its new key, which we then refuse with a clear HostKeyMismatch.
    """
    if pinned is None:
        return "default"
    algs = [a.decode() for a in pinned.sig_algorithms]
    algs += [a.decode() for a in get_default_public_key_algs() if a.decode() not in algs]
    return algs


# ---- connect ------------------------------------------------------------------------------------


def _load_client_key(key_file: Path) -> asyncssh.SSHKey:
    try:
        return asyncssh.read_private_key(str(key_file))
    except OSError as exc:
        raise RemoteError(
            f"SSH key file {key_file} is unreadable ({exc.strerror}); set [ssh] key_file to a private key"
        ) from exc
    except (asyncssh.KeyImportError, ValueError) as exc:
        # The library's message names the problem (e.g. passphrase), never the key's content.
        raise RemoteError(
            f"SSH key file {key_file} is not a usable private key ({exc}); "
            "use an unencrypted OpenSSH key (ssh-keygen -t ed25519 -N '')"
        ) from exc


def _parse_pin(pinned_host_key: str | None, where: str) -> asyncssh.SSHKey | None:
    if pinned_host_key is None:
        return None
    try:
        return asyncssh.import_public_key(pinned_host_key)
    except (asyncssh.KeyImportError, ValueError) as exc:
        raise RemoteError(
            f"the host key pinned for {where} is not an OpenSSH public key ({exc}); "
            "the stored pin is corrupt: clear it to re-learn the key on next contact"
        ) from exc


def _mismatch(where: str, pinned: asyncssh.SSHKey, seen: asyncssh.SSHKey | None) -> HostKeyMismatch:
    presented = (
        f"{seen.get_fingerprint('sha256')} ({seen.get_algorithm()})" if seen is not None else "an unverifiable key"
    )
    return HostKeyMismatch(
        f"host key of {where} changed: pinned {pinned.get_fingerprint('sha256')} ({pinned.get_algorithm()}), "
        f"server presented {presented}. Refusing to connect. If the host was rebuilt on purpose, "
        "clear the pinned key of this run; otherwise the connection may be intercepted."
    )


async def connect(
    endpoint: Endpoint,
    *,
    key_file: Path,
    pinned_host_key: str | None,
    keepalive_interval: float,
    keepalive_count_max: int,
    deadline_s: float,
    base_delay: float = 1.0,
    max_delay: float = 30.0,
    on_attempt: Callable[[int, BaseException], None] | None = None,
) -> tuple[SshSession, str]:
    """Connect to ``endpoint``, retrying transient failures until ``deadline_s`` has passed.

    Returns the session and the server's host key (``"ssh-ed25519 AAAA…"``). With
    ``pinned_host_key`` None the key is accepted (trust on first use) — store it and pin it next
    time. ``on_attempt(n, exc)`` is called after each failed attempt that will be retried.
    """
    where = f"{endpoint.host}:{endpoint.port}"
    client_key = _load_client_key(key_file)
    pinned = _parse_pin(pinned_host_key, where)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + deadline_s
    attempt = 0
    while True:
        attempt += 1
        checker = _HostKeyCheck(pinned)
        budget = max(deadline - loop.time(), 0.5)
        try:
            conn = await asyncssh.connect(
                endpoint.host,
                endpoint.port,
                username=endpoint.user,
                client_factory=lambda checker=checker: checker,
                client_keys=[client_key],
                known_hosts=([pinned] if pinned is not None else [], [], []),
                server_host_key_algs=_host_key_algs(pinned),
                x509_trusted_certs=None,
                preferred_auth="publickey",
                agent_path=None,  # only the configured key, never whatever an agent holds
                config=None,  # ~/.ssh/config must not redirect a daemon's connections
                keepalive_interval=keepalive_interval,
                keepalive_count_max=keepalive_count_max,
                window=CHANNEL_WINDOW,
                encryption_algs=ENCRYPTION_ALGS,
                connect_timeout=min(ATTEMPT_TIMEOUT_S, budget),
            )
        except asyncssh.HostKeyNotVerifiable as exc:
            if pinned is None:  # unreachable with TOFU, but never retry a host-key refusal
                raise HostKeyMismatch(f"host key of {where} could not be verified: {exc.reason}") from exc
            raise _mismatch(where, pinned, checker.seen) from exc
        except asyncssh.PermissionDenied as exc:
            raise RemoteError(
                f"{endpoint.user}@{where} refused key {key_file} "
                f"({client_key.get_fingerprint('sha256')}): add its public key (ssh-keygen -y -f {key_file}) "
                f"to ~{endpoint.user}/.ssh/authorized_keys on the host, or fix the configured user/key_file"
            ) from exc
        except asyncssh.KeyExchangeFailed as exc:
            raise RemoteError(
                f"{where}: SSH key exchange failed ({exc.reason}); the server's algorithms are unsupported"
            ) from exc
        except (OSError, asyncssh.DisconnectError) as exc:
            # Refused, reset, timed out, or sshd hung up mid-handshake (still starting, MaxStartups).
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise ConnectionLost(
                    f"could not connect to {endpoint.user}@{where} within {deadline_s:g}s "
                    f"({attempt} attempts; last: {type(exc).__name__}: {exc}); is sshd up and the port mapped?"
                ) from exc
            if on_attempt is not None:
                on_attempt(attempt, exc)
            # Full jitter: many daemons retrying one provider don't stampede in lockstep.
            await asyncio.sleep(min(random.uniform(0, min(max_delay, base_delay * 2 ** (attempt - 1))), remaining))
            continue
        server_key = conn.get_server_host_key()
        if server_key is None:  # only for host-based "none" auth, which we never negotiate
            conn.close()
            raise HostKeyMismatch(f"{where} presented no host key; refusing to connect")
        host_key = openssh_public_key(server_key)
        return SshSession(conn, endpoint, host_key), host_key


# ---- the session --------------------------------------------------------------------------------


def _sh(script: str, *args: str) -> str:
    """``sh -c SCRIPT`` with positional arguments: the user's login shell (bash, zsh, fish…)
    must not change what our own scripts mean, and paths never need quoting inside them."""
    return " ".join(["sh", "-c", shlex.quote(script), "mhd", *(shlex.quote(a) for a in args)])


async def _abandon(futures: Iterable[asyncio.Future[Any]]) -> None:
    """Cancel SFTP requests still in flight and wait for them to settle (their errors ignored)."""
    left = list(futures)
    for future in left:
        future.cancel()
    if left:
        await asyncio.gather(*left, return_exceptions=True)


def _last_line(output: str) -> str:
    # A digest is the last line: a chatty login shell or python wrapper (rc files that echo, a
    # pod image's banner) may have printed before it.
    return (output.strip().splitlines() or [""])[-1].strip()


def _short(command: str, limit: int = 80) -> str:
    line = " ".join(command.split())
    return line if len(line) <= limit else line[: limit - 1] + "…"


class _TempFileHasher:
    """Client side of ``_UPLOAD_HASHER_SH``: one remote process hashing the temp file as it grows.

    ``start`` (the process being created) proceeds while the transfer begins; until the process
    is up, ``tell`` does nothing: each later line carries a longer prefix, so nothing is lost.
    """

    def __init__(self, start: Awaitable[asyncssh.SSHClientProcess[str]]) -> None:
        self._start = asyncio.ensure_future(start)
        self._closed = False
        self._ended = False
        self.told = 0  # the longest prefix sent

        def close_if_abandoned(future: asyncio.Future[asyncssh.SSHClientProcess[str]]) -> None:
            # Also retrieves the exception of a failed start (the transfer reports the lost link).
            if not future.cancelled() and future.exception() is None and self._closed:
                future.result().close()

        self._start.add_done_callback(close_if_abandoned)

    def _proc(self) -> asyncssh.SSHClientProcess[str] | None:
        start = self._start
        if start.done() and not start.cancelled() and start.exception() is None:
            return start.result()
        return None

    def tell(self, complete: int) -> None:
        """The first ``complete`` bytes of the temp file are on the host (writes acknowledged)."""
        proc = self._proc()
        if proc is not None:
            with contextlib.suppress(OSError):  # it has exited (no python): its exit status says so
                proc.stdin.write(f"{complete}\n")
            self.told = complete

    def end(self, size: int) -> None:
        """All ``size`` bytes are written: hash to the end of the file and print the sha256."""
        proc = self._proc()
        if proc is not None and not self._ended:
            with contextlib.suppress(OSError):
                proc.stdin.write(f"{size}\nend\n")
                proc.stdin.write_eof()
            self._ended = True

    async def finish(self, size: int) -> asyncssh.SSHClientProcess[str]:
        """The process, once it is up, told the end (see ``end``)."""
        await asyncio.wait([self._start])  # a failed start raises below, from result()
        self.end(size)
        return self._start.result()

    def close(self) -> None:
        """Close the channel (the process sees EOF without "end" and exits), now or once it is up."""
        self._closed = True
        proc = self._proc()
        if proc is not None:
            proc.close()


async def _make_dirs(sftp: asyncssh.SFTPClient, path: str) -> None:
    """``mkdir -p path`` over SFTP: one request when the parent exists (asyncssh's makedirs
    walks from ``/``, two requests per component: costly over a far-away link)."""
    try:
        await sftp.mkdir(path)
    except asyncssh.SFTPNoSuchFile:
        parent = posixpath.dirname(path.rstrip("/"))
        if parent in ("", "/", path):
            raise
        await _make_dirs(sftp, parent)
        with contextlib.suppress(asyncssh.SFTPFailure, asyncssh.SFTPFileAlreadyExists):
            await sftp.mkdir(path)
    except (asyncssh.SFTPFailure, asyncssh.SFTPFileAlreadyExists):
        pass  # it exists (if not as a directory, opening the file in it says so)


class SshSession:
    """The ``Session`` protocol over one asyncssh connection (one lazily opened SFTP channel)."""

    # The pythons the upload hasher tries on the host, in order (a test swaps in names that exist
    # nowhere to see the fallback for hosts without python). The system python first: it starts
    # without a version manager's shim (pyenv's costs 70 ms of CPU, on the host, per upload).
    python_commands: tuple[str, ...] = ("/usr/bin/python3", "python3", "python")

    def __init__(self, conn: asyncssh.SSHClientConnection, endpoint: Endpoint, host_key: str) -> None:
        self._conn = conn
        self.endpoint = endpoint
        self.host_key = host_key
        self._where = f"{endpoint.user}@{endpoint.host}:{endpoint.port}"
        self._sftp_client: asyncssh.SFTPClient | None = None
        self._sftp_lock = asyncio.Lock()

    # ---- error boundary ---------------------------------------------------------------------

    @contextlib.contextmanager
    def _boundary(self, what: str) -> Iterator[None]:
        """Translate library errors of the remote operation ``what`` into the mhd tree."""
        try:
            yield
        except MhdError:
            raise
        except (asyncssh.SFTPConnectionLost, asyncssh.SFTPNoConnection, asyncssh.SFTPBadMessage) as exc:
            raise ConnectionLost(f"{what} on {self._where}: SFTP link lost ({exc}); reconnect and retry") from exc
        except asyncssh.SFTPError as exc:
            raise RemoteError(f"{what} on {self._where} refused by the host: {exc.reason}") from exc
        except (asyncssh.Error, OSError, EOFError) as exc:
            raise ConnectionLost(
                f"{what} on {self._where}: link lost ({type(exc).__name__}: {exc}); reconnect and retry"
            ) from exc

    async def _sftp(self) -> asyncssh.SFTPClient:
        async with self._sftp_lock:
            if self._sftp_client is None:
                with self._boundary("starting SFTP"):
                    self._sftp_client = await self._conn.start_sftp_client()
            return self._sftp_client

    # ---- commands ---------------------------------------------------------------------------

    async def run(self, command: str, *, input: str | None = None, timeout: float = 120.0) -> CommandResult:
        """Run ``command`` under the login shell; the exit status is the one sshd reported.

        A signal-killed command reports ``-signum`` (as ``subprocess`` does). A timeout raises
        RemoteError when the link is still alive (the command hung) and ConnectionLost when not.
        """
        what = f"running `{_short(command)}`"
        with self._boundary(what):
            proc = await self._conn.create_process(
                command,
                input=input,
                # No input means EOF at once: a command reading stdin must not wait forever.
                stdin=asyncssh.DEVNULL if input is None else asyncssh.PIPE,
                encoding="utf-8",
                errors="replace",
            )
        return await self._result(proc, what, timeout)

    async def _result(self, proc: asyncssh.SSHClientProcess[str], what: str, timeout: float) -> CommandResult:
        """Wait for ``proc`` (then close it) and give its exit status and output, as ``run`` does."""
        try:
            with self._boundary(what):
                try:
                    done = await proc.wait(check=False, timeout=timeout)
                except asyncssh.TimeoutError:
                    done = None
        finally:
            proc.close()
        if done is None:
            if await self._alive():
                raise RemoteError(f"{what} on {self._where} did not finish within {timeout:g}s; abandoned it")
            raise ConnectionLost(f"{what} on {self._where}: no answer within {timeout:g}s and the link is dead")
        if done.exit_signal is not None and done.returncode is not None:
            status = done.returncode
        elif done.exit_status is None or done.exit_status < 0:
            # The channel closed without an exit status: the link went away under the command.
            raise ConnectionLost(f"{what} on {self._where}: link lost before the command reported its exit status")
        else:
            status = done.exit_status
        return CommandResult(status, str(done.stdout or ""), str(done.stderr or ""))

    async def _alive(self) -> bool:
        try:
            probe = await asyncio.wait_for(self._conn.run("true", check=False, stdin=asyncssh.DEVNULL), PROBE_TIMEOUT_S)
        except (asyncssh.Error, OSError):
            return False
        return probe.exit_status == 0

    async def remote_sha256(self, remote: str) -> str | None:
        """sha256 of a remote file computed on the host (python, else ``sha256sum``); None if absent."""
        return self._digest(await self.run(_sh(_SHA256_SH, remote, _PY_SHA256)), f"hashing {remote}")

    def _digest(self, result: CommandResult, what: str) -> str | None:
        if result.exit_status == _SHA_MISSING:
            return None
        if result.exit_status == _SHA_NO_TOOL:
            raise RemoteError(f"{self._where} has neither sha256sum nor python; install coreutils or python3")
        digest = _last_line(result.stdout)
        if result.exit_status != 0 or not _SHA256_HEX.match(digest):
            raise RemoteError(
                f"{what} on {self._where} failed (exit {result.exit_status}): {result.stderr.strip()[:200]}"
            )
        return digest

    # ---- files ------------------------------------------------------------------------------

    async def upload(self, local: Path, remote: str, sha256: str) -> bool:
        """Put ``local`` at ``remote`` via a temp name, verify sha256 remotely, rename.

        Returns False when the remote file already had this sha256 (nothing sent).

        The host hashes the temp file while it is being written, not after: one python process
        there (``_UPLOAD_HASHER_SH``) follows the prefix the SFTP server has acknowledged, so when
        the last write is acknowledged only the tail is left to hash. The temp file replaces
        ``remote`` (an atomic rename) only if that hash is ``sha256``; otherwise it is deleted and
        IntegrityError raised. A host without python hashes the temp file after the transfer
        (``sha256sum``) instead. A link dropped mid-way never leaves a renamed file, and the next
        upload of the target deletes the temp files such drops leave behind.
        """
        want = sha256.lower()
        size = local.stat().st_size  # a missing local file is a local error, not a lost link
        if await self._already_there(remote, size, want):
            return False
        tmp = f"{remote}.tmp-{secrets.token_hex(6)}"
        hasher = _TempFileHasher(
            self._conn.create_process(
                _sh(_UPLOAD_HASHER_SH, remote, tmp, _PY_HASHER, *self.python_commands),
                encoding="utf-8",
                errors="replace",
            )
        )
        timeout = _hash_timeout(size)
        try:
            try:
                await self._send(local, tmp, size, hasher, f"upload of {local} to {remote}")
                with self._boundary(f"hashing {tmp}"):
                    proc = await hasher.finish(size)
                hashed = await self._result(proc, f"hashing {tmp}", timeout)
            finally:
                hasher.close()
        except Exception:
            await self._remove_quietly(tmp)  # fails fast on a dead link: the next upload's hasher clears it
            raise
        got = _last_line(hashed.stdout)
        if hashed.exit_status != 0 or not _SHA256_HEX.match(got):
            # No python on the host (or it failed): hash the whole temp file now, the old way.
            return await self._commit_by_script(local, tmp, remote, want, timeout)
        if got != want:
            await self._remove_quietly(tmp)
            raise self._upload_mismatch(local, remote, got, want)
        try:
            await self._rename(tmp, remote)
        except MhdError:
            await self._remove_quietly(tmp)
            raise
        return True

    async def _already_there(self, remote: str, size: int, want: str) -> bool:
        """Whether ``remote`` holds the content ``want`` already.

        An SFTP stat first: only a file of the same size is hashed on the host (a full read of it),
        in one command that also clears stale temp files of the target.
        """
        sftp = await self._sftp()
        with self._boundary(f"checking {remote}"):
            try:
                attrs = await sftp.stat(remote)
            except asyncssh.SFTPNoSuchFile:
                return False
        if attrs.size != size:
            return False
        prep = await self.run(_sh(_UPLOAD_PREP_SH, remote, _PY_SHA256), timeout=_hash_timeout(size))
        return self._digest(prep, f"hashing {remote}") == want

    async def _send(self, local: Path, tmp: str, size: int, hasher: _TempFileHasher, what: str) -> None:
        """Write the first ``size`` bytes of ``local`` to a new file ``tmp`` (its directory made
        when missing), with up to UPLOAD_MAX_REQUESTS block writes in flight.

        As the acknowledged prefix grows, ``hasher`` is told; after the last write it is told the
        end. Memory stays bounded by the writes in flight. Local read errors pass as OSError.
        """
        sftp = await self._sftp()
        with self._boundary(what):
            try:
                remote_file = await sftp.open(tmp, "wb", block_size=0)  # 0: one request per write()
            except asyncssh.SFTPNoSuchFile:
                await _make_dirs(sftp, posixpath.dirname(tmp))
                remote_file = await sftp.open(tmp, "wb", block_size=0)
        pending: deque[tuple[int, asyncio.Future[int]]] = deque()
        ok = False
        try:
            with local.open("rb") as src:
                offset = 0
                while True:
                    while offset < size and len(pending) < UPLOAD_MAX_REQUESTS:
                        block = src.read(min(SFTP_BLOCK, size - offset))
                        if not block:
                            raise IntegrityError(f"{what}: the local file shrank mid-transfer; retry when it is whole")
                        pending.append((offset + len(block), asyncio.ensure_future(remote_file.write(block, offset))))
                        offset += len(block)
                    if not pending:
                        break
                    written, future = pending.popleft()
                    with self._boundary(what):
                        await future
                    # Writes are acknowledged in order: everything before `written` is on the host.
                    if written - hasher.told >= HASH_FEED_STEP:
                        hasher.tell(written)
            hasher.end(size)  # the hasher works on the tail while the file is closed
            ok = True
        finally:
            await _abandon(f for _, f in pending)
            if ok:
                with self._boundary(what):
                    await remote_file.close()
            else:
                with contextlib.suppress(asyncssh.Error, OSError):
                    await remote_file.close()

    async def _commit_by_script(self, local: Path, tmp: str, remote: str, want: str, timeout: float) -> bool:
        commit = await self.run(_sh(_UPLOAD_COMMIT_SH, tmp, remote, want, _PY_SHA256), timeout=timeout)
        if commit.exit_status == _SHA_DIFFERS:
            raise self._upload_mismatch(local, remote, commit.stdout.strip(), want)
        if commit.exit_status != 0:
            await self._remove_quietly(tmp)
            self._digest(commit, f"verifying {tmp}")  # raises the specific error (no tool, unreadable)
            raise RemoteError(f"cannot rename {tmp} to {remote} on {self._where}: {commit.stderr.strip()[:200]}")
        return True

    def _upload_mismatch(self, local: Path, remote: str, got: str, want: str) -> IntegrityError:
        return IntegrityError(
            f"upload of {local} to {self._where}:{remote}: remote sha256 {got} != expected "
            f"{want}; the local file changed during upload or its recorded sha256 is stale — rebuild and retry"
        )

    async def download(self, remote: str, local: Path, sha256: str, size: int | None = None) -> int:
        """Stream ``remote`` into ``local``.part, resuming from its size, verify, move into place.

        Returns the number of bytes transferred this call (0 if ``local`` was already verified).
        Memory stays bounded by ``DOWNLOAD_WINDOW`` blocks whatever the file size.
        """
        want = sha256.lower()
        if local.exists() and await asyncio.to_thread(sha256_file, local) == want:
            return 0
        local.parent.mkdir(parents=True, exist_ok=True)
        part = local.with_name(local.name + ".part")
        what = f"download of {remote}"
        sftp = await self._sftp()
        with self._boundary(what):
            try:
                # block_size 0: each read() is one SFTP request, its data handed over as received.
                # asyncssh's parallel reader (block_size > 0) copies every block twice more, which
                # cost a 1 GiB download 0.3 CPU-s.
                remote_file = await sftp.open(remote, "rb", block_size=0)
            except asyncssh.SFTPNoSuchFile as exc:
                raise IntegrityError(f"{self._where}:{remote} does not exist, but the manifest lists it") from exc
        try:
            with self._boundary(what):
                end = int((await remote_file.stat()).size or 0)
            if size is not None and end != size:
                part.unlink(missing_ok=True)
                raise IntegrityError(f"{self._where}:{remote} has {end} bytes, the manifest says {size}")
            have = part.stat().st_size if part.exists() else 0
            if have > end:  # a stale part of some other, larger file: start over
                part.unlink()
                have = 0
            part.touch()
            # The prefix we already have is hashed while the rest arrives.
            hasher = await FollowingSha256.start(part)
            try:
                hasher.advance(have)
                sent = await self._stream(remote_file, part, hasher, have, end, what)
                got = await hasher.digest(end)
            finally:
                await hasher.close()
        finally:
            with contextlib.suppress(asyncssh.Error, OSError):
                await remote_file.close()
        if got is None:  # the hashing process died: hash the file here instead
            got = await asyncio.to_thread(sha256_file, part)
        if got != want:
            part.unlink(missing_ok=True)
            raise IntegrityError(
                f"{what} from {self._where}: sha256 {got} != manifest {want}; "
                "deleted the partial file, the next attempt fetches it again"
            )
        os.replace(part, local)
        return sent

    async def _stream(
        self,
        remote_file: asyncssh.SFTPClientFile,
        part: Path,
        hasher: FollowingSha256,
        start: int,
        end: int,
        what: str,
    ) -> int:
        """Append ``[start, end)`` of ``remote_file`` to ``part``, in order, telling ``hasher``.

        Up to DOWNLOAD_WINDOW block reads are in flight; blocks are written strictly in offset
        order, so after any interruption ``part`` is an exact prefix of the remote file. A worker
        thread writes a batch of blocks at a time (write releases the GIL) while this loop goes
        on receiving; each batch on disk is handed to ``hasher``.
        """
        loop = asyncio.get_running_loop()
        pending: deque[tuple[int, asyncio.Future[bytes]]] = deque()
        batch: list[bytes] = []
        batched = 0
        sink: asyncio.Future[None] | None = None
        sink_end = start  # the offset the batch being written ends at
        failed = False
        offset = start
        received = start
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="mhd-fetch") as worker, part.open("ab") as out:

            def write(blocks: list[bytes]) -> None:
                nonlocal failed
                if failed:  # after a failed write (disk full), none after it: part stays a prefix
                    return
                try:
                    # One block per write: 4 MiB writes cost this kernel 3x the CPU (page cache).
                    for block in blocks:
                        out.write(block)
                    out.flush()
                except BaseException:
                    failed = True
                    raise

            async def flush() -> None:
                nonlocal sink, sink_end, batch, batched
                if sink is not None:
                    await sink  # one batch at a time: memory stays bounded
                    hasher.advance(sink_end)
                sink = loop.run_in_executor(worker, write, batch) if batch else None
                sink_end += batched
                batch, batched = [], 0

            try:
                while True:
                    while offset < end and len(pending) < DOWNLOAD_WINDOW:
                        n = min(SFTP_BLOCK, end - offset)
                        pending.append((n, asyncio.ensure_future(remote_file.read(n, offset))))
                        offset += n
                    if not pending:
                        break
                    n, future = pending.popleft()
                    with self._boundary(what):
                        data = await future
                        if 0 < len(data) < n:  # a short read (allowed by SFTP): ask for the rest
                            data += await self._read_rest(remote_file, received + len(data), n - len(data))
                    if len(data) != n:
                        part.unlink(missing_ok=True)
                        raise IntegrityError(f"{self._where}: {what} ended early; the remote file shrank mid-transfer")
                    batch.append(data)
                    batched += n
                    received += n
                    if batched >= SINK_BATCH:
                        await flush()
            finally:
                await _abandon(f for _, f in pending)
                # What was received goes to disk even after an error: a longer prefix to resume.
                errors: list[BaseException | None] = list(await asyncio.gather(flush(), return_exceptions=True))
                if sink is not None:
                    errors += await asyncio.gather(sink, return_exceptions=True)
            for error in errors:
                if isinstance(error, BaseException):
                    raise error
        return received - start

    async def _read_rest(self, remote_file: asyncssh.SFTPClientFile, offset: int, n: int) -> bytes:
        """Up to ``n`` bytes from ``offset`` in as many reads as the server needs (b"" at EOF)."""
        parts: list[bytes] = []
        while n > 0:
            data: bytes = await remote_file.read(n, offset)
            if not data:
                break
            parts.append(data)
            offset += len(data)
            n -= len(data)
        return b"".join(parts)

    async def read_from(self, remote: str, offset: int, limit: int = 1 << 20) -> bytes:
        """Bytes of ``remote`` from ``offset`` (b"" if the file does not exist yet)."""
        sftp = await self._sftp()
        with self._boundary(f"reading {remote}"):
            try:
                async with sftp.open(remote, "rb") as f:
                    data: bytes = await f.read(limit, offset)
                    return data
            except asyncssh.SFTPNoSuchFile:
                return b""

    async def write_file(self, remote: str, data: bytes, mode: int = 0o644) -> None:
        """Write a small file atomically (temp + chmod + rename) with ``mode``."""
        sftp = await self._sftp()
        tmp = f"{remote}.tmp-{secrets.token_hex(6)}"
        parent = posixpath.dirname(remote)
        with self._boundary(f"writing {remote}"):
            if parent:
                await sftp.makedirs(parent, exist_ok=True)
            # Created with the final mode (0600 for secrets), so it is never readable by others.
            async with sftp.open(tmp, "wb", asyncssh.SFTPAttrs(permissions=mode)) as f:
                await f.write(data)
            await sftp.chmod(tmp, mode)  # the remote umask may have narrowed the mode at open
        await self._rename(tmp, remote)

    async def realpath(self, path: str) -> str:
        """The host's canonical path for ``path``, symlinks resolved; missing tails kept as is."""
        sftp = await self._sftp()
        tail: list[str] = []
        current = path
        with self._boundary(f"resolving {path}"):
            while True:
                try:
                    resolved = str(await sftp.realpath(current))
                    break
                except asyncssh.SFTPNoSuchFile:
                    # Only an existing component can be a symlink: resolve the existing prefix.
                    head, name = posixpath.split(current.rstrip("/"))
                    if not name or head == current:
                        raise
                    tail.insert(0, name)
                    current = head or "."
        return posixpath.join(resolved, *tail) if tail else resolved

    async def _rename(self, tmp: str, remote: str) -> None:
        sftp = await self._sftp()
        with self._boundary(f"renaming {tmp} to {remote}"):
            try:
                await sftp.posix_rename(tmp, remote)  # atomic replace (OpenSSH extension)
                return
            except asyncssh.SFTPOpUnsupported:
                pass
        result = await self.run(f"mv -f -- {shlex.quote(tmp)} {shlex.quote(remote)}")
        if result.exit_status != 0:
            raise RemoteError(f"cannot rename {tmp} to {remote} on {self._where}: {result.stderr.strip()[:200]}")

    async def _remove_quietly(self, remote: str) -> None:
        with contextlib.suppress(MhdError):
            sftp = await self._sftp()
            with self._boundary(f"removing {remote}"), contextlib.suppress(asyncssh.SFTPNoSuchFile):
                await sftp.remove(remote)

    # ---- lifecycle --------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._conn.is_closed()

    async def close(self) -> None:
        if self._sftp_client is not None:
            self._sftp_client.exit()
            self._sftp_client = None
        self._conn.close()
        # A dead link must not make close() hang: the socket is gone either way.
        with contextlib.suppress(asyncio.TimeoutError, asyncssh.Error, OSError):
            await asyncio.wait_for(self._conn.wait_closed(), 5)

    async def __aenter__(self) -> SshSession:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()
