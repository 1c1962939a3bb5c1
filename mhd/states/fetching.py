"""Fetching: download what the manifest lists (resumable, sha256-verified); only then terminate.

If everything is already here and verified (e.g. the daemon died after the last byte), no
connection is needed at all: the pod is terminated and the run moves on.

The merged model can be many GB, so the local disk is checked first (and again when a write
fails with ENOSPC). Without room, nothing is lost: the pod is **kept**, the run waits in Fetching
with the reason in its ``error`` (``mhd status``, ``mhd doctor``), rechecks every minute, and
resumes by itself once space is freed. It sends the pod no heartbeat while it waits, so the pod's
dead-man timer stops it ``runpod.max_unattended`` after the last one; the run gives up
(``InsufficientDisk``, Aborting) when it has waited that long. During downloads it does send
heartbeats, so a long fetch is never cut short by the timer.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import os
import shutil
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mhd.errors import InsufficientDisk, IntegrityError, JobFailed
from mhd.remote.job import RemoteJob
from mhd.remote.paths import resolve_manifest_path, validate_manifest_path
from mhd.states.context import RunContext
from mhd.states.machine import RunMachine
from mhd.store import Run, now

# Left free besides the artifacts: the DB, logs and the rest of the machine keep working.
FREE_MARGIN = 1 << 30
DISK_RECHECK_S = 60.0
FETCH_PLAN = "fetch.json"  # the pod's manifest, kept in the run folder while fetching (mhd doctor)
DISK_EVENT = "disk"
NO_SPACE = "not enough disk space"


@dataclass(frozen=True)
class ManifestFile:
    path: str
    size: int | None
    sha256: str


def parse_manifest(data: dict[str, Any]) -> list[ManifestFile]:
    files = data.get("files")
    if not isinstance(files, list) or not files:
        raise IntegrityError("manifest.json lists no files")
    out = []
    for entry in files:
        if not isinstance(entry, dict) or not isinstance(entry.get("sha256"), str):
            raise IntegrityError(f"manifest entry {entry!r} lacks a sha256")
        size = entry.get("size")
        path = validate_manifest_path(str(entry.get("path") or ""))
        out.append(ManifestFile(path, size if isinstance(size, int) else None, str(entry["sha256"]).lower()))
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


# Disk space --------------------------------------------------------------------------------------
def free_bytes(path: Path) -> int:
    """Free bytes on the file system that holds ``path`` (or its nearest existing parent)."""
    p = path
    while not p.exists() and p != p.parent:
        p = p.parent
    return shutil.disk_usage(p).free


def bytes_to_fetch(out: Path, files: list[ManifestFile]) -> int:
    """What still has to arrive: each file's size less what is already here (whole or as .part)."""
    left = 0
    for f in files:
        if f.size is None:
            continue
        final = out / f.path
        if final.is_file() and final.stat().st_size == f.size:
            continue
        part = final.with_name(final.name + ".part")
        have = part.stat().st_size if part.is_file() else 0
        left += max(0, f.size - have)
    return left


def fetch_plan(run_dir: Path) -> list[ManifestFile] | None:
    """The files of a fetch in progress (from the pod's manifest), for `mhd doctor`."""
    try:
        return parse_manifest(json.loads((run_dir / FETCH_PLAN).read_text()))
    except (OSError, ValueError, IntegrityError):
        return None


def gb(n: float) -> str:
    return f"{n / 1e9:.1f} GB"


def _waiting_since(ctx: RunContext, run: Run) -> float | None:
    """When the current wait for disk space began (kept in the events table across restarts)."""
    since = None
    for e in ctx.store.events(run.id, kind=DISK_EVENT):
        since = (since or e.at) if e.detail.startswith("waiting") else None
    return since


async def wait_for_disk(ctx: RunContext, run: Run, out: Path, files: list[ManifestFile]) -> None:
    """Return once the rest of the fetch fits; until then keep the pod and say why, in the run."""
    while True:
        left = bytes_to_fetch(out, files)
        need = left + FREE_MARGIN if left else 0
        free = free_bytes(out)
        since = _waiting_since(ctx, run)
        if free >= need:
            if since is not None:
                ctx.store.add_event(run.id, DISK_EVENT, f"resumed: {gb(free)} free for {gb(left)}")
                ctx.append_log(run, f"disk space freed ({gb(free)} free): fetching")
            if (run.error or "").startswith(NO_SPACE):
                run = ctx.store.update_run(run.id, error=None)
            return
        limit = ctx.cfg.runpod.max_unattended
        msg = (f"{NO_SPACE} under {out} to fetch the run's artifacts: {gb(left)} still to download "
               f"+ {gb(FREE_MARGIN)} margin, {gb(free)} free. The pod {run.pod_id} is kept (nothing is "
               f"lost); free space and the fetch resumes by itself (rechecked every {DISK_RECHECK_S:.0f} s). "
               f"The run gives up after {limit / 3600:.1f} h (runpod.max_unattended: a RunPod pod stops itself then)")
        if since is None:
            ctx.store.add_event(run.id, DISK_EVENT, f"waiting: {gb(left)} to fetch, {gb(free)} free")
            ctx.append_log(run, msg)
            ctx.log.error("run %s: %s", run.id, msg)
            since = now()
        waited = now() - since
        if waited > limit:
            raise InsufficientDisk(f"{NO_SPACE} under {out} for {waited / 3600:.1f} h: {gb(left)} to fetch, "
                                   f"{gb(free)} free; giving up (runpod.max_unattended: a RunPod pod has stopped "
                                   "itself by now)")
        if run.error != msg:
            run = ctx.store.update_run(run.id, error=msg)
        await ctx.pause(DISK_RECHECK_S)
        run = ctx.check(run.id)


async def act(ctx: RunContext, m: RunMachine) -> None:
    run = ctx.check(m.run.id)
    out = ctx.run_dir(run) / "output"
    files = verified_locally(out)
    if files is None:
        files = await _download(ctx, run, out)
    run = ctx.store.update_run(run.id, adapter_sha256=adapter_sha(files))
    await terminate_pod(ctx, run, "artifacts fetched and verified")
    # The training checkpoint kept for a preemption is of no use once the adapter is here.
    for name in ("checkpoint", "checkpoint.tmp", "checkpoint.old"):
        shutil.rmtree(ctx.run_dir(run) / name, ignore_errors=True)
    m.fire("fetched", reason=f"{len(files)} file(s) verified; pod terminated")


async def _download(ctx: RunContext, run: Run, out: Path) -> list[ManifestFile]:
    job = RemoteJob(ctx.require_session(), ctx.remote_dir(run))
    manifest = await job.read_json("manifest.json")
    if manifest is None:
        raise JobFailed(f"the trainer finished but wrote no manifest.json in {job.run_dir}")
    files = parse_manifest(manifest)
    plan = ctx.run_dir(run) / FETCH_PLAN
    plan.parent.mkdir(parents=True, exist_ok=True)
    plan.write_text(json.dumps(manifest))
    total = 0
    while True:
        await wait_for_disk(ctx, run, out, files)
        try:
            total += await _fetch_files(ctx, run, job, out, files)
            break
        except OSError as exc:
            if exc.errno != errno.ENOSPC:
                raise
            # The check above raced with something else filling the disk: the .part files stay
            # (an exact prefix), so after the wait the download resumes where it stopped.
            ctx.append_log(run, f"disk full while fetching ({exc}); waiting for space")
    # Written last: its presence means every file above is complete and verified.
    tmp = out / "manifest.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=2))
    os.replace(tmp, out / "manifest.json")
    ctx.append_log(run, f"fetched {len(files)} file(s), {total} bytes this attempt")
    plan.unlink(missing_ok=True)
    return files


async def _fetch_files(ctx: RunContext, run: Run, job: RemoteJob, out: Path, files: list[ManifestFile]) -> int:
    t0 = time.monotonic()
    total = 0
    try:
        async with _heartbeats(ctx, job):
            for f in files:
                # No symlink on the pod may point a manifest entry outside its run folder.
                remote = await resolve_manifest_path(job.session, job.run_dir, f.path)
                # Each file was verified against the manifest's sha256 before it is moved into place.
                got = await job.session.download(remote, out / f.path, f.sha256, f.size)
                total += got
                ctx.append_log(run, f"downloaded {f.path}: {got} bytes")
                ctx.check(run.id)
                await ctx.fault_point("Fetching.partial")
    finally:
        fresh = ctx.store.get_run(run.id)
        spent = (fresh.fetch_s if fresh else run.fetch_s) or 0.0
        ctx.store.update_run(run.id, fetch_s=spent + time.monotonic() - t0)
    return total


@contextlib.asynccontextmanager
async def _heartbeats(ctx: RunContext, job: RemoteJob) -> AsyncIterator[None]:
    """Touch the pod's heartbeat while a (possibly hours-long) download runs.

    The beat also stops on ``stop``, not on the cancel alone: on Python 3.11 an
    ``asyncio.wait_for`` whose inner call finishes as the cancel arrives swallows it (fixed in
    3.12), and the status round trip is such a call. A lost cancel left the fetch waiting here,
    every file downloaded, until the run's deadline (seen in CI).
    """
    stop = asyncio.Event()

    async def beat() -> None:
        while not stop.is_set():
            with contextlib.suppress(Exception):  # a dead link shows up in the download itself
                await job.status()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), ctx.cfg.heartbeat_interval_s)

    task = asyncio.create_task(beat())
    try:
        yield
    finally:
        stop.set()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def terminate_pod(ctx: RunContext, run: Run, why: str) -> Run:
    """Idempotent: already gone is success; the stop time is recorded for billing."""
    if not run.pod_id or run.pod_stopped_at is not None:
        return run
    await ctx.drop_session()
    await ctx.provider.terminate(run.pod_id)
    t = now()  # one instant for the run and the pods ledger, so both bill the same seconds
    ctx.store.pod_terminated(run.pod_id, note=why, at=t)
    ctx.append_log(run, f"pod {run.pod_id} terminated ({why})")
    return ctx.store.update_run(run.id, pod_stopped_at=t)
