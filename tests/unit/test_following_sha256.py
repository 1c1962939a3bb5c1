"""FollowingSha256: the download's sha256, computed by a child process as the file grows."""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from mhd import _follow_sha256 as follower
from mhd.hashing import FollowingSha256

KiB = 1 << 10


def run_by_hand(path: Path, stdin: bytes) -> subprocess.CompletedProcess[bytes]:
    """The child as FollowingSha256 starts it, fed ``stdin`` at once."""
    return subprocess.run([sys.executable, "-I", "-S", follower.__file__, str(path)], input=stdin, capture_output=True)


def test_follows_a_growing_file_and_hashes_exactly_the_prefix_it_was_given(tmp_path: Path) -> None:
    path = tmp_path / "adapter.part"
    path.write_bytes(b"")
    chunks = [os.urandom(n) for n in (1, 4095, 65536, 300 * KiB, 3)]
    written = b""

    async def scenario() -> tuple[str | None, str | None]:
        nonlocal written
        hasher = await FollowingSha256.start(path)
        try:
            with path.open("ab") as out:
                for chunk in chunks:
                    out.write(chunk)
                    out.flush()
                    written += chunk
                    hasher.advance(len(written))
                out.write(b"not told about")  # beyond the digest's end: must not count
            first = await hasher.digest(len(written))
        finally:
            await hasher.close()
        # A second follower asked for a shorter prefix than the file holds.
        again = await FollowingSha256.start(path)
        try:
            prefix = await again.digest(70000)
        finally:
            await again.close()
        return first, prefix

    whole, prefix = asyncio.run(scenario())
    assert whole == hashlib.sha256(written).hexdigest()
    assert prefix == hashlib.sha256(path.read_bytes()[:70000]).hexdigest()


def test_a_file_shorter_than_promised_gives_no_digest(tmp_path: Path) -> None:
    path = tmp_path / "short.part"
    path.write_bytes(b"x" * 1000)

    async def scenario() -> str | None:
        hasher = await FollowingSha256.start(path)
        try:
            return await hasher.digest(5000)
        finally:
            await hasher.close()

    assert asyncio.run(scenario()) is None
    # The child says why, naming the file (what a person running it by hand would see).
    proc = run_by_hand(path, b"5000\ndone\n")
    assert proc.returncode == 3 and proc.stdout == b""
    assert f"{path} has 1000 bytes, 5000 were promised" in proc.stderr.decode()


def test_a_killed_child_gives_no_digest_and_close_reaps_it(tmp_path: Path) -> None:
    path = tmp_path / "f.part"
    path.write_bytes(os.urandom(10000))

    async def scenario() -> tuple[str | None, int | None]:
        hasher = await FollowingSha256.start(path)
        hasher.advance(5000)
        assert hasher.pid is not None
        os.kill(hasher.pid, signal.SIGKILL)
        for _ in range(1000):  # until the loop has reaped it
            if hasher.returncode is not None:
                break
            await asyncio.sleep(0.01)
        digest = await hasher.digest(10000)
        await hasher.close()
        return digest, hasher.returncode

    digest, code = asyncio.run(scenario())
    assert digest is None
    assert code == -signal.SIGKILL


def test_close_without_a_digest_stops_the_child(tmp_path: Path) -> None:
    path = tmp_path / "f.part"
    path.write_bytes(os.urandom(1000))

    async def scenario() -> tuple[int | None, int | None]:
        hasher = await FollowingSha256.start(path)
        hasher.advance(1000)
        before = hasher.returncode
        await hasher.close()
        return before, hasher.returncode

    before, after = asyncio.run(scenario())
    assert before is None, "the child waits for more while the transfer runs"
    assert after is not None, "and is gone once the transfer gave up"


def test_no_process_to_be_had_means_no_digest(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "f.part"
    path.write_bytes(b"abc")
    monkeypatch.setattr(sys, "executable", str(tmp_path / "no-such-python"))

    async def scenario() -> tuple[int | None, str | None]:
        hasher = await FollowingSha256.start(path)
        hasher.advance(3)
        try:
            return hasher.pid, await hasher.digest(3)
        finally:
            await hasher.close()

    assert asyncio.run(scenario()) == (None, None), "the caller then hashes the file itself"


def test_the_parent_going_away_ends_the_child_without_output(tmp_path: Path) -> None:
    path = tmp_path / "f.part"
    path.write_bytes(os.urandom(1000))
    proc = run_by_hand(path, b"1000\n")
    assert proc.returncode == 1 and proc.stdout == b""


@pytest.mark.parametrize("mapped", [True, False], ids=["mmap", "read-fallback"])
def test_windows_and_offsets_give_the_same_digest_by_mmap_or_by_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mapped: bool
) -> None:
    data = os.urandom(1_000_003)
    path = tmp_path / "f.bin"
    path.write_bytes(data)
    # Small windows: many of them, starting at offsets that are not page-aligned.
    monkeypatch.setattr(follower, "WINDOW", 3 * 4096 + 17)
    if not mapped:

        def no_mmap(*_args: object) -> None:
            raise OSError(19, "No such device")  # what mmap says on a filesystem without it

        monkeypatch.setattr(follower, "_hash_mapped", no_mmap)
    lines = [b"1\n", b"4097\n", b"4097\n", b"500000\n", b"1000003\n", b"done\n"]
    assert follower.follow(str(path), iter(lines)) == hashlib.sha256(data).hexdigest()
    assert follower.follow(str(path), iter([b"777\n"])) is None, "no 'done': no digest"
