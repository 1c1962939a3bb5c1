"""Fetching: download what the manifest lists (resumable, sha256-verified); only then terminate.

If everything is already here and verified (e.g. the daemon died after the last byte), no
connection is needed at all: the pod is terminated and the run moves on.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from mhd.errors import IntegrityError, JobFailed
from mhd.remote.job import RemoteJob
from mhd.states.context import RunContext, sha256_path
from mhd.states.machine import RunMachine
from mhd.store import Run, now


@dataclass(frozen=True)
class ManifestFile:
    path: str
    size: int | None
    sha256: str


def safe_relpath(rel: object) -> str:
    """A manifest path must stay inside the run folder: relative, no `..`, no oddities."""
    if not isinstance(rel, str) or not rel or "\\" in rel or "\x00" in rel:
        raise IntegrityError(f"manifest path {rel!r} is not a plain relative path")
    p = PurePosixPath(rel)
    if p.is_absolute() or any(part in ("..", "") for part in p.parts) or rel.startswith("~"):
        raise IntegrityError(f"manifest path {rel!r} escapes the run folder; refusing it")
    return str(p)


def parse_manifest(data: dict[str, Any]) -> list[ManifestFile]:
    files = data.get("files")
    if not isinstance(files, list) or not files:
        raise IntegrityError("manifest.json lists no files")
    out = []
    for entry in files:
        if not isinstance(entry, dict) or not isinstance(entry.get("sha256"), str):
            raise IntegrityError(f"manifest entry {entry!r} lacks a sha256")
        size = entry.get("size")
        out.append(ManifestFile(safe_relpath(entry.get("path")), size if isinstance(size, int) else None,
                                str(entry["sha256"]).lower()))
    return out


def verified_locally(out: Path) -> list[ManifestFile] | None:
    try:
        files = parse_manifest(json.loads((out / "manifest.json").read_text()))
    except (OSError, ValueError, IntegrityError):
        return None
    for f in files:
        p = out / f.path
        if not p.is_file() or (f.size is not None and p.stat().st_size != f.size):
            return None
    return files


def adapter_sha(files: list[ManifestFile]) -> str | None:
    return next((f.sha256 for f in files if f.path.endswith("adapter_model.safetensors")), None)


async def act(ctx: RunContext, m: RunMachine) -> None:
    run = ctx.check(m.run.id)
    out = ctx.run_dir(run) / "output"
    files = verified_locally(out)
    if files is None:
        files = await _download(ctx, run, out)
    run = ctx.store.update_run(run.id, adapter_sha256=adapter_sha(files))
    await terminate_pod(ctx, run, "artifacts fetched and verified")
    m.fire("fetched", reason=f"{len(files)} file(s) verified; pod terminated")


async def _download(ctx: RunContext, run: Run, out: Path) -> list[ManifestFile]:
    job = RemoteJob(ctx.require_session(), ctx.remote_dir(run))
    manifest = await job.read_json("manifest.json")
    if manifest is None:
        raise JobFailed(f"the trainer finished but wrote no manifest.json in {job.run_dir}")
    files = parse_manifest(manifest)
    t0 = time.monotonic()
    total = 0
    try:
        for f in files:
            # Each file was verified against the manifest's sha256 before it is moved into place.
            got = await job.session.download(job.path(f.path), out / f.path, f.sha256, f.size)
            total += got
            ctx.append_log(run, f"downloaded {f.path}: {got} bytes")
            ctx.check(run.id)
            await ctx.fault_point("Fetching.partial")
    finally:
        ctx.store.update_run(run.id, fetch_s=(run.fetch_s or 0.0) + time.monotonic() - t0)
    # Written last: its presence means every file above is complete and verified.
    tmp = out / "manifest.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=2))
    os.replace(tmp, out / "manifest.json")
    for f in files:
        if f.path.endswith("adapter_model.safetensors") and sha256_path(out / f.path) != f.sha256:
            raise IntegrityError(f"{f.path}: sha256 changed after download")
    ctx.append_log(run, f"fetched {len(files)} file(s), {total} bytes this attempt")
    return files


async def terminate_pod(ctx: RunContext, run: Run, why: str) -> Run:
    """Idempotent: already gone is success; the stop time is recorded for billing."""
    if not run.pod_id or run.pod_stopped_at is not None:
        return run
    await ctx.drop_session()
    await ctx.provider.terminate(run.pod_id)
    ctx.store.pod_terminated(run.pod_id, note=why)
    ctx.append_log(run, f"pod {run.pod_id} terminated ({why})")
    return ctx.store.update_run(run.id, pod_stopped_at=now())
