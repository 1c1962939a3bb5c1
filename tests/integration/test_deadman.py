"""The pod-side dead-man timer (mhd/pod/deadman.sh), run for real under /bin/sh.

A fake ``runpodctl`` on PATH records its arguments in a marker file; a real ``sleep`` process
stands in for the trainer. Loop tests use a 1 s interval; ``--once`` tests check one decision.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "mhd" / "pod" / "deadman.sh"
POD_ID = "pod-deadbeef"
SECRET = "rpa_POD_SCOPED_KEY_must_not_be_printed"


class Pod:
    """A fake pod filesystem + environment for one test."""

    def __init__(self, tmp: Path) -> None:
        self.root = tmp / "mhd"
        (self.root / "runs").mkdir(parents=True)
        self.bin = tmp / "bin"
        self.bin.mkdir()
        self.marker = tmp / "stopped"
        self.fake_runpodctl('echo "$@" >> "$MARKER"; echo "stopping with key $RUNPOD_API_KEY"')
        self.env = {
            "PATH": f"{self.bin}{os.pathsep}{os.environ['PATH']}",
            "MHD_ROOT": str(self.root),
            "MHD_DEADMAN_INTERVAL": "1",
            "MHD_MAX_UNATTENDED": "60",
            "RUNPOD_POD_ID": POD_ID,
            "RUNPOD_API_KEY": SECRET,
            "MARKER": str(self.marker),
        }
        self.procs: list[subprocess.Popen[str]] = []  # trainers
        self.loops: list[subprocess.Popen[str]] = []  # deadman.sh, each in its own process group

    def fake_runpodctl(self, body: str) -> None:
        path = self.bin / "runpodctl"
        path.write_text(f"#!/bin/sh\n{body}\n")
        path.chmod(0o755)

    def run_dir(self, name: str = "mhd-run1") -> Path:
        d = self.root / "runs" / name
        d.mkdir(exist_ok=True)
        return d

    def heartbeat(self, age_s: float, run: str = "mhd-run1") -> None:
        hb = self.run_dir(run) / "heartbeat"
        hb.touch()
        t = time.time() - age_s
        os.utime(hb, (t, t))

    def trainer(self, run: str = "mhd-run1") -> subprocess.Popen[str]:
        """A live process with its pid in the run folder, as run.sh leaves it."""
        proc = subprocess.Popen(["sleep", "120"], text=True)
        self.procs.append(proc)
        (self.run_dir(run) / "pid").write_text(f"{proc.pid}\n")
        return proc

    def once(self, **env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["sh", str(SCRIPT), "--once"], env={**self.env, **env}, text=True,
                              capture_output=True, timeout=30)

    def start(self, **env: str) -> subprocess.Popen[str]:
        # Own process group, so the test can end the loop and its `sleep` child together.
        proc = subprocess.Popen(["sh", str(SCRIPT)], env={**self.env, **env}, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
        self.loops.append(proc)
        return proc

    def stopped_within(self, seconds: float) -> bool:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if self.marker.exists():
                return True
            time.sleep(0.1)
        return self.marker.exists()

    def stop_calls(self) -> list[str]:
        return self.marker.read_text().splitlines() if self.marker.exists() else []

    def close(self) -> None:
        for loop in self.loops:
            if loop.poll() is None:
                os.killpg(loop.pid, signal.SIGTERM)
            loop.communicate(timeout=10)
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=10)


@pytest.fixture
def pod(tmp_path: Path) -> Iterator[Pod]:
    p = Pod(tmp_path)
    try:
        yield p
    finally:
        p.close()


def output_of(proc: subprocess.Popen[str], pod: Pod) -> str:
    """End the loop (its process group: sh and its `sleep`) and return what it printed."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
    out, _ = proc.communicate(timeout=10)
    return out


# The loop, both sides ----------------------------------------------------------------------------

def test_stale_heartbeat_and_nothing_training_stops_the_pod(pod: Pod) -> None:
    pod.heartbeat(age_s=120)
    proc = pod.start()
    assert pod.stopped_within(6), output_of(proc, pod)
    assert pod.stop_calls()[0] == f"pod stop {POD_ID}"
    assert "nothing is training" in output_of(proc, pod)


def test_a_fresh_heartbeat_keeps_the_pod_running(pod: Pod) -> None:
    pod.heartbeat(age_s=120, run="mhd-old-run")
    pod.heartbeat(age_s=0)  # the newest heartbeat is what counts
    proc = pod.start()
    assert not pod.stopped_within(3)
    assert "nothing is training" not in output_of(proc, pod)


def test_a_running_trainer_keeps_the_pod_until_it_ends(pod: Pod) -> None:
    pod.heartbeat(age_s=120)
    trainer = pod.trainer()
    proc = pod.start()
    assert not pod.stopped_within(3), "training must never be cut off"
    # The trainer finishes as run.sh does it: exit_code appears, the process is gone.
    (pod.run_dir() / "exit_code").write_text("0\n")
    trainer.kill()
    trainer.wait()
    assert pod.stopped_within(6)
    out = output_of(proc, pod)
    assert "training is running in" in out and "stop requested" in out


# One decision at a time -------------------------------------------------------------------------

def test_a_trainer_that_died_without_exit_code_does_not_hold_the_pod(pod: Pod) -> None:
    pod.heartbeat(age_s=120)
    dead = subprocess.run(["sh", "-c", "echo $$"], capture_output=True, text=True).stdout.strip()
    (pod.run_dir() / "pid").write_text(dead + "\n")
    assert pod.once().returncode == 3 and pod.stop_calls() == [f"pod stop {POD_ID}"]


def test_an_exit_code_beside_a_live_pid_means_finished(pod: Pod) -> None:
    pod.heartbeat(age_s=120)
    pod.trainer()
    (pod.run_dir() / "exit_code").write_text("0\n")
    assert pod.once().returncode == 3


def test_a_pid_file_from_before_the_container_started_is_ignored(pod: Pod) -> None:
    # A resumed pod: the old pid file survived on the volume, and its number is alive again
    # (here: a live process), but it was written before this container started.
    pod.heartbeat(age_s=120)
    pod.trainer()
    old = time.time() - 600
    os.utime(pod.run_dir() / "pid", (old, old))
    started = str(int(time.time()) - 300)
    assert pod.once(MHD_DEADMAN_STARTED_AT=started).returncode == 3
    # The same pid file written after the start does hold the pod.
    os.utime(pod.run_dir() / "pid")
    pod.marker.unlink()
    assert pod.once(MHD_DEADMAN_STARTED_AT=started).returncode == 0 and not pod.marker.exists()


def test_without_any_heartbeat_the_clock_runs_from_the_container_start(pod: Pod) -> None:
    young = pod.once(MHD_DEADMAN_STARTED_AT=str(int(time.time()) - 10))
    assert young.returncode == 0 and not pod.marker.exists()
    old = pod.once(MHD_DEADMAN_STARTED_AT=str(int(time.time()) - 120))
    assert old.returncode == 3 and "no heartbeat yet" in old.stdout


def test_older_runpodctl_syntax_is_tried_when_the_new_one_fails(pod: Pod) -> None:
    pod.fake_runpodctl('[ "$1" = pod ] && exit 2; echo "$@" >> "$MARKER"')
    pod.heartbeat(age_s=120)
    assert pod.once().returncode == 3 and pod.stop_calls() == [f"stop pod {POD_ID}"]


def test_a_failing_stop_is_reported_and_retried_later(pod: Pod) -> None:
    pod.fake_runpodctl("exit 1")
    pod.heartbeat(age_s=120)
    result = pod.once()
    assert result.returncode == 4 and "stop request failed" in result.stdout + result.stderr


def test_the_stop_command_can_be_overridden(pod: Pod) -> None:
    pod.heartbeat(age_s=120)
    assert pod.once(MHD_DEADMAN_STOP_CMD='echo custom "$RUNPOD_POD_ID" >> "$MARKER"').returncode == 3
    assert pod.stop_calls() == [f"custom {POD_ID}"]


def test_a_bad_limit_falls_back_to_the_default_instead_of_disabling_the_guard(pod: Pod) -> None:
    pod.heartbeat(age_s=3600)  # stale for 60 s, fresh for the 7200 s default
    result = pod.once(MHD_MAX_UNATTENDED="two hours")
    assert result.returncode == 0 and "ignoring 'two hours'" in result.stderr
    pod.heartbeat(age_s=7300)
    assert pod.once(MHD_MAX_UNATTENDED="7200.0").returncode == 3  # config floats are accepted


def test_the_pod_scoped_api_key_is_never_printed(pod: Pod) -> None:
    pod.heartbeat(age_s=120)
    proc = pod.start()
    assert pod.stopped_within(6)
    once = pod.once()
    out = output_of(proc, pod) + once.stdout + once.stderr
    assert POD_ID in out and SECRET not in out


# Static checks ------------------------------------------------------------------------------------

def test_the_script_is_plain_posix_sh() -> None:
    assert subprocess.run(["sh", "-n", str(SCRIPT)], capture_output=True).returncode == 0
    if shutil.which("dash"):
        assert subprocess.run(["dash", "-n", str(SCRIPT)], capture_output=True).returncode == 0
    if not shutil.which("shellcheck"):
        pytest.skip("shellcheck not installed (apt-get install -y shellcheck)")
    result = subprocess.run(["shellcheck", "-s", "sh", str(SCRIPT)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout
