"""SshSession against a real OpenSSH sshd on 127.0.0.1, with a TCP proxy to break the link.

The "remote" host is this machine, so a test can look at the remote side of a transfer with plain
file-system calls. Every test runs its own event loop (``asyncio.run``).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import posixpath
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest
from hypothesis import given
from hypothesis import strategies as st

from mhd.errors import ConnectionLost, HostKeyMismatch, IntegrityError, RemoteError
from mhd.hashing import FollowingSha256, sha256_file
from mhd.remote.paths import remote_realpath_inside, resolve_manifest_path, validate_manifest_path
from mhd.remote.provider import Endpoint
from mhd.remote.session import CommandResult, Session
from mhd.remote.ssh import (
    HASH_FEED_STEP,
    SFTP_BLOCK,
    SshSession,
    connect,
    host_key_fingerprint,
    pinned_key_from_known_hosts,
)
from tests.support.files import random_file
from tests.support.rss import RssPeak, rss_peak_during
from tests.support.sshd import SshServer, free_port
from tests.support.tcpproxy import TcpProxy

MiB = 1 << 20


@pytest.fixture
def own_sshd() -> Iterator[SshServer]:
    """A server a test may restart or re-key without disturbing the others."""
    with SshServer() as server:
        yield server


def via(proxy: TcpProxy, server: SshServer) -> Endpoint:
    return Endpoint(proxy.host, proxy.port, server.user)


async def open_session(
    server: SshServer,
    endpoint: Endpoint | None = None,
    *,
    pinned: str | None = None,
    deadline_s: float = 10.0,
    keepalive_interval: float = 15.0,
    keepalive_count_max: int = 4,
    attempts: list[BaseException] | None = None,
    base_delay: float = 0.1,
) -> SshSession:
    session, _ = await connect(
        endpoint or server.endpoint,
        key_file=server.client_key_path,
        pinned_host_key=pinned,
        keepalive_interval=keepalive_interval,
        keepalive_count_max=keepalive_count_max,
        deadline_s=deadline_s,
        base_delay=base_delay,
        max_delay=1.0,
        on_attempt=(lambda _n, exc: attempts.append(exc)) if attempts is not None else None,
    )
    return session


def running(pid: int) -> bool:
    """Alive and not a zombie (PID 1 here does not reap orphans)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


# ---- connect: host keys, backoff, deadline ------------------------------------------------------


def test_first_contact_returns_host_key_and_the_pin_is_accepted_next_time(sshd: SshServer) -> None:
    async def scenario() -> tuple[str, str]:
        first, key = await connect(
            sshd.endpoint,
            key_file=sshd.client_key_path,
            pinned_host_key=None,
            keepalive_interval=15,
            keepalive_count_max=4,
            deadline_s=10,
        )
        await first.close()
        again, key2 = await connect(
            sshd.endpoint,
            key_file=sshd.client_key_path,
            pinned_host_key=key,
            keepalive_interval=15,
            keepalive_count_max=4,
            deadline_s=10,
        )
        async with again:
            assert (await again.run("echo ok")).stdout == "ok\n"
        return key, key2

    key, key2 = asyncio.run(scenario())
    assert key == sshd.host_public_key
    assert key.startswith("ssh-ed25519 AAAA")
    assert key2 == key
    assert isinstance(SshSession, type) and issubclass(SshSession, object)


def test_session_satisfies_the_session_protocol(sshd: SshServer) -> None:
    async def scenario() -> bool:
        async with await open_session(sshd) as session:
            return isinstance(session, Session)

    assert asyncio.run(scenario())


def test_changed_host_key_is_refused_naming_both_fingerprints_and_never_retried(own_sshd: SshServer) -> None:
    old_key = own_sshd.host_public_key
    new_key = own_sshd.rotate_host_key()
    assert new_key != old_key
    attempts: list[BaseException] = []
    with TcpProxy(own_sshd.host, own_sshd.port) as proxy:
        started = time.monotonic()
        with pytest.raises(HostKeyMismatch) as err:
            asyncio.run(open_session(own_sshd, via(proxy, own_sshd), pinned=old_key, deadline_s=30, attempts=attempts))
        elapsed = time.monotonic() - started
        connections = proxy.connections
    message = str(err.value)
    assert f"{proxy.host}:{proxy.port}" in message
    assert host_key_fingerprint(old_key) in message
    assert host_key_fingerprint(new_key) in message
    assert attempts == [] and connections == 1, "a host-key refusal must not be retried"
    assert elapsed < 5


def test_pinned_key_of_another_type_is_a_mismatch_not_a_retry_loop(sshd: SshServer, tmp_path: Path) -> None:
    # The server only has ed25519; a pin of type RSA must still fail fast and clearly.
    subprocess.run(["ssh-keygen", "-q", "-t", "rsa", "-b", "2048", "-N", "", "-f", str(tmp_path / "k")], check=True)
    rsa_pin = " ".join((tmp_path / "k.pub").read_text().split()[:2])
    attempts: list[BaseException] = []
    with pytest.raises(HostKeyMismatch, match="changed"):
        asyncio.run(open_session(sshd, pinned=rsa_pin, deadline_s=20, attempts=attempts))
    assert attempts == []


def test_connect_waits_with_backoff_for_sshd_that_comes_up_late() -> None:
    server = SshServer()  # keys ready, not started
    try:
        timer = threading.Timer(2.0, server.start)
        attempts: list[BaseException] = []
        started = time.monotonic()
        timer.start()

        async def scenario() -> str:
            async with await open_session(server, deadline_s=30, attempts=attempts, base_delay=0.2) as s:
                return (await s.run("echo up")).stdout

        assert asyncio.run(scenario()) == "up\n"
        elapsed = time.monotonic() - started
        timer.join()
    finally:
        server.close()
    assert elapsed >= 2.0
    assert len(attempts) >= 2 and all(isinstance(e, OSError) for e in attempts)
    assert elapsed < 15, "backoff with max_delay=1s should reconnect soon after sshd is up"


def test_connect_rides_out_a_port_that_refuses_for_a_while(sshd: SshServer, proxy: TcpProxy) -> None:
    proxy.pause()
    attempts: list[BaseException] = []
    threading.Timer(1.0, proxy.resume).start()

    async def scenario() -> int:
        async with await open_session(sshd, via(proxy, sshd), deadline_s=20, attempts=attempts) as s:
            return (await s.run("exit 0")).exit_status

    assert asyncio.run(scenario()) == 0
    assert attempts and all(isinstance(e, ConnectionRefusedError) for e in attempts)
    assert proxy.connections == 1


def test_connect_gives_up_at_the_deadline_with_connection_lost(sshd: SshServer) -> None:
    dead = Endpoint("127.0.0.1", free_port(), sshd.user)
    attempts: list[BaseException] = []
    started = time.monotonic()
    with pytest.raises(ConnectionLost, match=r"within 1\.5s") as err:
        asyncio.run(open_session(sshd, dead, deadline_s=1.5, attempts=attempts, base_delay=0.05))
    elapsed = time.monotonic() - started
    assert 1.5 <= elapsed < 4
    assert len(attempts) >= 3
    assert isinstance(err.value.__cause__, OSError)


def test_unauthorized_key_is_a_permanent_error_with_a_fix(sshd: SshServer, tmp_path: Path) -> None:
    stranger = tmp_path / "stranger"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(stranger)], check=True)
    attempts: list[BaseException] = []

    async def scenario() -> None:
        await connect(
            sshd.endpoint,
            key_file=stranger,
            pinned_host_key=None,
            keepalive_interval=15,
            keepalive_count_max=4,
            deadline_s=20,
            on_attempt=lambda _n, exc: attempts.append(exc),
        )

    with pytest.raises(RemoteError, match="authorized_keys") as err:
        asyncio.run(scenario())
    assert not isinstance(err.value, ConnectionLost)
    assert attempts == []
    assert stranger.read_text() not in str(err.value)


def test_missing_key_file_is_a_permanent_error(sshd: SshServer, tmp_path: Path) -> None:
    async def scenario() -> None:
        await connect(
            sshd.endpoint,
            key_file=tmp_path / "nope",
            pinned_host_key=None,
            keepalive_interval=15,
            keepalive_count_max=4,
            deadline_s=20,
        )

    with pytest.raises(RemoteError, match="key_file") as err:
        asyncio.run(scenario())
    assert not isinstance(err.value, ConnectionLost)


def test_pin_can_come_from_a_known_hosts_file(sshd: SshServer) -> None:
    pin = pinned_key_from_known_hosts(sshd.known_hosts_path, sshd.host, sshd.port)
    assert pin == sshd.host_public_key
    assert pinned_key_from_known_hosts(sshd.known_hosts_path, "10.9.9.9", 22) is None


# ---- run ----------------------------------------------------------------------------------------


def test_run_returns_real_exit_statuses(sshd: SshServer) -> None:
    async def scenario() -> list[tuple[int, str, str]]:
        async with await open_session(sshd) as s:
            out = []
            for command, stdin in [
                ("echo hello", None),
                ("echo 'exit status: 0' ; exit 3", None),  # stdout that lies about the status
                ("echo oops >&2; exit 255", None),
                ("kill -9 $$", None),
                ("tr a-z A-Z", "piped in"),
                ("cat; echo after-eof", None),  # no input: stdin is at EOF, not left hanging
            ]:
                r = await s.run(command, input=stdin, timeout=20)
                out.append((r.exit_status, r.stdout, r.stderr))
            return out

    results = asyncio.run(scenario())
    assert results[0] == (0, "hello\n", "")
    assert results[1][0] == 3 and results[1][1] == "exit status: 0\n"
    assert results[2] == (255, "", "oops\n")
    assert results[3][0] == -9
    assert results[4] == (0, "PIPED IN", "")
    assert results[5] == (0, "after-eof\n", "")


def test_command_timeout_on_a_live_link_is_a_command_failure(sshd: SshServer) -> None:
    async def scenario() -> None:
        async with await open_session(sshd) as s:
            await s.run("sleep 30", timeout=1)

    started = time.monotonic()
    with pytest.raises(RemoteError, match="did not finish") as err:
        asyncio.run(scenario())
    assert not isinstance(err.value, ConnectionLost)
    assert time.monotonic() - started < 15


def test_cut_during_a_command_is_connection_lost(sshd: SshServer, proxy: TcpProxy) -> None:
    async def scenario() -> None:
        async with await open_session(sshd, via(proxy, sshd)) as s:
            threading.Timer(0.5, proxy.cut).start()
            await s.run("sleep 5")

    with pytest.raises(ConnectionLost):
        asyncio.run(scenario())


def test_keepalive_notices_a_silently_dead_link(sshd: SshServer, proxy: TcpProxy) -> None:
    async def scenario() -> None:
        async with await open_session(sshd, via(proxy, sshd), keepalive_interval=0.5, keepalive_count_max=2) as s:
            proxy.stall()
            await s.run("sleep 0.1", timeout=60)

    started = time.monotonic()
    try:
        with pytest.raises(ConnectionLost):
            asyncio.run(scenario())
    finally:
        proxy.unstall()
    assert time.monotonic() - started < 10, "keepalive (0.5 s x 2) should notice well before the 60 s timeout"


# ---- upload -------------------------------------------------------------------------------------


def test_upload_verifies_sha256_remotely_and_skips_an_identical_file(sshd: SshServer, tmp_path: Path) -> None:
    local = tmp_path / "dataset.jsonl"
    sha = random_file(local, 3 * MiB + 17)
    remote_dir = tmp_path / "remote" / "runs" / "mhd-1"
    remote = remote_dir / "input" / "dataset.jsonl"

    async def scenario() -> tuple[bool, bool, str | None]:
        async with await open_session(sshd) as s:
            first = await s.upload(local, str(remote), sha)
            second = await s.upload(local, str(remote), sha)
            return first, second, await s.remote_sha256(str(remote))

    first, second, remote_sha = asyncio.run(scenario())
    assert (first, second) == (True, False)
    assert remote_sha == sha == sha256_file(remote)
    assert sorted(p.name for p in remote.parent.iterdir()) == ["dataset.jsonl"], "no temp file left behind"


def test_upload_with_wrong_sha_is_refused_and_leaves_the_target_alone(sshd: SshServer, tmp_path: Path) -> None:
    local = tmp_path / "trainer.py"
    random_file(local, 100_000)
    remote = tmp_path / "remote" / "trainer.py"
    remote.parent.mkdir()
    remote.write_bytes(b"previous version")
    (remote.parent / "trainer.py.tmp-deadbeef").write_bytes(b"left by a dropped upload")

    async def scenario() -> None:
        async with await open_session(sshd) as s:
            await s.upload(local, str(remote), "0" * 64)

    with pytest.raises(IntegrityError, match="sha256"):
        asyncio.run(scenario())
    assert remote.read_bytes() == b"previous version"
    assert [p.name for p in remote.parent.iterdir()] == ["trainer.py"], "temp files cleaned up"


def test_upload_replaces_a_remote_file_with_other_content(sshd: SshServer, tmp_path: Path) -> None:
    local = tmp_path / "a.bin"
    sha = random_file(local, 70_000)
    remote = tmp_path / "remote.bin"
    remote.write_bytes(b"stale")

    async def scenario() -> bool:
        async with await open_session(sshd) as s:
            return await s.upload(local, str(remote), sha)

    assert asyncio.run(scenario()) is True
    assert sha256_file(remote) == sha


def spy_on_commands(session: SshSession) -> list[str]:
    """The shell commands ``session.run`` is asked to run from now on (they still run)."""
    seen: list[str] = []
    real_run = session.run

    async def run(command: str, *, input: str | None = None, timeout: float = 120.0) -> CommandResult:
        seen.append(command)
        return await real_run(command, input=input, timeout=timeout)

    session.run = run  # type: ignore[method-assign]
    return seen


def test_upload_hashes_an_odd_sized_multi_block_file_while_sending_it(sshd: SshServer, tmp_path: Path) -> None:
    local = tmp_path / "adapter.bin"
    size = 2 * HASH_FEED_STEP + 5 * SFTP_BLOCK + 12_345  # several hasher steps, a partial last block
    sha = random_file(local, size)
    remote = tmp_path / "remote" / "deep" / "er" / "adapter.bin"  # directories made on the way

    async def scenario() -> tuple[bool, list[str]]:
        async with await open_session(sshd) as s:
            commands = spy_on_commands(s)
            return await s.upload(local, str(remote), sha), commands

    sent, commands = asyncio.run(scenario())
    assert sent is True
    assert sha256_file(remote) == sha and remote.stat().st_size == size
    assert commands == [], "the overlapped hasher verified it: no shell command after the transfer"
    assert [p.name for p in remote.parent.iterdir()] == ["adapter.bin"]


def test_upload_of_an_empty_file(sshd: SshServer, tmp_path: Path) -> None:
    local = tmp_path / "empty.jsonl"
    local.write_bytes(b"")
    remote = tmp_path / "remote" / "empty.jsonl"

    async def scenario() -> tuple[bool, bool]:
        async with await open_session(sshd) as s:
            first = await s.upload(local, str(remote), sha256_file(local))
            return first, await s.upload(local, str(remote), sha256_file(local))

    assert asyncio.run(scenario()) == (True, False)
    assert remote.read_bytes() == b""


def test_download_of_an_empty_file_and_of_one_exactly_a_block_long(sshd: SshServer, tmp_path: Path) -> None:
    empty = tmp_path / "remote" / "empty.json"
    empty.parent.mkdir()
    empty.write_bytes(b"")
    block = tmp_path / "remote" / "block.bin"
    block_sha = random_file(block, SFTP_BLOCK)  # ends exactly at a read's boundary

    async def scenario() -> tuple[int, int]:
        async with await open_session(sshd) as s:
            a = await s.download(str(empty), tmp_path / "out" / "empty.json", sha256_file(empty), 0)
            b = await s.download(str(block), tmp_path / "out" / "block.bin", block_sha, SFTP_BLOCK)
            return a, b

    assert asyncio.run(scenario()) == (0, SFTP_BLOCK)
    assert (tmp_path / "out" / "empty.json").read_bytes() == b""
    assert sha256_file(tmp_path / "out" / "block.bin") == block_sha
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["block.bin", "empty.json"], "no .part left"


def test_upload_over_a_same_sized_file_with_other_content_replaces_it(sshd: SshServer, tmp_path: Path) -> None:
    local = tmp_path / "a.bin"
    sha = random_file(local, 300_000)
    remote = tmp_path / "remote.bin"
    random_file(remote, 300_000)
    (tmp_path / "remote.bin.tmp-0123456789ab").write_bytes(b"left by a dropped upload")

    async def scenario() -> bool:
        async with await open_session(sshd) as s:
            return await s.upload(local, str(remote), sha)

    assert asyncio.run(scenario()) is True
    assert sha256_file(remote) == sha
    assert not (tmp_path / "remote.bin.tmp-0123456789ab").exists()


def upload_meddled_with(sshd: SshServer, local: Path, remote: Path, sha: str, meddle: Callable[[], None]) -> None:
    """Upload over a 40 ms RTT link; ``meddle()`` runs once the host's temp file holds 1 MiB."""

    def watch() -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            temps = [p for p in remote.parent.iterdir() if ".tmp-" in p.name]
            if temps and temps[0].stat().st_size >= MiB:
                meddle()
                return
            time.sleep(0.001)

    # The latency makes the upload take long enough for the meddling to land first.
    with TcpProxy(sshd.host, sshd.port, latency_s=0.02) as slow:

        async def scenario() -> None:
            async with await open_session(sshd, via(slow, sshd)) as s:
                watcher = threading.Thread(target=watch)
                watcher.start()
                try:
                    await s.upload(local, str(remote), sha)
                finally:
                    await asyncio.to_thread(watcher.join)

        asyncio.run(scenario())


def test_a_local_file_rewritten_during_upload_is_refused_and_nothing_is_committed(
    sshd: SshServer, tmp_path: Path
) -> None:
    local = tmp_path / "dataset.jsonl"
    size = 48 * MiB  # more than the writes in flight: its tail is read well after the first ack
    sha = random_file(local, size)
    remote_dir = tmp_path / "remote"
    remote_dir.mkdir()
    rewritten = threading.Event()

    def rewrite_tail() -> None:
        with local.open("r+b") as f:
            f.seek(size - MiB)
            f.write(b"\0" * MiB)
        rewritten.set()

    with pytest.raises(IntegrityError, match="changed during upload"):
        upload_meddled_with(sshd, local, remote_dir / "dataset.jsonl", sha, rewrite_tail)
    assert rewritten.is_set()
    assert list(remote_dir.iterdir()) == [], "no target, and the temp file was deleted"


def test_a_local_file_that_shrinks_during_upload_is_refused(sshd: SshServer, tmp_path: Path) -> None:
    local = tmp_path / "dataset.jsonl"
    sha = random_file(local, 48 * MiB)
    remote_dir = tmp_path / "remote"
    remote_dir.mkdir()

    with pytest.raises(IntegrityError, match="shrank"):
        upload_meddled_with(sshd, local, remote_dir / "dataset.jsonl", sha, lambda: os.truncate(local, 40 * MiB))
    assert list(remote_dir.iterdir()) == []


def hasher_processes(temp_name: str) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        if any(temp_name in part for part in proc.info["cmdline"] or []) and running(proc.pid):
            found.append(proc)
    return found


def test_a_cut_mid_upload_commits_nothing_and_a_retry_succeeds(
    sshd: SshServer, proxy: TcpProxy, tmp_path: Path
) -> None:
    local = tmp_path / "trainer-inputs.tar"
    size = 32 * MiB
    sha = random_file(local, size)
    remote_dir = tmp_path / "remote"
    remote_dir.mkdir()
    remote = remote_dir / "inputs.tar"
    remote.write_bytes(b"the previous version")

    async def first_attempt() -> None:
        proxy.cut_after(12 * MiB, direction="up")
        async with await open_session(sshd, via(proxy, sshd)) as s:
            await s.upload(local, str(remote), sha)

    with pytest.raises(ConnectionLost):
        asyncio.run(first_attempt())
    assert remote.read_bytes() == b"the previous version", "nothing was renamed over the target"
    leftovers = [p.name for p in remote_dir.iterdir() if p.name != "inputs.tar"]
    assert len(leftovers) == 1 and leftovers[0].startswith("inputs.tar.tmp-")
    # The remote hasher sees its stdin close without "end" and exits, without hashing the rest.
    deadline = time.monotonic() + 10
    while hasher_processes(leftovers[0]) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert hasher_processes(leftovers[0]) == []

    async def retry() -> bool:
        async with await open_session(sshd, via(proxy, sshd)) as s:
            return await s.upload(local, str(remote), sha)

    assert asyncio.run(retry()) is True
    assert sha256_file(remote) == sha
    assert [p.name for p in remote_dir.iterdir()] == ["inputs.tar"], "the retry cleared the dropped temp file"


def test_a_host_without_python_verifies_with_sha256sum_after_the_transfer(sshd: SshServer, tmp_path: Path) -> None:
    local = tmp_path / "dataset.jsonl"
    sha = random_file(local, 2 * MiB + 3)
    remote_dir = tmp_path / "remote"
    remote = remote_dir / "dataset.jsonl"
    other = remote_dir / "other.jsonl"

    async def scenario() -> tuple[bool, list[str]]:
        async with await open_session(sshd) as s:
            s.python_commands = ("mhd-test-no-such-python",)
            commands = spy_on_commands(s)
            sent = await s.upload(local, str(remote), sha)
            with pytest.raises(IntegrityError, match="changed during upload"):
                await s.upload(local, str(other), "0" * 64)
            return sent, commands

    sent, commands = asyncio.run(scenario())
    assert sent is True and sha256_file(remote) == sha
    assert len(commands) == 2 and all("mv -f" in c for c in commands), "the after-transfer check ran, twice"
    assert [p.name for p in remote_dir.iterdir()] == ["dataset.jsonl"]


def test_output_before_the_digest_does_not_confuse_the_upload_hasher(sshd: SshServer, tmp_path: Path) -> None:
    # A python that greets first, as a chatty rc file or wrapper on a pod image would.
    chatty = tmp_path / "chatty-python"
    chatty.write_text(f"#!/bin/sh\necho 'Welcome to the pod!'\nexec {shlex.quote(sys.executable)} \"$@\"\n")
    chatty.chmod(0o755)
    local = tmp_path / "dataset.jsonl"
    sha = random_file(local, 3 * MiB)
    remote = tmp_path / "remote" / "dataset.jsonl"

    async def scenario() -> tuple[bool, list[str]]:
        async with await open_session(sshd) as s:
            s.python_commands = (str(chatty),)
            commands = spy_on_commands(s)
            return await s.upload(local, str(remote), sha), commands

    sent, commands = asyncio.run(scenario())
    assert sent is True and sha256_file(remote) == sha
    assert commands == [], "the digest was read after the greeting: no fallback"


def bare_bin(tmp_path: Path, *, python: bool) -> Path:
    """A PATH for the hasher script: rm, and this interpreter as python3 when ``python``."""
    bare = tmp_path / "bin"
    bare.mkdir()
    (bare / "rm").symlink_to(shutil.which("rm") or "/bin/rm")
    if python:
        (bare / "python3").symlink_to(sys.executable)
    return bare


def run_hasher(path_dir: Path, target: Path, temp: Path) -> subprocess.Popen[bytes]:
    """The upload hasher script, run here as sshd would run it, with pythons looked up in ``path_dir``."""
    from mhd.remote import ssh as ssh_module

    argv = ["/bin/sh", "-c", ssh_module._UPLOAD_HASHER_SH, "mhd", str(target), str(temp), ssh_module._PY_HASHER]
    return subprocess.Popen(
        [*argv, "python3", "python"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={"PATH": str(path_dir)},
    )  # fmt: skip


def test_the_upload_hasher_never_reads_past_the_prefix_it_was_told(tmp_path: Path) -> None:
    bare = bare_bin(tmp_path, python=True)
    target = tmp_path / "model.bin"
    temp = tmp_path / "model.bin.tmp-00ff00ff00ff"
    stale = tmp_path / "model.bin.tmp-deadbeefdead"
    stale.write_bytes(b"old")
    content = os.urandom(5 * MiB + 77)
    told = 2 * MiB + 5
    # Like a transfer in progress: the prefix is written, the rest of the file is still zeros.
    temp.write_bytes(content[:told] + b"\0" * (len(content) - told))
    hasher = run_hasher(bare, target, temp)
    assert hasher.stdin is not None and hasher.stdout is not None
    hasher.stdin.write(f"{told // 2}\n{told}\n".encode())
    hasher.stdin.flush()
    time.sleep(0.5)  # time enough to hash (and, were it wrong, to read the zeros after the prefix)
    with temp.open("r+b") as f:
        f.seek(told)
        f.write(content[told:])
    out, _err = hasher.communicate(f"{len(content)}\nend\n".encode(), timeout=30)
    assert hasher.returncode == 0
    assert out.decode().strip() == hashlib.sha256(content).hexdigest()
    assert not stale.exists() and temp.exists(), "stale temp files go, the one being written stays"


def test_the_upload_hasher_reads_files_it_cannot_map(tmp_path: Path) -> None:
    from mhd.remote import ssh as ssh_module

    # As on a file system without mmap support: mmap.mmap refuses, the hasher reads with pread.
    refuse = "import errno,mmap\ndef refuse(*a,**k): raise OSError(errno.ENODEV,'no mmap here')\nmmap.mmap=refuse\n"
    temp = tmp_path / "t.bin.tmp-1"
    content = os.urandom(3 * MiB + 4097)
    temp.write_bytes(content)
    hasher = subprocess.run(
        [sys.executable, "-c", refuse + ssh_module._PY_HASHER, str(temp)],
        input=f"{MiB + 1}\n{2 * MiB}\nend\n".encode(), capture_output=True, timeout=30,
    )  # fmt: skip
    assert (hasher.returncode, hasher.stdout.decode().strip()) == (0, hashlib.sha256(content).hexdigest())


def test_the_upload_hasher_exits_without_hashing_when_the_client_goes_away(tmp_path: Path) -> None:
    bare = bare_bin(tmp_path, python=True)
    temp = tmp_path / "t.bin.tmp-1"
    temp.write_bytes(os.urandom(MiB))
    hasher = run_hasher(bare, tmp_path / "t.bin", temp)
    out, _err = hasher.communicate(b"1000\n", timeout=30)  # EOF without "end": a dropped link
    assert (hasher.returncode, out) == (9, b"")
    hasher = run_hasher(bare, tmp_path / "t.bin", temp)
    out, _err = hasher.communicate(f"{2 * MiB}\n".encode(), timeout=30)  # more than the file has
    assert (hasher.returncode, out) == (8, b"")


def test_the_upload_hasher_reports_a_host_without_a_working_python(tmp_path: Path) -> None:
    from mhd.remote import ssh as ssh_module

    bare = bare_bin(tmp_path, python=False)
    temp = tmp_path / "t.bin.tmp-1"
    temp.write_bytes(b"x")
    (tmp_path / "t.bin.tmp-2").write_bytes(b"stale")
    hasher = run_hasher(bare, tmp_path / "t.bin", temp)
    hasher.communicate(b"1\nend\n", timeout=30)
    assert hasher.returncode == ssh_module._NO_PYTHON
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bin", "t.bin.tmp-1"], "stale temp files still go"
    (bare / "python3").write_text("#!/bin/sh\necho 'pyenv: python3: command not found' >&2; exit 127\n")
    (bare / "python3").chmod(0o755)
    hasher = run_hasher(bare, tmp_path / "t.bin", temp)
    out, _err = hasher.communicate(b"1\nend\n", timeout=30)
    assert hasher.returncode != 0 and out == b"", "a broken python fails: upload() falls back to sha256sum"


# ---- download -----------------------------------------------------------------------------------


def test_download_resumes_from_the_part_file_after_three_cuts(sshd: SshServer, proxy: TcpProxy, tmp_path: Path) -> None:
    size = 64 * MiB
    remote = tmp_path / "remote" / "adapter_model.safetensors"
    remote.parent.mkdir()
    sha = random_file(remote, size)
    local = tmp_path / "local" / "adapter_model.safetensors"
    part = local.with_name(local.name + ".part")
    starts: list[int] = []  # size of the .part when each attempt began
    outcomes: list[str] = []

    async def scenario() -> int:
        for _ in range(10):
            starts.append(part.stat().st_size if part.exists() else 0)
            if proxy.cuts < 3:
                proxy.cut_after(14 * MiB)  # drop the link ~14 MiB into this attempt
            try:
                session = await open_session(sshd, via(proxy, sshd), pinned=sshd.host_public_key)
                async with session:
                    sent = await session.download(str(remote), local, sha, size)
                    outcomes.append("done")
                    return sent
            except ConnectionLost:
                outcomes.append("cut")
        raise AssertionError(f"never finished: {outcomes}")

    last_sent = asyncio.run(scenario())
    assert outcomes == ["cut", "cut", "cut", "done"]
    assert sha256_file(local) == sha and not part.exists()
    assert starts[0] == 0 and starts[1] > 0, "the first cut left a partial file"
    assert starts == sorted(starts) and len(set(starts)) == 4, f"each attempt resumed further on: {starts}"
    assert last_sent == size - starts[-1], "the last attempt only fetched the missing tail"
    # What crossed the wire in total: about one file, not four.
    assert size <= proxy.bytes_down < 1.5 * size, proxy.bytes_down


def test_download_of_a_corrupted_remote_file_raises_and_leaves_nothing(sshd: SshServer, tmp_path: Path) -> None:
    remote = tmp_path / "remote.bin"
    sha = random_file(remote, 2 * MiB)
    with remote.open("r+b") as f:  # one flipped byte after the manifest was written
        f.seek(MiB)
        byte = f.read(1)
        f.seek(MiB)
        f.write(bytes([byte[0] ^ 0xFF]))
    local = tmp_path / "out" / "adapter.bin"

    async def scenario() -> None:
        async with await open_session(sshd) as s:
            await s.download(str(remote), local, sha, 2 * MiB)

    with pytest.raises(IntegrityError, match="sha256"):
        asyncio.run(scenario())
    assert not local.exists()
    assert list(local.parent.iterdir()) == []


def test_download_verifies_in_process_when_the_hashing_child_dies(
    sshd: SshServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    remote = tmp_path / "remote.bin"
    sha = random_file(remote, 9 * MiB)
    local = tmp_path / "out" / "adapter.bin"
    killed: list[int] = []
    real_start = FollowingSha256.start

    async def start_then_kill(path: Path) -> FollowingSha256:
        hasher = await real_start(path)
        assert hasher.pid is not None
        os.kill(hasher.pid, signal.SIGKILL)  # e.g. the OOM killer picked it
        killed.append(hasher.pid)
        return hasher

    monkeypatch.setattr(FollowingSha256, "start", start_then_kill)

    async def scenario() -> int:
        async with await open_session(sshd) as s:
            return await s.download(str(remote), local, sha, 9 * MiB)

    assert asyncio.run(scenario()) == 9 * MiB
    assert len(killed) == 1
    assert sha256_file(local) == sha and not local.with_name("adapter.bin.part").exists()
    # The fallback is a real check, not a pass: a wrong manifest hash is still caught.
    local.unlink()
    with pytest.raises(IntegrityError, match="sha256"):

        async def wrong() -> None:
            async with await open_session(sshd) as s:
                await s.download(str(remote), local, "0" * 64, 9 * MiB)

        asyncio.run(wrong())
    assert len(killed) == 2 and not local.exists()


class ShortReads:
    """An SFTP file whose server answers each read with at most ``most`` bytes (SFTP allows it;
    OpenSSH's sftp-server does not do it for regular files, so it stands in for servers that do)."""

    def __init__(self, data: bytes, most: int) -> None:
        self.data, self.most, self.reads = data, most, 0

    async def read(self, n: int, offset: int) -> bytes:
        self.reads += 1
        await asyncio.sleep(0)
        return self.data[offset : offset + min(n, self.most)]


def test_short_sftp_reads_are_completed_in_order_and_a_shrunk_file_is_refused(sshd: SshServer, tmp_path: Path) -> None:
    data = os.urandom(3 * SFTP_BLOCK + 777)
    part = tmp_path / "short.part"
    part.write_bytes(data[:1000])  # a resumed download: the prefix is already here
    short = ShortReads(data, most=100_000)
    shrunk = ShortReads(data[: 2 * SFTP_BLOCK], most=SFTP_BLOCK)  # the file lost its tail meanwhile

    async def scenario() -> tuple[int, str | None]:
        async with await open_session(sshd) as s:
            hasher = await FollowingSha256.start(part)
            try:
                hasher.advance(1000)
                sent = await s._stream(short, part, hasher, 1000, len(data), "download of short")  # type: ignore[arg-type]
                digest = await hasher.digest(len(data))
            finally:
                await hasher.close()
            other = tmp_path / "shrunk.part"
            other.touch()
            hasher = await FollowingSha256.start(other)
            try:
                with pytest.raises(IntegrityError, match="shrank"):
                    await s._stream(shrunk, other, hasher, 0, len(data), "download of shrunk")  # type: ignore[arg-type]
            finally:
                await hasher.close()
            assert not other.exists(), "a file that shrank mid-transfer leaves no partial file"
            return sent, digest

    sent, digest = asyncio.run(scenario())
    assert sent == len(data) - 1000
    assert part.read_bytes() == data
    assert digest == hashlib.sha256(data).hexdigest()
    assert short.reads > (len(data) - 1000) // SFTP_BLOCK + 1, "short answers were followed by reads for the rest"


def test_download_with_a_wrong_size_raises_integrity_error(sshd: SshServer, tmp_path: Path) -> None:
    remote = tmp_path / "remote.bin"
    sha = random_file(remote, 1000)

    async def scenario() -> None:
        async with await open_session(sshd) as s:
            await s.download(str(remote), tmp_path / "x", sha, 999)

    with pytest.raises(IntegrityError, match="1000 bytes"):
        asyncio.run(scenario())


def test_download_of_a_missing_remote_file_is_integrity_error(sshd: SshServer, tmp_path: Path) -> None:
    async def scenario() -> None:
        async with await open_session(sshd) as s:
            await s.download(str(tmp_path / "absent"), tmp_path / "x", "0" * 64)

    with pytest.raises(IntegrityError, match="does not exist"):
        asyncio.run(scenario())


def test_a_corrupt_part_file_is_dropped_and_the_next_attempt_starts_over(sshd: SshServer, tmp_path: Path) -> None:
    remote = tmp_path / "remote.bin"
    sha = random_file(remote, 3 * MiB)
    local = tmp_path / "local.bin"
    part = tmp_path / "local.bin.part"
    part.write_bytes(b"\0" * MiB)  # not a prefix of the remote file

    async def scenario() -> tuple[int, int]:
        async with await open_session(sshd) as s:
            with pytest.raises(IntegrityError):
                await s.download(str(remote), local, sha)
            assert not part.exists()
            first = await s.download(str(remote), local, sha)
            again = await s.download(str(remote), local, sha)
            return first, again

    first, again = asyncio.run(scenario())
    assert (first, again) == (3 * MiB, 0)
    assert sha256_file(local) == sha


# Upload: UPLOAD_MAX_REQUESTS blocks in flight (8 MiB) and asyncssh's packet copies of them, about
# 26 MiB measured. Download: DOWNLOAD_WINDOW reads and the writer's batches. Reading the whole file
# would be 256 MiB; issue 6's bound is + < 50 MB.
@pytest.mark.parametrize(("direction", "bound_mib"), [("upload", 48), ("download", 40)])
def test_transfer_memory_does_not_grow_with_file_size(
    sshd: SshServer, tmp_path: Path, direction: str, bound_mib: int
) -> None:
    size = 256 * MiB
    source = tmp_path / "merged.gguf"
    sha = random_file(source, size)
    copy = tmp_path / "copy.gguf"

    async def scenario() -> RssPeak:
        async with await open_session(sshd) as s:
            await s.run("true")  # warm up: SFTP/crypto buffers are not what we measure
            if direction == "upload":
                await s.read_from(str(source), 0, 1)
                return await rss_peak_during(s.upload(source, str(copy), sha))
            return await rss_peak_during(s.download(str(source), copy, sha, size))

    growth = asyncio.run(scenario()).growth
    assert sha256_file(copy) == sha
    assert growth < bound_mib * MiB, f"RSS grew by {growth / MiB:.1f} MiB during a {size // MiB} MiB {direction}"


# ---- small files --------------------------------------------------------------------------------


def test_write_file_is_atomic_with_mode_and_read_from_reads_at_an_offset(sshd: SshServer, tmp_path: Path) -> None:
    target = tmp_path / "run" / "secrets" / "env"

    async def scenario() -> tuple[bytes, bytes, bytes]:
        async with await open_session(sshd) as s:
            await s.write_file(str(target), b"TOKEN=abc\nMORE=1\n", 0o600)
            await s.write_file(str(target), b"TOKEN=xyz\nMORE=2\n", 0o600)
            return (
                await s.read_from(str(target), 0),
                await s.read_from(str(target), 10, limit=6),
                await s.read_from(str(tmp_path / "progress.jsonl"), 0),
            )

    whole, piece, missing = asyncio.run(scenario())
    assert whole == b"TOKEN=xyz\nMORE=2\n"
    assert piece == b"MORE=2"
    assert missing == b""
    assert target.stat().st_mode & 0o777 == 0o600
    assert [p.name for p in target.parent.iterdir()] == ["env"]


def test_read_from_past_the_end_is_empty(sshd: SshServer, tmp_path: Path) -> None:
    f = tmp_path / "progress.jsonl"
    f.write_bytes(b'{"step": 1}\n')

    async def scenario() -> bytes:
        async with await open_session(sshd) as s:
            return await s.read_from(str(f), 100)

    assert asyncio.run(scenario()) == b""


# ---- manifest paths -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bad",
    ["", "/etc/passwd", "../secrets", "adapter/../../x", "a\\b", "a\x00b", "a\nb", ".", "./", "adapter/.."],
)
def test_unsafe_manifest_paths_are_refused(bad: str) -> None:
    with pytest.raises(IntegrityError):
        validate_manifest_path(bad)


@pytest.mark.parametrize(
    ("given_path", "expected"),
    [("adapter/adapter_model.safetensors", "adapter/adapter_model.safetensors"), ("./a//b/", "a/b"), ("x..y", "x..y")],
)
def test_safe_manifest_paths_are_normalised(given_path: str, expected: str) -> None:
    assert validate_manifest_path(given_path) == expected


@given(st.text())
def test_an_accepted_manifest_path_never_leaves_the_root(rel: str) -> None:
    try:
        clean = validate_manifest_path(rel)
    except IntegrityError:
        return
    joined = posixpath.normpath(posixpath.join("/run/root", clean))
    assert joined.startswith("/run/root/")
    assert "\x00" not in clean and "\\" not in clean


def test_symlinks_out_of_the_run_dir_are_detected_on_the_remote(sshd: SshServer, tmp_path: Path) -> None:
    root = tmp_path / "runs" / "mhd-1"
    (root / "adapter").mkdir(parents=True)
    (root / "adapter" / "model.bin").write_bytes(b"x")
    (tmp_path / "outside").write_bytes(b"secret")
    (root / "adapter" / "escape").symlink_to(tmp_path / "outside")
    (root / "up").symlink_to("../..")
    (root / "inner").symlink_to("adapter")  # a symlink that stays inside is fine

    async def scenario() -> dict[str, bool]:
        async with await open_session(sshd) as s:
            verdict = {
                rel: await remote_realpath_inside(s, str(root), rel)
                for rel in ["adapter/model.bin", "adapter/escape", "up/outside", "inner/model.bin", "adapter/new.bin"]
            }
            with pytest.raises(IntegrityError, match="outside the run dir"):
                await resolve_manifest_path(s, str(root), "adapter/escape")
            assert await resolve_manifest_path(s, str(root), "./adapter/model.bin") == f"{root}/adapter/model.bin"
            return verdict

    assert asyncio.run(scenario()) == {
        "adapter/model.bin": True,
        "adapter/escape": False,
        "up/outside": False,
        "inner/model.bin": True,
        "adapter/new.bin": True,
    }


# ---- detached jobs ------------------------------------------------------------------------------


def test_detached_job_outlives_the_session_a_cut_and_an_sshd_restart(own_sshd: SshServer, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    pid_file = run_dir / "pid"
    launch = (
        f"setsid nohup sh -c 'echo $$ > {pid_file}; sleep 120; echo finished > {run_dir}/exit_code' "
        f"> {run_dir}/train.log 2>&1 < /dev/null &"
    )
    pid = 0
    with TcpProxy(own_sshd.host, own_sshd.port) as proxy:

        async def launch_and_leave() -> tuple[int, float]:
            async with await open_session(own_sshd, via(proxy, own_sshd)) as s:
                started = time.monotonic()
                result = await s.run(launch, timeout=20)
                return result.exit_status, time.monotonic() - started

        status, took = asyncio.run(launch_and_leave())
        assert status == 0 and took < 5, "run() returns at once instead of holding the channel open"
        for _ in range(50):
            if pid_file.exists() and pid_file.read_text().strip():
                break
            time.sleep(0.1)
        pid = int(pid_file.read_text())
        try:
            proxy.cut()
            own_sshd.restart()
            time.sleep(0.5)
            assert running(pid), "the job died with its SSH session"

            async def check_again() -> int:
                async with await open_session(own_sshd, via(proxy, own_sshd), pinned=own_sshd.host_public_key) as s:
                    return (await s.run(f"kill -0 {pid}")).exit_status

            assert asyncio.run(check_again()) == 0
            assert not (run_dir / "exit_code").exists()
        finally:
            if pid and running(pid):
                os.killpg(pid, 9)  # the group this test started


def test_sshd_restart_drops_the_session_and_a_pinned_reconnect_works(own_sshd: SshServer) -> None:
    async def scenario() -> str:
        session = await open_session(own_sshd)
        try:
            assert (await session.run("echo 1")).exit_status == 0
            await asyncio.to_thread(own_sshd.restart)
            with pytest.raises(ConnectionLost):
                await session.run("echo 2")
        finally:
            await session.close()
        async with await open_session(own_sshd, pinned=own_sshd.host_public_key) as again:
            return (await again.run("echo 3")).stdout

    assert asyncio.run(scenario()) == "3\n"


# ---- remote helper scripts ----------------------------------------------------------------------


def test_odd_file_names_survive_upload_hashing_and_download(sshd: SshServer, tmp_path: Path) -> None:
    local = tmp_path / "plain.bin"
    sha = random_file(local, 50_000)
    odd = tmp_path / 'it\'s a "dir" $HOME' / "we\\ird\nname; rm -rf x.bin"

    async def scenario() -> tuple[bool, str | None, int]:
        async with await open_session(sshd) as s:
            put = await s.upload(local, str(odd), sha)
            digest = await s.remote_sha256(str(odd))
            got = await s.download(str(odd), tmp_path / "back.bin", sha)
            return put, digest, got

    assert asyncio.run(scenario()) == (True, sha, 50_000)
    assert sha256_file(odd) == sha


def test_remote_hashing_uses_python_or_coreutils_whichever_the_host_has(tmp_path: Path) -> None:
    from mhd.remote import ssh as ssh_module

    f = tmp_path / "data.bin"
    sha = random_file(f, 3 * MiB + 1)
    bare = tmp_path / "bin"
    bare.mkdir()

    def hash_with_path_of(path_dir: Path) -> tuple[int, str]:
        done = subprocess.run(
            ["/bin/sh", "-c", ssh_module._SHA256_SH, "mhd", str(f), ssh_module._PY_SHA256],
            capture_output=True, text=True, env={"PATH": str(path_dir)},
        )  # fmt: skip
        return done.returncode, done.stdout.strip()

    assert hash_with_path_of(bare) == (4, "")  # neither tool: a clear, distinct status
    (bare / "sha256sum").symlink_to(shutil.which("sha256sum") or "/usr/bin/sha256sum")
    assert hash_with_path_of(bare) == (0, sha)
    (bare / "python3").write_text("#!/bin/sh\necho 'pyenv: python3: command not found' >&2; exit 127\n")
    (bare / "python3").chmod(0o755)
    assert hash_with_path_of(bare) == (0, sha), "a broken python falls through to sha256sum"
    (bare / "sha256sum").unlink()
    (bare / "python3").unlink()
    (bare / "python3").symlink_to(sys.executable)
    assert hash_with_path_of(bare) == (0, sha)


def test_remote_hash_answers_are_read_from_their_last_line(sshd: SshServer) -> None:
    digest = "ab" * 32

    async def scenario() -> tuple[str | None, str]:
        async with await open_session(sshd) as s:
            chatty = s._digest(CommandResult(0, f"Welcome to the pod!\n{digest}\n", ""), "hashing x")
            with pytest.raises(RemoteError, match=r"hashing y on .* failed"):
                s._digest(CommandResult(0, f"{digest}\nthen something else\n", ""), "hashing y")
            return chatty, digest

    got, want = asyncio.run(scenario())
    assert got == want
