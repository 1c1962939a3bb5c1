"""Training: the trainer runs detached on the pod; this action only (re)attaches and polls.

Re-entering means: exit_code present → go on; pid alive → reattach and poll; neither → launch
(the trainer resumes from its newest checkpoint). The launch counter is committed *before* the
launch, and the launcher holds a lock, so a crash can never start a second trainer. On an
interruptible pod without a volume, each new checkpoint is pulled here as well (``checkpoints.py``).
"""

from __future__ import annotations

from mhd.errors import JobFailed
from mhd.remote.job import RemoteJob
from mhd.states import checkpoints
from mhd.states.context import RunContext
from mhd.states.machine import RunMachine


async def act(ctx: RunContext, m: RunMachine) -> None:
    run = ctx.check(m.run.id)
    job = RemoteJob(ctx.require_session(), ctx.remote_dir(run))
    local_log = ctx.run_dir(run) / "train.log"
    max_launches = ctx.cfg.retry.max_job_launches
    while True:
        run = ctx.check(run.id)
        st = await job.status()
        points, offset = await job.read_progress(run.progress_offset)
        if offset != run.progress_offset:
            run = ctx.store.add_progress(run.id, points, offset)
        await job.pull_log(local_log)
        if checkpoints.wanted(ctx, run):  # read after the status: a finished job's last one too
            run = await checkpoints.pull_newest(ctx, job, run)
        if st.finished:
            if st.exit_code == 0:
                m.fire("trained", reason=f"trainer exited 0 at step {run.step}/{run.total_steps}")
                return
            if st.killed_by_signal and run.job_launches < max_launches:
                ctx.log.warning("run %s: trainer killed (exit %s); relaunching from its last checkpoint",
                                run.id, st.exit_code)
                await _launch(ctx, job, run.id, f"trainer ended by signal (exit {st.exit_code})")
                continue
            tail = (await job.log_tail(5)).strip().splitlines()
            raise JobFailed(f"trainer exited with {st.exit_code}: {tail[-1] if tail else 'no log'} "
                            f"(full log: mhd logs {run.id})")
        if not st.running:
            if run.job_launches >= max_launches:
                raise JobFailed(f"trainer is not running and was launched {run.job_launches} times; "
                                f"giving up (see mhd logs {run.id})")
            await _launch(ctx, job, run.id, "first launch" if run.job_launches == 0 else "not running")
            continue
        await ctx.pause(ctx.cfg.poll_interval_s)


async def _launch(ctx: RunContext, job: RemoteJob, run_id: str, why: str) -> None:
    run = ctx.store.get_run(run_id)
    assert run is not None
    run = ctx.store.update_run(run_id, job_launches=run.job_launches + 1)
    ctx.append_log(run, f"launching trainer (launch #{run.job_launches}: {why})")
    await job.launch()
    await job.wait_started()
