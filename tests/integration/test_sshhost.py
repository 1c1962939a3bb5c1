"""The bring-your-own-host provider against a real sshd: no provisioning, terminate ends the job.

The GPU host is this machine, so the test can start a detached job the way ``job.py`` does (its
process-group leader writes ``pid`` into the run dir) and check from outside what terminate did.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from mhd.config import SshConfig
from mhd.errors import ConfigError, ProviderError, TransientProviderError
from mhd.remote.provider import Endpoint, Provider, pod_name
from mhd.remote.sshhost import SshHostProvider
from tests.support.sshd import SshServer, free_port


@pytest.fixture
def cfg(sshd: SshServer, tmp_path: Path) -> SshConfig:
    return SshConfig(
        host=sshd.host,
        port=sshd.port,
        user=sshd.user,
        key_file=sshd.client_key_path,
        known_hosts=sshd.known_hosts_path,
        remote_root=str(tmp_path / "remote"),
    )


class Jobs:
    """Detached jobs this test started; whatever is left is killed at teardown."""

    def __init__(self) -> None:
        self.groups: list[int] = []

    def start(self, run_dir: Path, body: str) -> int:
        """Start ``body`` under setsid like the trainer launcher; its leader writes ``pid``."""
        run_dir.mkdir(parents=True, exist_ok=True)
        script = f"echo $$ > {run_dir}/pid.tmp && mv {run_dir}/pid.tmp {run_dir}/pid; {body}"
        subprocess.run(["sh", "-c", f"setsid sh -c '{script}' > {run_dir}/train.log 2>&1 < /dev/null &"], check=True)
        deadline = time.monotonic() + 10
        while not (run_dir / "pid").exists():
            assert time.monotonic() < deadline, "job did not start"
            time.sleep(0.05)
        pgid = int((run_dir / "pid").read_text())
        self.groups.append(pgid)
        return pgid

    def cleanup(self) -> None:
        for pgid in self.groups:
            try:
                os.killpg(pgid, signal.SIGKILL)
            except ProcessLookupError:
                pass


@pytest.fixture
def jobs() -> Iterator[Jobs]:
    j = Jobs()
    try:
        yield j
    finally:
        j.cleanup()


def group_alive(pgid: int) -> bool:
    """Any non-zombie member left in the group (PID 1 here does not reap orphans)."""
    for proc in psutil.process_iter(["status"]):
        try:
            if os.getpgid(proc.pid) == pgid and proc.info["status"] != psutil.STATUS_ZOMBIE:
                return True
        except (ProcessLookupError, psutil.Error):
            continue
    return False


def test_a_byo_host_is_always_there_and_owns_nothing(cfg: SshConfig, sshd: SshServer) -> None:
    provider = SshHostProvider(cfg)
    name = pod_name("r1")

    async def scenario() -> None:
        assert isinstance(provider, Provider)
        pod = await provider.create(name)
        assert (pod.id, pod.name, pod.status, pod.gone) == (name, name, "RUNNING", False)
        assert await provider.find(name) == pod
        assert await provider.get(name) == pod
        assert await provider.endpoint(pod) == Endpoint(sshd.host, sshd.port, sshd.user)
        assert await provider.list_owned() == []
        await provider.aclose()

    asyncio.run(scenario())
    assert not Path(cfg.remote_root).exists(), "create records nothing on the host"


def test_terminate_ends_the_whole_process_group_and_is_idempotent(cfg: SshConfig, jobs: Jobs) -> None:
    run_dir = Path(cfg.remote_root) / "runs" / "mhd-r2"
    pgid = jobs.start(run_dir, "sleep 300 & sleep 300; wait")
    assert group_alive(pgid)
    provider = SshHostProvider(cfg, grace_s=5)

    asyncio.run(provider.terminate("mhd-r2"))
    assert provider.last_terminate == "terminated"
    assert not group_alive(pgid), "leader and child are both gone"

    asyncio.run(provider.terminate("mhd-r2"))
    assert provider.last_terminate == "gone"


def test_a_job_that_ignores_sigterm_is_killed_after_the_grace_period(cfg: SshConfig, jobs: Jobs) -> None:
    run_dir = Path(cfg.remote_root) / "runs" / "mhd-r3"
    pgid = jobs.start(run_dir, 'trap "" TERM; while :; do sleep 0.1; done')
    provider = SshHostProvider(cfg, grace_s=1)
    started = time.monotonic()
    asyncio.run(provider.terminate("mhd-r3"))
    assert provider.last_terminate == "killed"
    assert time.monotonic() - started >= 1
    assert not group_alive(pgid)


def test_terminate_without_a_job_or_after_it_finished_is_success(cfg: SshConfig, jobs: Jobs) -> None:
    provider = SshHostProvider(cfg)
    asyncio.run(provider.terminate("mhd-never-launched"))
    assert provider.last_terminate == "no-job"

    run_dir = Path(cfg.remote_root) / "runs" / "mhd-r4"
    pgid = jobs.start(run_dir, "sleep 300")
    (run_dir / "exit_code").write_text("0\n")  # the trainer is done; this group is not ours to kill
    asyncio.run(provider.terminate("mhd-r4"))
    assert provider.last_terminate == "finished"
    assert group_alive(pgid)


def test_a_reused_pid_is_never_signalled(cfg: SshConfig, jobs: Jobs) -> None:
    run_dir = Path(cfg.remote_root) / "runs" / "mhd-r5"
    pgid = jobs.start(run_dir, "sleep 300")
    hour_ago = time.time() - 3600
    os.utime(run_dir / "pid", (hour_ago, hour_ago))  # pid written long before this process began
    provider = SshHostProvider(cfg)
    asyncio.run(provider.terminate("mhd-r5"))
    assert provider.last_terminate == "reused"
    assert group_alive(pgid)


def test_garbage_in_the_pid_file_signals_nothing(cfg: SshConfig) -> None:
    run_dir = Path(cfg.remote_root) / "runs" / "mhd-r6"
    run_dir.mkdir(parents=True)
    for junk in ["", "-1", "1", "12 34", "$(reboot)"]:
        (run_dir / "pid").write_text(junk)
        provider = SshHostProvider(cfg)
        asyncio.run(provider.terminate("mhd-r6"))
        assert provider.last_terminate == "bad-pid", junk


def test_unreachable_host_is_a_transient_provider_error(cfg: SshConfig) -> None:
    down = cfg.model_copy(update={"port": free_port()})
    provider = SshHostProvider(down, connect_deadline_s=1.0)
    with pytest.raises(TransientProviderError, match="mhd-r7"):
        asyncio.run(provider.terminate("mhd-r7"))


def test_unsafe_pod_ids_and_missing_key_are_refused(cfg: SshConfig) -> None:
    provider = SshHostProvider(cfg)
    for bad in ["../etc", "a/b", "", ".hidden", "x y"]:
        with pytest.raises(ProviderError):
            asyncio.run(provider.terminate(bad))
    no_key = SshHostProvider(cfg.model_copy(update={"key_file": None}))
    with pytest.raises(ConfigError, match="key_file"):
        asyncio.run(no_key.terminate("mhd-r8"))
