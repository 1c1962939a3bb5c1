"""Uploading: each input file to a temp name, sha256-checked remotely, renamed; matches skipped."""

from __future__ import annotations

import shlex

from mhd.errors import RemoteError
from mhd.hashing import sha256_file
from mhd.states import checkpoints, preemption
from mhd.states.context import RunContext
from mhd.states.machine import RunMachine
from mhd.states.provisioning import input_files


async def act(ctx: RunContext, m: RunMachine) -> None:
    run = ctx.check(m.run.id)
    session = ctx.require_session()
    remote = ctx.remote_dir(run)
    res = await session.run(f"mkdir -p {shlex.quote(remote)}")
    if res.exit_status != 0:
        raise RemoteError(f"cannot create {remote} on the pod: {res.stderr.strip()}")
    sent = skipped = 0
    inputs = ctx.run_dir(run) / "input"
    files = input_files(ctx, run)
    subdirs = sorted({str(p.parent.relative_to(inputs)) for p in files} - {"."})
    if subdirs:
        res = await session.run("mkdir -p " + " ".join(shlex.quote(f"{remote}/{d}") for d in subdirs))
        if res.exit_status != 0:
            raise RemoteError(f"cannot create folders in {remote} on the pod: {res.stderr.strip()}")
    for path in files:
        target = f"{remote}/{path.relative_to(inputs)}"
        if path.name == "job.env":
            await session.write_file(target, path.read_bytes(), mode=0o600)
            continue
        if await session.upload(path, target, sha256_file(path)):
            sent += 1
        else:
            skipped += 1
        ctx.check(run.id)
        await ctx.fault_point("Uploading.partial")
    # After a preemption the new pod gets the newest checkpoint kept here; the trainer resumes from it.
    ckpt = checkpoints.local_files(ctx, run) if run.preemptions and not preemption.uses_volume(ctx.cfg) else []
    if ckpt:
        dirs = sorted({f"{remote}/checkpoints/{rel}".rsplit("/", 1)[0] for _, rel in ckpt})
        res = await session.run("mkdir -p " + " ".join(shlex.quote(d) for d in dirs))
        if res.exit_status != 0:
            raise RemoteError(f"cannot create {remote}/checkpoints on the pod: {res.stderr.strip()}")
        for path, rel in ckpt:
            if await session.upload(path, f"{remote}/checkpoints/{rel}", sha256_file(path)):
                sent += 1
            else:
                skipped += 1
        ctx.append_log(run, f"checkpoint step {run.checkpoint_step} uploaded for the trainer to resume from")
    ctx.append_log(run, f"uploaded {sent} file(s), {skipped} already on the pod")
    m.fire("uploaded", reason=f"{sent} sent, {skipped} already there")
