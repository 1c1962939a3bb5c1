"""The newest training checkpoint, kept off the pod so that it outlives a preemption.

Without a network volume, a preempted pod takes its disk with it. So while Training polls an
interruptible pod, each newly completed checkpoint (``checkpoints/checkpoint-N`` with its
``trainer_state.json``, which the Trainer writes last) is pulled here: the pod hashes the files,
each is downloaded and sha256-verified like any fetch, and the complete copy replaces the older
one (only the newest is kept; a LoRA checkpoint is the adapter plus its optimizer state, small).
Uploading puts it back on the next pod, where the trainer resumes from it.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
from pathlib import Path

from mhd.errors import ConnectionLost, MhdError
from mhd.remote.job import RemoteJob
from mhd.remote.paths import validate_manifest_path
from mhd.states import preemption
from mhd.states.context import RunContext
from mhd.store import Run

LOCAL = "checkpoint"  # <run dir>/checkpoint/checkpoint-N/…
LISTING = "checkpoint.json"


def wanted(ctx: RunContext, run: Run) -> bool:
    """Only an interruptible pod without a volume can lose its checkpoints under the run."""
    return run.pod_interruptible and not preemption.uses_volume(ctx.cfg)


def _newest_script(run_dir: str, known: int | None) -> str:
    d = shlex.quote(run_dir.rstrip("/") + "/checkpoints")
    return (
        f"cd {d} 2>/dev/null || exit 0; best=; "
        "for c in checkpoint-*; do n=${c#checkpoint-}; case $n in ''|*[!0-9]*) continue;; esac; "
        '[ -f "$c/trainer_state.json" ] || continue; ls "$c"/adapter_model.* >/dev/null 2>&1 || continue; '
        'if [ -z "$best" ] || [ "$n" -gt "${best#checkpoint-}" ]; then best=$c; fi; done; '
        '[ -n "$best" ] || exit 0; echo "$best"; '
        f'[ "${{best#checkpoint-}}" = "{known if known is not None else ""}" ] && exit 0; '
        'find "$best" -type f ! -name "*.tmp" | while IFS= read -r f; do '
        'printf "%s %s %s\\n" "$(stat -c %s "$f")" "$(sha256sum "$f" | cut -d" " -f1)" "$f"; done'
    )


async def pull_newest(ctx: RunContext, job: RemoteJob, run: Run) -> Run:
    """Pull the pod's newest complete checkpoint if it is newer than the one kept here.

    Anything but a lost link (a checkpoint rotated away mid-download, a file still being written)
    is logged and left to the next poll: the checkpoint copy must never fail the training.
    """
    try:
        return await _pull(ctx, job, run)
    except ConnectionLost:
        raise
    except (MhdError, OSError, ValueError) as exc:
        ctx.log.warning("run %s: checkpoint not pulled this time: %s", run.id, exc)
        return run


async def _pull(ctx: RunContext, job: RemoteJob, run: Run) -> Run:
    res = await job.session.run(_newest_script(job.run_dir, run.checkpoint_step), timeout=300)
    lines = [ln for ln in res.stdout.splitlines() if ln.strip()]
    if res.exit_status != 0 or not lines:
        return run
    name = lines[0].strip()
    step = int(name.removeprefix("checkpoint-"))
    if step == run.checkpoint_step or len(lines) < 2:
        return run
    files: list[tuple[str, int, str]] = []
    prefix = f"{job.run_dir}/checkpoints/"
    for ln in lines[1:]:
        n, digest, path = ln.split(" ", 2)
        files.append((validate_manifest_path(path.removeprefix(prefix)), int(n), digest))
    base = ctx.run_dir(run)
    staging = base / f"{LOCAL}.tmp"
    if staging.exists() and _listed_step(staging) != step:
        shutil.rmtree(staging)
    staging.mkdir(parents=True, exist_ok=True)
    total = 0
    for rel, size, sha in files:
        total += await job.session.download(prefix + rel, staging / rel, sha, size)
    listing = [{"path": rel, "size": size, "sha256": sha} for rel, size, sha in files]
    (staging / LISTING).write_text(json.dumps({"name": name, "step": step, "files": listing}))
    _swap_in(base, staging)
    ctx.append_log(run, f"checkpoint step {step} pulled ({len(files)} file(s), {total} bytes) and verified")
    return ctx.store.update_run(run.id, checkpoint_step=step)


def _listed_step(folder: Path) -> int | None:
    try:
        return int(json.loads((folder / LISTING).read_text())["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _swap_in(base: Path, staging: Path) -> None:
    """The verified copy replaces the kept one; a crash in between leaves one of them whole."""
    current, old = base / LOCAL, base / f"{LOCAL}.old"
    shutil.rmtree(old, ignore_errors=True)
    if current.exists():
        os.replace(current, old)
    os.replace(staging, current)
    shutil.rmtree(old, ignore_errors=True)


def local_files(ctx: RunContext, run: Run) -> list[tuple[Path, str]]:
    """(local file, path under the pod's ``checkpoints/``) of the kept checkpoint, verified listing first."""
    folder = ctx.run_dir(run) / LOCAL
    if not folder.is_dir():
        old = ctx.run_dir(run) / f"{LOCAL}.old"  # a crash inside _swap_in
        folder = old if old.is_dir() else folder
    try:
        listed = json.loads((folder / LISTING).read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return []
    return [(folder / str(f["path"]), str(f["path"])) for f in listed if (folder / str(f["path"])).is_file()]
