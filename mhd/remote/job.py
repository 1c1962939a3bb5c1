"""The detached remote job: launch once, reattach forever.

The remote run folder is the whole protocol (DESIGN.md): ``pid``, ``launches``,
``progress.jsonl``, ``train.log``, ``exit_code`` (atomic), ``checkpoints/``, ``adapter/`` and
``manifest.json``. The launcher (``mhd/pod/run.sh``) runs under ``setsid nohup`` so it never
belongs to an SSH session; a drop or a daemon restart only costs a reconnect.
"""

from __future__ import annotations

import json
import logging
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mhd.errors import RemoteError
from mhd.remote.session import Session

log = logging.getLogger(__name__)

LAUNCHER = "run.sh"
POD_FILES_DIR = Path(__file__).resolve().parent.parent / "pod"


@dataclass(frozen=True)
class JobStatus:
    exit_code: int | None = None
    pid: int | None = None

    @property
    def finished(self) -> bool:
        return self.exit_code is not None

    @property
    def running(self) -> bool:
        return self.exit_code is None and self.pid is not None

    @property
    def killed_by_signal(self) -> bool:
        # sh reports 128+N for a child ended by signal N (137 = SIGKILL, e.g. the OOM killer).
        return self.exit_code is not None and self.exit_code > 128


class RemoteJob:
    def __init__(self, session: Session, run_dir: str) -> None:
        self.session = session
        self.run_dir = run_dir.rstrip("/")
        self._q = shlex.quote(self.run_dir)

    def path(self, name: str) -> str:
        return f"{self.run_dir}/{name}"

    async def status(self, *, heartbeat: bool = True) -> JobStatus:
        """One round trip: refresh the heartbeat (dead-man timer) and report the job's state."""
        d = self._q
        touch = f"touch {d}/heartbeat 2>/dev/null; " if heartbeat else ""
        script = (
            f"{touch}"
            f"if [ -s {d}/exit_code ]; then printf '{{\"exit_code\": %s}}\\n' \"$(cat {d}/exit_code)\"; "
            f"elif [ -s {d}/pid ] && p=$(cat {d}/pid) && kill -0 \"$p\" 2>/dev/null; then "
            f"printf '{{\"pid\": %s}}\\n' \"$p\"; "
            f"else echo '{{}}'; fi"
        )
        res = await self.session.run(script, timeout=60)
        if res.exit_status != 0:
            raise RemoteError(f"job status in {self.run_dir} failed ({res.exit_status}): {res.stderr.strip()}")
        try:
            data = json.loads(res.stdout.strip().splitlines()[-1])
        except (ValueError, IndexError) as exc:
            raise RemoteError(f"job status in {self.run_dir}: unreadable answer {res.stdout!r}") from exc
        return JobStatus(exit_code=data.get("exit_code"), pid=data.get("pid"))

    async def launch(self) -> None:
        """Start the launcher detached. Safe to repeat: the launcher's lock refuses a twin."""
        d = self._q
        # Its own command, no `cd … &&` in front: a backgrounded `&&` list would keep the SSH
        # channel open and hang the call.
        cmd = f"setsid nohup sh {d}/{LAUNCHER} >> {d}/train.log 2>&1 < /dev/null &"
        res = await self.session.run(cmd, timeout=60)
        if res.exit_status != 0:
            raise RemoteError(f"could not launch the job in {self.run_dir}: {res.stderr.strip()}")

    async def wait_started(self, timeout_s: float = 20.0, interval_s: float = 0.2) -> JobStatus:
        import asyncio

        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while True:
            st = await self.status()
            if st.running or st.finished or loop.time() > deadline:
                return st
            await asyncio.sleep(interval_s)

    async def read_progress(self, offset: int) -> tuple[list[dict[str, Any]], int]:
        """New complete lines of progress.jsonl from byte ``offset`` (never re-reads the file)."""
        lines: list[dict[str, Any]] = []
        while True:
            chunk = await self.session.read_from(self.path("progress.jsonl"), offset)
            if not chunk:
                return lines, offset
            end = chunk.rfind(b"\n")
            if end < 0:
                return lines, offset  # a line still being written
            for raw in chunk[: end + 1].splitlines():
                if not raw.strip():
                    continue
                try:
                    obj = json.loads(raw)
                except ValueError:
                    log.warning("progress.jsonl: skipping an unreadable line at ~%d bytes", offset)
                    continue
                if isinstance(obj, dict):
                    lines.append(obj)
            offset += end + 1
            if len(chunk) < (1 << 20):
                return lines, offset

    async def pull_log(self, local: Path) -> None:
        """Append train.log's new bytes to a local copy; the local size is the offset."""
        local.parent.mkdir(parents=True, exist_ok=True)
        offset = local.stat().st_size if local.exists() else 0
        data = await self.session.read_from(self.path("train.log"), offset)
        if data:
            with local.open("ab") as f:
                f.write(data)

    async def log_tail(self, n: int = 20) -> str:
        res = await self.session.run(f"tail -n {int(n)} {self._q}/train.log 2>/dev/null", timeout=30)
        return res.stdout

    async def read_json(self, name: str) -> dict[str, Any] | None:
        data = await self.session.read_from(self.path(name), 0, 16 << 20)
        if not data:
            return None
        try:
            obj = json.loads(data)
        except ValueError as exc:
            raise RemoteError(f"{self.path(name)} is not valid JSON: {exc}") from exc
        return obj if isinstance(obj, dict) else None

    async def cancel(self, grace_s: float = 10.0) -> None:
        """SIGTERM the job's process group, then SIGKILL after ``grace_s``."""
        d = self._q
        script = (
            f"[ -s {d}/pid ] || exit 0; p=$(cat {d}/pid); [ -s {d}/exit_code ] && exit 0; "
            f"kill -TERM -- -\"$p\" 2>/dev/null || exit 0; "
            f"i=0; while kill -0 -- -\"$p\" 2>/dev/null && [ $i -lt {int(grace_s * 10)} ]; do "
            f"sleep 0.1; i=$((i+1)); done; kill -KILL -- -\"$p\" 2>/dev/null; exit 0"
        )
        await self.session.run(script, timeout=grace_s + 30)
