"""Runs, their journal of transitions, and their progress points."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import func, select, update

from mhd.states.model import Outcome, RunState
from mhd.store.base import StoreBase
from mhd.store.tables import PROGRESS_FIELDS, ProgressPoint, Run, StoreError, Transition, new_run_id, now


class RunsMixin(StoreBase):
    def create_run(self, trigger: str, provider: str, run_id: str | None = None) -> Run:
        """A new run, committed directly in Provisioning with its Idle→Provisioning journal row."""
        run_id = run_id or new_run_id()
        with self.session() as s:
            if s.scalar(select(func.count()).select_from(Run).where(Run.state != RunState.IDLE)):
                raise StoreError("a run is already active; `mhd cancel` it first")
            run = Run(id=run_id, state=RunState.PROVISIONING, trigger=trigger, provider=provider)
            s.add(run)
            s.flush()
            s.add(Transition(run_id=run_id, from_state=RunState.IDLE, to_state=RunState.PROVISIONING,
                             reason=f"trigger: {trigger}"))
        return run

    def get_run(self, run_id: str) -> Run | None:
        with self.session() as s:
            return s.get(Run, run_id)

    def find_run(self, prefix: str) -> Run | None:
        with self.session() as s:
            rows = s.scalars(select(Run).where(Run.id.startswith(prefix)).limit(2)).all()
            return rows[0] if len(rows) == 1 else None

    def active_run(self) -> Run | None:
        with self.session() as s:
            return s.scalars(select(Run).where(Run.state != RunState.IDLE).order_by(Run.created_at)).first()

    def last_run(self) -> Run | None:
        with self.session() as s:
            return s.scalars(select(Run).order_by(Run.created_at.desc())).first()

    def waiting_merge(self) -> Run | None:
        """The run whose fetched adapter waits for a merge retry, if the newest fetched run is one.

        Only the newest: an older failed merge is superseded by any later run that got as far as
        Merging (its adapter holds the same memories, and newer ones).
        """
        merged = (Outcome.SUCCEEDED, Outcome.MERGE_FAILED)
        with self.session() as s:
            run = s.scalars(select(Run).where(Run.outcome.in_(merged)).order_by(Run.created_at.desc())).first()
        if run is None or run.outcome is not Outcome.MERGE_FAILED or run.merge_retry_at is None:
            return None
        return run

    def list_runs(self, limit: int = 20) -> list[Run]:
        with self.session() as s:
            return list(s.scalars(select(Run).order_by(Run.created_at.desc()).limit(limit)))

    def transition(self, run_id: str, expected: RunState, new: RunState, reason: str = "",
                   **fields: Any) -> Run:
        """Compare-and-set the state; raises StoreError if someone else moved it first."""
        t = now()
        values: dict[str, Any] = {"state": new, "state_entered_at": t, "updated_at": t, "attempts": 0}
        values.update(fields)
        with self.session() as s:
            res = s.execute(update(Run).where(Run.id == run_id, Run.state == expected).values(**values))
            if res.rowcount != 1:  # type: ignore[attr-defined]
                cur = s.get(Run, run_id)
                raise StoreError(
                    f"run {run_id}: expected state {expected.value}, found "
                    f"{cur.state.value if cur else 'no such run'}"
                )
            s.add(Transition(run_id=run_id, from_state=expected, to_state=new, reason=reason, at=t))
            run = s.get(Run, run_id)
            assert run is not None
            s.refresh(run)
            return run

    def update_run(self, run_id: str, **fields: Any) -> Run:
        fields["updated_at"] = now()
        with self.session() as s:
            s.execute(update(Run).where(Run.id == run_id).values(**fields))
            run = s.get(Run, run_id)
            if run is None:
                raise StoreError(f"no run {run_id}")
            s.refresh(run)
            return run

    def bump_attempts(self, run_id: str) -> int:
        with self.session() as s:
            s.execute(update(Run).where(Run.id == run_id).values(attempts=Run.attempts + 1))
            return int(s.scalar(select(Run.attempts).where(Run.id == run_id)) or 0)

    def request_cancel(self, run_id: str) -> None:
        self.update_run(run_id, cancel_requested=True)

    def journal(self, run_id: str) -> list[Transition]:
        with self.session() as s:
            return list(s.scalars(select(Transition).where(Transition.run_id == run_id).order_by(Transition.id)))

    # Progress ---------------------------------------------------------------------------------
    def add_progress(self, run_id: str, points: Sequence[dict[str, Any]], offset: int) -> Run:
        """Append parsed progress lines and advance the read offset in one transaction."""
        with self.session() as s:
            for p in points:
                s.add(ProgressPoint(run_id=run_id, **{k: p.get(k) for k in PROGRESS_FIELDS}))
            values: dict[str, Any] = {"progress_offset": offset, "updated_at": now()}
            last_train = next((p for p in reversed(points) if p.get("step") is not None), None)
            if last_train is not None:
                for k in ("step", "total_steps", "epoch", "eta_s"):
                    if last_train.get(k) is not None:
                        values[k] = last_train[k]
                if last_train.get("loss") is not None:
                    values["loss"] = last_train["loss"]
            if points and points[-1].get("phase"):
                values["phase"] = points[-1]["phase"]
            s.execute(update(Run).where(Run.id == run_id).values(**values))
            run = s.get(Run, run_id)
            assert run is not None
            s.refresh(run)
            return run

    def recent_losses(self, run_id: str, limit: int = 200) -> list[float]:
        """The last ``limit`` train losses, oldest first (status must not grow with run length)."""
        q = (select(ProgressPoint.loss).where(ProgressPoint.run_id == run_id, ProgressPoint.loss.is_not(None))
             .order_by(ProgressPoint.id.desc()).limit(limit))
        with self.session() as s:
            return [float(x) for x in reversed(list(s.scalars(q))) if x is not None]

    def last_gpu_point(self, run_id: str) -> ProgressPoint | None:
        has_gpu = ProgressPoint.gpu_util.is_not(None) | ProgressPoint.gpu_mem_used.is_not(None)
        q = (select(ProgressPoint).where(ProgressPoint.run_id == run_id, has_gpu)
             .order_by(ProgressPoint.id.desc()).limit(1))
        with self.session() as s:
            return s.scalars(q).first()

    def progress(self, run_id: str) -> list[ProgressPoint]:
        with self.session() as s:
            return list(s.scalars(select(ProgressPoint).where(ProgressPoint.run_id == run_id)
                                  .order_by(ProgressPoint.id)))
