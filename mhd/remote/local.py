"""The ``local`` provider: this machine plays the pod (demo, core tests, no cloud account).

A "pod" is a small JSON record under ``<root>/pods/``; its run folder is
``<root>/runs/<pod name>``, the same layout a real pod has under its remote root. Every real
creation is appended to ``<root>/pods.log`` so tests can count creations from outside the daemon.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import time
from pathlib import Path

from mhd.errors import IntegrityError, RemoteError
from mhd.hashing import sha256_file
from mhd.remote.provider import POD_PREFIX, Endpoint, Pod
from mhd.remote.session import CommandResult

CHUNK = 1 << 20


class LocalProvider:
    name = "local"

    def __init__(self, root: Path) -> None:
        self.root = root
        self.pods_dir = root / "pods"
        self.pods_dir.mkdir(parents=True, exist_ok=True)

    def _record(self, name: str) -> Path:
        return self.pods_dir / f"{name}.json"

    def _load(self, name: str) -> Pod | None:
        try:
            data = json.loads(self._record(name).read_text())
        except (OSError, ValueError):
            return None
        return Pod(id=data["id"], name=data["name"], status=data["status"], cost_per_hr=0.0, gpu_type="cpu")

    def _save(self, pod: Pod) -> None:
        tmp = self._record(pod.name).with_suffix(".tmp")
        tmp.write_text(json.dumps({"id": pod.id, "name": pod.name, "status": pod.status, "at": time.time()}))
        os.replace(tmp, self._record(pod.name))

    async def create(self, name: str, *, interruptible: bool = False) -> Pod:
        pod = Pod(id=name, name=name, status="RUNNING", cost_per_hr=0.0, gpu_type="cpu")
        (self.root / "runs" / name).mkdir(parents=True, exist_ok=True)
        self._save(pod)
        with (self.root / "pods.log").open("a") as f:
            f.write(f"{time.time():.3f} create {name}\n")
        return pod

    async def find(self, name: str) -> Pod | None:
        pod = self._load(name)
        return pod if pod is not None and not pod.gone else None

    async def get(self, pod_id: str) -> Pod | None:
        return self._load(pod_id)

    async def endpoint(self, pod: Pod) -> Endpoint | None:
        return Endpoint(host="localhost", port=0, user=os.environ.get("USER", "local"))

    async def terminate(self, pod_id: str) -> None:
        pod = self._load(pod_id)
        kill_job_group(self.root / "runs" / pod_id)
        if pod is not None and not pod.gone:
            self._save(Pod(id=pod.id, name=pod.name, status="TERMINATED"))
            with (self.root / "pods.log").open("a") as f:
                f.write(f"{time.time():.3f} terminate {pod_id}\n")

    async def list_owned(self) -> list[Pod]:
        pods = [self._load(p.stem) for p in sorted(self.pods_dir.glob(f"{POD_PREFIX}*.json"))]
        return [p for p in pods if p is not None and not p.gone]

    async def aclose(self) -> None:
        return None

    def remote_root(self) -> str:
        return str(self.root)


def kill_job_group(run_dir: Path, grace_s: float = 5.0) -> bool:
    """End a detached job's whole process group (the launcher is the group leader)."""
    try:
        pgid = int((run_dir / "pid").read_text().strip())
    except (OSError, ValueError):
        return False
    if (run_dir / "exit_code").exists():
        return False
    try:
        os.killpg(pgid, signal.SIGTERM)
    except ProcessLookupError:
        return False
    except PermissionError as exc:
        raise RemoteError(f"cannot signal job group {pgid} in {run_dir}: {exc}") from exc
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.1)
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    return True


class LocalSession:
    """The Session protocol on this machine's filesystem and shell."""

    async def run(self, command: str, *, input: str | None = None, timeout: float = 120.0) -> CommandResult:
        proc = await asyncio.create_subprocess_exec(
            "/bin/sh", "-c", command,
            stdin=asyncio.subprocess.PIPE if input is not None else asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )
        try:
            out, err = await asyncio.wait_for(proc.communicate(input.encode() if input else None), timeout)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise RemoteError(f"local command timed out after {timeout}s: {command[:80]}") from None
        return CommandResult(proc.returncode or 0, out.decode(errors="replace"), err.decode(errors="replace"))

    async def upload(self, local: Path, remote: str, sha256: str) -> bool:
        return await asyncio.to_thread(self._upload, local, Path(remote), sha256)

    @staticmethod
    def _upload(local: Path, remote: Path, sha256: str) -> bool:
        if remote.exists() and sha256_file(remote) == sha256:
            return False
        remote.parent.mkdir(parents=True, exist_ok=True)
        tmp = remote.with_name(remote.name + f".tmp-{os.getpid()}")
        shutil.copyfile(local, tmp)
        if sha256_file(tmp) != sha256:
            tmp.unlink(missing_ok=True)
            raise IntegrityError(f"upload of {local} to {remote}: sha256 differs after copy; retry")
        os.replace(tmp, remote)
        return True

    async def download(self, remote: str, local: Path, sha256: str, size: int | None = None) -> int:
        return await asyncio.to_thread(self._download, Path(remote), local, sha256)

    @staticmethod
    def _download(remote: Path, local: Path, sha256: str) -> int:
        if local.exists() and sha256_file(local) == sha256:
            return 0
        local.parent.mkdir(parents=True, exist_ok=True)
        part = local.with_name(local.name + ".part")
        start = part.stat().st_size if part.exists() else 0
        sent = 0
        with remote.open("rb") as src, part.open("ab") as dst:
            src.seek(start)
            while block := src.read(CHUNK):
                dst.write(block)
                sent += len(block)
        if sha256_file(part) != sha256:
            part.unlink(missing_ok=True)
            raise IntegrityError(f"download of {remote}: sha256 does not match the manifest; will refetch")
        os.replace(part, local)
        return sent

    async def read_from(self, remote: str, offset: int, limit: int = 1 << 20) -> bytes:
        try:
            with open(remote, "rb") as f:
                f.seek(offset)
                return f.read(limit)
        except FileNotFoundError:
            return b""

    async def write_file(self, remote: str, data: bytes, mode: int = 0o644) -> None:
        path = Path(remote)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, mode)
        os.replace(tmp, path)

    async def realpath(self, path: str) -> str:
        return os.path.realpath(path)  # non-strict: a missing tail is kept, like `realpath -m`

    async def close(self) -> None:
        return None
