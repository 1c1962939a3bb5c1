"""Shared fixtures: a real daemon process with the local provider and a fake trainer."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mhd.devtools.toml_write import write_config
from tests.support.daemon import DaemonProc, base_config, kill_local_jobs


class DaemonEnv:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.memories = tmp / "memories"
        self.state = tmp / "state"
        self.pods = self.state / "pods"
        self.memories.mkdir(parents=True, exist_ok=True)
        self.config = tmp / "config.toml"
        self.procs: list[DaemonProc] = []
        self.configure()

    def configure(self, **overrides: Any) -> Path:
        top, sections = base_config(self.tmp, **overrides)
        return write_config(self.config, top, sections)

    def daemon(self, env: dict[str, str] | None = None, python: str | None = None) -> DaemonProc:
        d = DaemonProc(self.config, self.tmp / "daemon.log", env, python)
        self.procs.append(d)
        return d

    def pod_creations(self) -> int:
        log = self.pods / "pods.log"
        return sum(1 for line in log.read_text().splitlines() if " create " in line) if log.exists() else 0

    def launches(self, run_id: str) -> int:
        f = self.pods / "runs" / f"mhd-{run_id}" / "launches"
        return len(f.read_text().split()) if f.exists() else 0

    def cleanup(self) -> None:
        for d in self.procs:
            if d.proc is not None and d.proc.poll() is None:
                d.proc.kill()
                d.proc.wait(10)
        kill_local_jobs(self.pods)


@pytest.fixture
def denv(tmp_path: Path) -> Iterator[DaemonEnv]:
    env = DaemonEnv(tmp_path)
    try:
        yield env
    finally:
        env.cleanup()


# The tiny offline model (built once per session) for trainer, merge and e2e tests.
from tests.support.tiny import tiny_model_dir  # noqa: E402, F401
