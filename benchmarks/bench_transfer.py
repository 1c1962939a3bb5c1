"""How fast, and how lean, mhd moves files over SSH — next to OpenSSH ``scp`` and the seed's base64.

Run it (it starts its own sshd on 127.0.0.1 from tests/support, nothing else is touched):

    .venv/bin/python -m benchmarks.bench_transfer            # 256 MiB, 3 repeats (median)
    .venv/bin/python -m benchmarks.bench_transfer --big      # and 1 GiB
    .venv/bin/python -m benchmarks.bench_transfer --rtt-ms 50  # through a proxy adding 50 ms RTT

Methods, each timed end to end as the daemon (or the seed) would pay for it:
  mhd      SshSession.upload (SFTP stat of the target, hashed only when its size matches; SFTP
           writes to a temp name that a python on the host hashes as the acknowledged prefix
           grows; rename if the sha256 matches) and SshSession.download (streamed to .part,
           hashed on the way, renamed)
  scp      OpenSSH scp with default options (SFTP protocol since OpenSSH 9)
  sftp     the same SFTP session and settings without mhd's checks (asyncssh put/get), to show
           what the remote sha256 verification and in-order hashing cost
  base64   the seed's way: ``base64 file | ssh host 'base64 -d > dst'`` and the reverse

It also runs one SshSession download and then upload of ``--rss-mib`` (1 GiB) in a fresh child
process and reports how far its RSS rose above the same process idling on an open connection.

Prints a table (MiB/s and ratio to scp) and writes benchmarks/out/transfer.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import asyncssh

from mhd.hashing import sha256_file
from mhd.remote.provider import Endpoint
from mhd.remote.ssh import SFTP_BLOCK, UPLOAD_MAX_REQUESTS, SshSession, connect
from tests.support.files import random_file
from tests.support.rss import rss_peak_during
from tests.support.sshd import SshServer
from tests.support.tcpproxy import TcpProxy

MiB = 1 << 20
OUT = Path(__file__).resolve().parent / "out" / "transfer.json"


def warm_page_cache(path: Path) -> None:
    buf = bytearray(MiB)
    with path.open("rb", buffering=0) as f:
        while f.readinto(buf):
            pass


class Bench:
    def __init__(self, server: SshServer, endpoint: Endpoint, work: Path, repeat: int) -> None:
        self.server = server
        self.endpoint = endpoint
        self.work = work
        self.repeat = repeat
        self.rows: list[dict[str, Any]] = []

    # -- plumbing -------------------------------------------------------------------------------

    def ssh_base(self) -> list[str]:
        ep = self.endpoint
        return ["ssh", *self.server.ssh_options(), "-p", str(ep.port), f"{ep.user}@{ep.host}"]

    def scp(self, src: str, dst: str) -> None:
        target = f"{self.endpoint.user}@{self.endpoint.host}:"
        argv = ["scp", "-q", *self.server.ssh_options(), "-P", str(self.endpoint.port)]
        argv += [s.replace("REMOTE:", target) for s in (src, dst)]
        subprocess.run(argv, check=True)

    def shell(self, pipeline: str) -> None:
        subprocess.run(["bash", "-o", "pipefail", "-c", pipeline], check=True)

    async def session(self) -> SshSession:
        session, _ = await connect(
            self.endpoint,
            key_file=self.server.client_key_path,
            pinned_host_key=self.server.host_public_key,
            keepalive_interval=15,
            keepalive_count_max=4,
            deadline_s=20,
        )
        return session

    async def measure(
        self,
        size: int,
        direction: str,
        methods: Sequence[tuple[str, Callable[[], Awaitable[None]]]],
        reset: Callable[[], None],
        check: Callable[[], bool],
        source: Path,
    ) -> None:
        """Time each method ``repeat`` times, the methods taking turns within each round.

        Turns, not one method's repeats in a row: the machine's speed drifts (other load, page
        cache, CPU clocks), and each ratio to scp should compare neighbours in time. The turn order
        rotates from round to round, so that no method always follows the same one.
        """
        times: dict[str, list[float]] = {method: [] for method, _ in methods}
        for round_no in range(self.repeat):
            shift = round_no % len(methods)
            for method, run in [*methods[shift:], *methods[:shift]]:
                reset()
                # Untimed, and the same for every method: the dirty pages the previous method left
                # behind are written back now (not by the kernel during the next method), and the
                # source is read into the page cache (this VM's kernel pages out idle file pages
                # within seconds, so whoever came after the slowest method would read from disk).
                os.sync()
                warm_page_cache(source)
                started = time.perf_counter()
                await run()
                times[method].append(time.perf_counter() - started)
                if not check():
                    raise SystemExit(f"{method} {direction} produced a wrong file")
        for method, _ in methods:
            median = statistics.median(times[method])
            row = {
                "size_mib": size // MiB,
                "direction": direction,
                "method": method,
                "seconds_median": round(median, 3),
                "seconds_all": [round(t, 3) for t in times[method]],
                "mib_s": round(size / MiB / median, 1),
            }
            self.rows.append(row)
            print(f"  {size // MiB:>5} MiB {direction:<8} {method:<7} {row['mib_s']:>8.1f} MiB/s", flush=True)

    # -- one size ---------------------------------------------------------------------------------

    async def run_size(self, size: int) -> None:
        src = self.work / f"src-{size // MiB}M.bin"  # also plays the remote file for downloads
        sha = random_file(src, size)
        remote_dst = self.work / "remote-dst.bin"
        local_dst = self.work / "local-dst.bin"

        def reset_remote() -> None:
            remote_dst.unlink(missing_ok=True)

        def reset_local() -> None:
            local_dst.unlink(missing_ok=True)
            local_dst.with_name(local_dst.name + ".part").unlink(missing_ok=True)

        def remote_ok() -> bool:
            return sha256_file(remote_dst) == sha

        def local_ok() -> bool:
            return sha256_file(local_dst) == sha

        session = await self.session()
        try:

            async def mhd_up() -> None:
                assert await session.upload(src, str(remote_dst), sha)

            async def mhd_down() -> None:
                assert await session.download(str(src), local_dst, sha, size) == size

            # The same SFTP settings without mhd's verification, to show what the checks cost.
            async def raw_up() -> None:
                sftp = await session._sftp()
                await sftp.put(str(src), str(remote_dst), block_size=SFTP_BLOCK, max_requests=UPLOAD_MAX_REQUESTS)

            async def raw_down() -> None:
                sftp = await session._sftp()
                await sftp.get(str(src), str(local_dst), block_size=SFTP_BLOCK, max_requests=UPLOAD_MAX_REQUESTS)

            async def scp_up() -> None:
                await asyncio.to_thread(self.scp, str(src), f"REMOTE:{remote_dst}")

            async def scp_down() -> None:
                await asyncio.to_thread(self.scp, f"REMOTE:{src}", str(local_dst))

            ssh = shlex.join(self.ssh_base())

            async def b64_up() -> None:
                remote_cmd = shlex.quote(f"base64 -d > {shlex.quote(str(remote_dst))}")
                await asyncio.to_thread(self.shell, f"base64 {shlex.quote(str(src))} | {ssh} {remote_cmd}")

            async def b64_down() -> None:
                remote_cmd = shlex.quote(f"base64 {shlex.quote(str(src))}")
                await asyncio.to_thread(self.shell, f"{ssh} {remote_cmd} | base64 -d > {shlex.quote(str(local_dst))}")

            for direction, methods, reset, check in (
                (
                    "upload",
                    (("scp", scp_up), ("mhd", mhd_up), ("sftp", raw_up), ("base64", b64_up)),
                    reset_remote,
                    remote_ok,
                ),
                (
                    "download",
                    (("scp", scp_down), ("mhd", mhd_down), ("sftp", raw_down), ("base64", b64_down)),
                    reset_local,
                    local_ok,
                ),
            ):
                await self.measure(size, direction, methods, reset, check, src)
        finally:
            await session.close()
            remote_dst.unlink(missing_ok=True)
            reset_local()
            src.unlink(missing_ok=True)


# ---- RSS of a 1 GiB download, measured in a fresh process ----------------------------------------


async def rss_child(args: argparse.Namespace) -> None:
    """Child mode: connect, idle, download, idle, upload; print idle and peak RSS of each as JSON."""
    session, _ = await connect(
        Endpoint(args.host, args.port, args.user),
        key_file=Path(args.key),
        pinned_host_key=args.pin,
        keepalive_interval=15,
        keepalive_count_max=4,
        deadline_s=20,
    )

    async def peak_during(transfer: Any) -> dict[str, float]:
        got = await rss_peak_during(transfer, settle_s=0.5)
        return {"idle_rss": got.idle, "peak_rss": got.peak, "seconds": got.seconds}

    async with session:
        await session.run("true")
        await session.read_from(args.remote, 0, 1)  # SFTP channel open: idle means "ready to go"
        down = await peak_during(session.download(args.remote, Path(args.local), args.sha, args.size))
        up = await peak_during(session.upload(Path(args.local), args.remote + ".up", args.sha))
    print(json.dumps({"download": down, "upload": up}))


def measure_rss(server: SshServer, endpoint: Endpoint, work: Path, size: int) -> list[dict[str, Any]]:
    remote = work / "rss-src.bin"
    local = work / "rss-dst.bin"
    sha = random_file(remote, size)
    try:
        out = subprocess.run(
            [
                sys.executable, "-m", "benchmarks.bench_transfer", "--rss-child",
                "--host", endpoint.host, "--port", str(endpoint.port), "--user", endpoint.user,
                "--key", str(server.client_key_path), "--pin", server.host_public_key,
                "--remote", str(remote), "--local", str(local), "--sha", sha, "--size", str(size),
            ],
            check=True, capture_output=True, text=True, cwd=Path(__file__).resolve().parent.parent,
        )  # fmt: skip
    finally:
        for f in (remote, local, work / "rss-src.bin.up"):
            f.unlink(missing_ok=True)
    data = json.loads(out.stdout.strip().splitlines()[-1])
    return [{
        "direction": direction,
        "size_mib": size // MiB,
        "idle_rss_mib": round(d["idle_rss"] / MiB, 1),
        "peak_rss_mib": round(d["peak_rss"] / MiB, 1),
        "delta_mib": round((d["peak_rss"] - d["idle_rss"]) / MiB, 1),
        "mib_s": round(size / MiB / d["seconds"], 1),
    } for direction, d in data.items()]


# ---- main ----------------------------------------------------------------------------------------


def print_table(rows: list[dict[str, Any]]) -> None:
    scp = {(r["size_mib"], r["direction"]): r["mib_s"] for r in rows if r["method"] == "scp"}
    print()
    print(f"{'size':>9}  {'direction':<9} {'method':<7} {'MiB/s':>8}  {'vs scp':>7}")
    for r in rows:
        ratio = r["mib_s"] / scp[(r["size_mib"], r["direction"])]
        r["ratio_vs_scp"] = round(ratio, 2)
        print(f"{r['size_mib']:>5} MiB  {r['direction']:<9} {r['method']:<7} {r['mib_s']:>8.1f}  {ratio:>6.2f}x")


async def main(args: argparse.Namespace) -> None:
    sizes = [args.size_mib * MiB] + ([1024 * MiB] if args.big else [])
    with tempfile.TemporaryDirectory(prefix="mhd-bench-", dir=args.workdir) as tmp, SshServer() as server:
        work = Path(tmp)
        proxy = TcpProxy(server.host, server.port, latency_s=args.rtt_ms / 2000).start() if args.rtt_ms else None
        try:
            endpoint = Endpoint(proxy.host, proxy.port, server.user) if proxy else server.endpoint
            bench = Bench(server, endpoint, work, args.repeat)
            print(f"sshd on {server.host}:{server.port}, RTT +{args.rtt_ms} ms, {args.repeat} repeats (median)")
            for size in sizes:
                await bench.run_size(size)
            print_table(bench.rows)
            rss = measure_rss(server, endpoint, work, args.rss_mib * MiB) if args.rss_mib else None
        finally:
            if proxy is not None:
                proxy.stop()
    for r in rss or []:
        print(
            f"SshSession {r['direction']} of {r['size_mib']} MiB: RSS idle {r['idle_rss_mib']} MiB, "
            f"peak {r['peak_rss_mib']} MiB, delta {r['delta_mib']} MiB ({r['mib_s']} MiB/s)"
        )
    sshd_v = subprocess.run(["/usr/sbin/sshd", "-V"], capture_output=True, text=True).stderr.strip()
    report = {
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "versions": {"asyncssh": asyncssh.__version__, "sshd": sshd_v},
        "rtt_ms_added": args.rtt_ms,
        "repeat": args.repeat,
        "results": bench.rows,
        "rss": rss,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--big", action="store_true", help="also transfer 1 GiB")
    p.add_argument("--size-mib", type=int, default=256)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--rtt-ms", type=float, default=0.0, help="route through a proxy adding this RTT")
    p.add_argument("--rss-mib", type=int, default=1024, help="size of the RSS download and upload (0 = skip)")
    p.add_argument("--workdir", default=None, help="where the test files go (default: system temp)")
    p.add_argument("--out", type=Path, default=OUT)
    # Child mode for the RSS measurement (internal).
    p.add_argument("--rss-child", action="store_true", help=argparse.SUPPRESS)
    for name in ("host", "user", "key", "pin", "remote", "local", "sha"):
        p.add_argument(f"--{name}", help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    p.add_argument("--size", type=int, help=argparse.SUPPRESS)
    return p.parse_args(argv)


if __name__ == "__main__":
    arguments = parse()
    asyncio.run(rss_child(arguments) if arguments.rss_child else main(arguments))
