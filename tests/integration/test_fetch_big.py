"""Fetching a multi-GB merged model: the real Fetching state over SSH (real sshd, a proxy that cuts
the link), in-process with the bring-your-own-host provider, so memory can be measured.

The "pod" is this machine: the run folder is written under a temp remote_root, as the trainer
would leave it (manifest.json listing the adapter and a 1 GiB model.gguf).
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pytest

from mhd.config import Config
from mhd.daemon.providers import build_connector
from mhd.hashing import sha256_file
from mhd.remote.sshhost import SshHostProvider
from mhd.states import fetching
from mhd.states.context import RunContext
from mhd.states.model import Outcome, RunState
from mhd.states.runner import Runner
from mhd.store import Run, Store
from mhd.views import run_dict
from tests.support.files import random_file
from tests.support.sshd import SshServer
from tests.support.tcpproxy import TcpProxy

pytestmark = pytest.mark.slow
MiB = 1 << 20
GiB = 1 << 30


@dataclass
class Pod:
    """A finished job's run folder on the 'pod', and the local side of the run."""

    ctx: RunContext
    store: Store
    run: Run
    remote: Path
    files: dict[str, str]  # manifest path → sha256

    @property
    def out(self) -> Path:
        return self.ctx.run_dir(self.run) / "output"

    def fresh(self) -> Run:
        run = self.store.get_run(self.run.id)
        assert run is not None
        return run

    def drive(self) -> Run:
        return asyncio.run(Runner(self.ctx).drive(self.run))


def finished_job(tmp: Path, sshd: SshServer, proxy: TcpProxy, gguf_bytes: int, **cfg: Any) -> Pod:
    config = Config.model_validate({
        "state_dir": str(tmp / "state"), "provider": "ssh", "merge": {"mode": "none"},
        "heartbeat_interval_s": 0.5,
        "ssh": {"host": proxy.host, "port": proxy.port, "user": sshd.user, "key_file": str(sshd.client_key_path),
                "known_hosts": str(sshd.known_hosts_path), "remote_root": str(tmp / "remote"),
                "connect_deadline_s": 30},
        "retry": {"base_s": 0.05, "max_s": 0.2},
        "eval": {"enabled": False},  # a hand-made pod output without an Evaluating phase
        **cfg,
    })
    store = Store(config.db_path_url)
    run = store.create_run("test", "ssh")
    name = f"mhd-{run.id}"
    remote = tmp / "remote" / "runs" / name
    (remote / "adapter").mkdir(parents=True)
    files = {"adapter/adapter_model.safetensors": random_file(remote / "adapter" / "adapter_model.safetensors", MiB),
             "model.gguf": random_file(remote / "model.gguf", gguf_bytes)}
    manifest = {"files": [{"path": p, "size": (remote / p).stat().st_size, "sha256": s} for p, s in files.items()],
                "steps": 10, "export": {"enabled": True, "file": "model.gguf", "sha256": files["model.gguf"]}}
    (remote / "manifest.json").write_text(json.dumps(manifest))
    ctx = RunContext(cfg=config, store=store, provider=SshHostProvider(config.ssh), connector=build_connector(config),
                     remote_root=config.ssh.remote_root, log=logging.getLogger("test.fetch"))
    (ctx.run_dir(run) / "input").mkdir(parents=True)
    (ctx.run_dir(run) / "input" / "dataset_manifest.json").write_text(json.dumps({"memory_keys": []}))
    # The job finished: the run is in Fetching, and this daemon has no session yet (as after a restart).
    store.record_pod(name, run.id, "ssh", name)
    run = store.update_run(run.id, state=RunState.FETCHING, pod_id=name, pod_name=name, remote_dir=str(remote),
                           pod_started_at=time.time())
    return Pod(ctx, store, run, remote, files)


class PeakRss:
    def __init__(self) -> None:
        self.me = psutil.Process()
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.me.memory_info().rss)
            time.sleep(0.005)

    def __enter__(self) -> PeakRss:
        gc.collect()
        self.baseline = self.peak = self.me.memory_info().rss
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def cut_twice(proxy: TcpProxy, every: int) -> threading.Thread:
    """Drop the link after ``every`` bytes of download, then again ``every`` bytes after reconnecting."""
    def arm() -> None:
        proxy.cut_after(every)
        deadline = time.monotonic() + 120
        while proxy.cuts < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        proxy.cut_after(every)

    t = threading.Thread(target=arm, daemon=True)
    t.start()
    return t


def test_a_1_gib_model_fetch_cut_twice_resumes_verifies_and_keeps_memory_flat(
        tmp_path: Path, sshd: SshServer, proxy: TcpProxy) -> None:
    t0 = time.monotonic()
    pod = finished_job(tmp_path, sshd, proxy, GiB)
    made_s = time.monotonic() - t0
    asyncio.run(_warm_up(pod))  # asyncssh, crypto and SQLite set-up are not what is measured
    cutter = cut_twice(proxy, 300 * MiB)

    t0 = time.monotonic()
    with PeakRss() as rss:
        final = pod.drive()
    took = time.monotonic() - t0
    cutter.join(1)

    growth = rss.peak - rss.baseline
    print(f"1 GiB fetch: {took:.1f} s ({made_s:.1f} s to write it), {proxy.cuts} cuts, "
          f"{proxy.bytes_down / GiB:.2f} GiB down, RSS growth {growth / MiB:.1f} MiB")
    assert final.state is RunState.IDLE and final.outcome is Outcome.SUCCEEDED, final.error
    assert proxy.cuts == 2
    assert sha256_file(pod.out / "model.gguf") == pod.files["model.gguf"]
    assert not list(pod.out.rglob("*.part"))
    assert json.loads((pod.out / "manifest.json").read_text())["export"]["file"] == "model.gguf"
    assert proxy.bytes_down < 1.3 * GiB, "each attempt resumed from the .part, none started over"
    lost = [j for j in pod.store.journal(pod.run.id) if j.from_state is RunState.FETCHING
            and j.to_state is RunState.CONNECTING]
    assert len(lost) >= 2
    assert growth < 50 * MiB, f"RSS grew by {growth / MiB:.1f} MiB while fetching 1 GiB"
    assert final.fetch_s > 0 and final.pod_stopped_at is not None  # terminated only after verification
    final.cost_per_hr = 1.8  # a BYO host costs nothing; what a RunPod pod would show
    shown = run_dict(final)
    assert shown["fetch_cost_usd"] == round(1.8 * final.fetch_s / 3600, 4)
    assert 0 < shown["fetch_cost_usd"] <= shown["cost_usd"]
    assert (pod.remote / "heartbeat").exists()  # the fetch kept the pod's dead-man timer fed


async def _warm_up(pod: Pod) -> None:
    session, _ = await pod.ctx.connector(pod.fresh(), await pod.ctx.provider.endpoint(  # type: ignore[arg-type]
        await pod.ctx.provider.get(pod.run.pod_id or "")))
    await session.run("true")
    await session.close()


async def _until(cond: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.05)


def test_not_enough_disk_keeps_the_pod_says_why_and_resumes_once_space_is_freed(
        tmp_path: Path, sshd: SshServer, proxy: TcpProxy, monkeypatch: pytest.MonkeyPatch) -> None:
    from mhd.doctor import _fetch_disk

    pod = finished_job(tmp_path, sshd, proxy, 64 * MiB)
    space = {"free": 10 * MiB}
    monkeypatch.setattr(fetching, "free_bytes", lambda path: space["free"])
    seen: dict[str, Any] = {}

    async def scenario() -> Run:
        task = asyncio.create_task(Runner(pod.ctx).drive(pod.run))
        await _until(lambda: (pod.fresh().error or "").startswith("not enough disk space"))
        await asyncio.sleep(0.3)  # it waits; nothing else happens
        seen["run"], seen["doctor"] = pod.fresh(), _fetch_disk(pod.ctx.cfg)
        seen["terminated"] = [p.terminated_at for p in pod.store.pods()]
        seen["fetched"] = sorted(p.name for p in pod.out.rglob("*")) if pod.out.exists() else []
        space["free"] = 100 * GiB  # the owner frees space
        pod.ctx.wake.set()
        return await asyncio.wait_for(task, 60)

    final = asyncio.run(scenario())

    waiting, doctor = seen["run"], seen["doctor"]
    assert waiting.state is RunState.FETCHING
    assert waiting.pod_stopped_at is None and seen["terminated"] == [None]  # the pod is kept
    assert "+ 1.1 GB margin, 0.0 GB free" in waiting.error
    assert "0.1 GB still to download" in waiting.error and "The pod" in waiting.error
    assert "is kept" in waiting.error and "runpod.max_unattended" in waiting.error
    assert seen["fetched"] == []  # not a byte written before there is room for all of it
    assert doctor.ok is False and f"run {pod.run.id} is fetching 0.1 GB" in doctor.detail
    assert "the fetch resumes by itself" in doctor.fix

    assert final.state is RunState.IDLE and final.outcome is Outcome.SUCCEEDED, final.error
    assert final.error is None
    assert sha256_file(pod.out / "model.gguf") == pod.files["model.gguf"]
    log = (pod.ctx.run_dir(pod.run) / "run.log").read_text()
    assert "not enough disk space" in log and "disk space freed" in log
    assert [e.detail.split(":")[0] for e in pod.store.events(pod.run.id, kind="disk")] == ["waiting", "resumed"]


def test_disk_never_freed_gives_up_after_max_unattended(
        tmp_path: Path, sshd: SshServer, proxy: TcpProxy, monkeypatch: pytest.MonkeyPatch) -> None:
    pod = finished_job(tmp_path, sshd, proxy, 4 * MiB, runpod={"max_unattended": 1.5})
    monkeypatch.setattr(fetching, "free_bytes", lambda path: 0)
    monkeypatch.setattr(fetching, "DISK_RECHECK_S", 0.2)

    final = pod.drive()

    assert final.state is RunState.IDLE and final.outcome is Outcome.FAILED
    assert "not enough disk space" in (final.error or "") and "stopped itself" in (final.error or "")
    assert not (pod.out / "model.gguf").exists()
