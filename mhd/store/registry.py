"""Pods mhd created, models it registered, and the events worth showing beside the journal."""

from __future__ import annotations

from sqlalchemy import select, update

from mhd.store.base import StoreBase
from mhd.store.tables import EventRecord, ModelRecord, PodRecord, now


class RegistryMixin(StoreBase):
    def record_pod(self, pod_id: str, run_id: str | None, provider: str, name: str, *,
                   started_at: float | None = None, cost_per_hr: float | None = None,
                   interruptible: bool = False) -> None:
        with self.session() as s:
            if s.get(PodRecord, pod_id) is None:
                s.add(PodRecord(pod_id=pod_id, run_id=run_id, provider=provider, name=name,
                                created_at=started_at or now(), cost_per_hr=cost_per_hr,
                                interruptible=interruptible))

    def pod_terminated(self, pod_id: str, note: str = "", *, at: float | None = None,
                       preempted: bool = False) -> None:
        with self.session() as s:
            row = s.get(PodRecord, pod_id)
            if row is not None and row.terminated_at is None:
                row.terminated_at, row.note = at or now(), note
                row.preempted = row.preempted or preempted

    def run_pods(self, run_id: str) -> list[PodRecord]:
        with self.session() as s:
            return list(s.scalars(select(PodRecord).where(PodRecord.run_id == run_id)
                                  .order_by(PodRecord.created_at)))

    def pods(self) -> list[PodRecord]:
        with self.session() as s:
            return list(s.scalars(select(PodRecord).order_by(PodRecord.created_at)))

    # Models + events --------------------------------------------------------------------------
    def add_model(self, run_id: str, name: str, kind: str) -> ModelRecord:
        with self.session() as s:
            existing = s.scalars(select(ModelRecord).where(ModelRecord.name == name,
                                                           ModelRecord.deleted_at.is_(None))).first()
            if existing is not None:
                return existing
            rec = ModelRecord(run_id=run_id, name=name, kind=kind)
            s.add(rec)
            return rec

    def models(self, include_deleted: bool = False) -> list[ModelRecord]:
        with self.session() as s:
            q = select(ModelRecord).order_by(ModelRecord.created_at, ModelRecord.id)
            if not include_deleted:
                q = q.where(ModelRecord.deleted_at.is_(None))
            return list(s.scalars(q))

    def set_active_model(self, name: str) -> None:
        with self.session() as s:
            s.execute(update(ModelRecord).values(active=False))
            s.execute(update(ModelRecord).where(ModelRecord.name == name,
                                                ModelRecord.deleted_at.is_(None)).values(active=True))

    def mark_model_deleted(self, name: str) -> None:
        with self.session() as s:
            s.execute(update(ModelRecord).where(ModelRecord.name == name).values(deleted_at=now(), active=False))

    def add_event(self, run_id: str | None, kind: str, detail: str = "") -> None:
        with self.session() as s:
            s.add(EventRecord(run_id=run_id, kind=kind, detail=detail))

    def events(self, run_id: str | None = None, kind: str | None = None) -> list[EventRecord]:
        with self.session() as s:
            q = select(EventRecord).order_by(EventRecord.id)
            if run_id is not None:
                q = q.where(EventRecord.run_id == run_id)
            if kind is not None:
                q = q.where(EventRecord.kind == kind)
            return list(s.scalars(q))
