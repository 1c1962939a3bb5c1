"""Run the real daemon as a subprocess, the way systemd would, and poke it from tests."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from mhd.daemon.client import DaemonNotRunning, request
from tests.support.polling import wait_until

REPO = Path(__file__).resolve().parents[2]
FAKE_TRAINER = REPO / "tests" / "jobs" / "fake_trainer.py"


def base_config(tmp: Path, **overrides: Any) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    top: dict[str, Any] = {
        "memory_dir": str(tmp / "memories"),
        "state_dir": str(tmp / "state"),
        "threshold": 5,
        "debounce_s": 0.3,
        "poll_interval_s": 0.3,
        "provider": "local",
        "log_level": "DEBUG",
    }
    sections: dict[str, dict[str, Any]] = {
        "training": {"script": str(FAKE_TRAINER), "python": sys.executable,
                     "extra": {"fake_steps": 10, "fake_step_s": 0.15}},
        "retry": {"base_s": 0.2, "max_s": 2.0},
        "web": {"enabled": False},
        "merge": {"mode": "none"},
        "dataset": {"min_chars": 5},
        # The fake trainer has no Evaluating phase; the gate's own tests run the real trainer.
        "eval": {"enabled": False},
    }
    for k, v in overrides.items():
        if isinstance(v, dict):
            sections.setdefault(k, {}).update(v)
        else:
            top[k] = v
    return top, sections


_counter = iter(range(1, 10**9))


def write_memory(root: Path, content: str, *, when: datetime | None = None, mtype: str = "observation",
                 name: str | None = None, **fields: Any) -> Path:
    """One episodic memory in the MetaHuman OS layout (YYYY/MM/DD/evt-…-slug.json)."""
    when = when or datetime(2026, 7, 18, 22, 30, tzinfo=UTC) + timedelta(minutes=next(_counter))
    evt = "evt-" + when.strftime("%Y%m%d%H%M%S") + "0"
    slug = "".join(c if c.isalnum() else "-" for c in content.lower())[:50].strip("-") or "event"
    folder = root / when.strftime("%Y/%m/%d")
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / (name or f"{evt}-{slug}.json")
    body = {"id": evt, "timestamp": when.isoformat().replace("+00:00", "Z"), "content": content,
            "type": mtype, "entities": [], "tags": ["test"], "importance": 0.5, **fields}
    path.write_text(json.dumps(body, indent=2))
    return path


def write_memories(root: Path, n: int, prefix: str = "memory") -> list[Path]:
    return [write_memory(root, f"{prefix} number {i}: today I walked by the river and thought about work")
            for i in range(n)]


class DaemonProc:
    def __init__(self, config: Path, log: Path, env: dict[str, str] | None = None,
                 python: str | None = None) -> None:
        self.config = config
        self.log = log
        self.env = env or {}
        self.python = python or sys.executable  # another venv's interpreter: a daemon installed differently
        self.proc: subprocess.Popen[bytes] | None = None
        self.socket = self._socket_path()

    def _socket_path(self) -> Path:
        from mhd.config import load_config

        return load_config(self.config, {}).socket_path

    def start(self, env: dict[str, str] | None = None, wait: bool = True) -> DaemonProc:
        # The test runner's own NOTIFY_SOCKET (if any) is not the daemon's to use.
        inherited = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC")}
        full_env = {**inherited, **self.env, **(env or {})}
        with self.log.open("ab") as logf:
            self.proc = subprocess.Popen(
                [self.python, "-m", "mhd.cli", "--config", str(self.config), "daemon"],
                stdout=logf, stderr=subprocess.STDOUT, env=full_env, cwd=str(REPO),
            )
        if wait:
            self.wait_ready()
        return self

    def wait_ready(self, timeout: float = 30) -> None:
        self.wait_for(lambda: self.ping(), timeout, "daemon ready")

    def ping(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"daemon exited with {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
        try:
            return bool(request(self.socket, "ping", timeout=2).get("ok"))
        except (DaemonNotRunning, OSError):
            return False

    def ask(self, cmd: str) -> dict[str, Any]:
        return request(self.socket, cmd, timeout=10)

    def status(self) -> dict[str, Any]:
        resp = self.ask("status")
        assert resp["ok"], resp
        st: dict[str, Any] = resp["status"]
        return st

    def wait_for(self, pred: Callable[[], Any], timeout: float = 60, what: str = "condition",
                 interval: float = 0.05) -> Any:
        def explain() -> str:
            # transitions' own DEBUG lines say nothing the "A → B (reason)" lines do not
            lines = [ln for ln in self.log.read_text(errors="replace").splitlines() if "transitions.core" not in ln]
            tail = "\n".join(lines)[-3000:]
            return f"daemon log tail:\n{tail}\n--- what each task waits on (SIGUSR1) ---\n{self.dump()}"

        return wait_until(pred, timeout, what, interval=interval, on_timeout=explain)

    def dump(self, timeout: float = 5.0) -> str:
        """Have the daemon log what each of its tasks and threads waits on (SIGUSR1); that dump."""
        if self.proc is None or self.proc.poll() is not None:
            return "(daemon not running)"
        start = len(self.log.read_bytes())

        def since() -> str:
            return self.log.read_bytes()[start:].decode(errors="replace")

        self.proc.send_signal(signal.SIGUSR1)
        try:
            wait_until(lambda: "SIGUSR1 dump" in (t := since()) and " thread(s)" in t, timeout, "the dump")
        except AssertionError:
            return f"(no dump within {timeout:.0f}s)"
        time.sleep(0.2)  # the rest of the record
        return since()[-12000:]

    def wait_state(self, state: str, timeout: float = 60) -> dict[str, Any]:
        st: dict[str, Any] = self.wait_for(lambda: (s := self.status())["state"] == state and s,
                                           timeout, f"state {state}")
        return st

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(5)


def kill_local_jobs(pods_root: Path) -> None:
    """End trainer process groups our tests started (found by their pid files), nothing else."""
    for pid_file in pods_root.glob("runs/*/pid"):
        try:
            pgid = int(pid_file.read_text().strip())
            os.killpg(pgid, signal.SIGKILL)
        except (OSError, ValueError):
            pass


def alive_job_groups(pods_root: Path) -> list[int]:
    alive = []
    for pid_file in pods_root.glob("runs/*/pid"):
        try:
            pgid = int(pid_file.read_text().strip())
            os.killpg(pgid, 0)
            alive.append(pgid)
        except (OSError, ValueError):
            pass
    return alive


def no_jobs_left(denv: Any, timeout: float = 10) -> None:
    """The launcher exits a moment after writing exit_code: allow it that moment, no more."""
    deadline = time.monotonic() + timeout
    while alive := alive_job_groups(denv.pods):
        if time.monotonic() > deadline:
            raise AssertionError(f"job process groups still alive: {alive}")
        time.sleep(0.1)
