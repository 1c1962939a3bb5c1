"""Persistence: SQLAlchemy models and the few operations the daemon needs.

Transitions are compare-and-set (``UPDATE runs SET state=:new WHERE id=:id AND state=:expected``)
and are committed, with their journal row, before the new state's action begins. Everything
returned is a detached snapshot (``expire_on_commit=False``) so callers never hold a session.
Secrets never enter this database.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import (
    Boolean,
    Enum,
    Float,
    ForeignKey,
    Integer,
    String,
    Table,
    Text,
    create_engine,
    event,
    func,
    inspect,
    select,
    text,
    update,
)
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from mhd.errors import MhdError
from mhd.states.model import ACTIVE_STATES, Outcome, RunState

# 2: runs.merge_attempts / merge_retry_at (a failed merge is retried, never retrained);
#    runs.eval_json / eval_decision (the quality gate's numbers and verdict).
# Older databases are upgraded in place at start (added columns only; see ``_migrate``).
SCHEMA_VERSION = 2


def now() -> float:
    return time.time()


def new_run_id() -> str:
    # Sortable, short, DNS-safe: it becomes part of the pod name.
    return datetime.now(UTC).strftime("%Y%m%d-%H%M%S-") + secrets.token_hex(2)


class Base(DeclarativeBase):
    pass


class Meta(Base):
    __tablename__ = "meta"
    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(Text)


class Run(Base):
    __tablename__ = "runs"
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    state: Mapped[RunState] = mapped_column(Enum(RunState, native_enum=False, length=16), index=True)
    resume_state: Mapped[RunState | None] = mapped_column(Enum(RunState, native_enum=False, length=16))
    trigger: Mapped[str] = mapped_column(String(32))
    provider: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[float] = mapped_column(Float, default=now)
    updated_at: Mapped[float] = mapped_column(Float, default=now)
    state_entered_at: Mapped[float] = mapped_column(Float, default=now)
    finished_at: Mapped[float | None] = mapped_column(Float)
    outcome: Mapped[Outcome | None] = mapped_column(Enum(Outcome, native_enum=False, length=20))
    error: Mapped[str | None] = mapped_column(Text)
    abort_outcome: Mapped[Outcome | None] = mapped_column(Enum(Outcome, native_enum=False, length=20))
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    # pod / endpoint facts
    pod_id: Mapped[str | None] = mapped_column(String(128))
    pod_name: Mapped[str | None] = mapped_column(String(128))
    gpu_type: Mapped[str | None] = mapped_column(String(64))
    endpoint_host: Mapped[str | None] = mapped_column(String(255))
    endpoint_port: Mapped[int | None] = mapped_column(Integer)
    endpoint_user: Mapped[str | None] = mapped_column(String(64))
    host_key: Mapped[str | None] = mapped_column(Text)
    remote_dir: Mapped[str | None] = mapped_column(Text)
    # cost
    cost_per_hr: Mapped[float | None] = mapped_column(Float)
    pod_started_at: Mapped[float | None] = mapped_column(Float)
    pod_stopped_at: Mapped[float | None] = mapped_column(Float)
    fetch_s: Mapped[float] = mapped_column(Float, default=0.0)
    # progress
    step: Mapped[int | None] = mapped_column(Integer)
    total_steps: Mapped[int | None] = mapped_column(Integer)
    epoch: Mapped[float | None] = mapped_column(Float)
    loss: Mapped[float | None] = mapped_column(Float)
    eta_s: Mapped[float | None] = mapped_column(Float)
    phase: Mapped[str | None] = mapped_column(String(32))
    progress_offset: Mapped[int] = mapped_column(Integer, default=0)
    job_launches: Mapped[int] = mapped_column(Integer, default=0)
    # dataset / result
    samples: Mapped[int | None] = mapped_column(Integer)
    report_json: Mapped[str | None] = mapped_column(Text)
    dataset_sha256: Mapped[str | None] = mapped_column(String(64))
    adapter_sha256: Mapped[str | None] = mapped_column(String(64))
    model_name: Mapped[str | None] = mapped_column(String(255))
    # a failed merge waits for its retry (the adapter is kept; the pod is long gone)
    merge_attempts: Mapped[int] = mapped_column(Integer, default=0)
    merge_retry_at: Mapped[float | None] = mapped_column(Float)
    # the quality gate: numbers + decision + reason (JSON; no memory text), and the decision alone
    eval_json: Mapped[str | None] = mapped_column(Text)
    eval_decision: Mapped[str | None] = mapped_column(String(16))

    # Derived views ---------------------------------------------------------------------------
    @property
    def active(self) -> bool:
        return self.state in ACTIVE_STATES

    def billed_s(self, at: float | None = None) -> float:
        if self.pod_started_at is None:
            return 0.0
        end = self.pod_stopped_at or at or now()
        return max(0.0, end - self.pod_started_at)

    def cost_usd(self, at: float | None = None) -> float:
        return (self.cost_per_hr or 0.0) * self.billed_s(at) / 3600.0

    @property
    def report(self) -> dict[str, Any]:
        return json.loads(self.report_json) if self.report_json else {}


class Transition(Base):
    __tablename__ = "transitions"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    run_id: Mapped[str] = mapped_column(ForeignKey("runs.id"), index=True)
    from_state: Mapped[RunState] = mapped_column(Enum(RunState, native_enum=False, length=16))
    to_state: Mapped[RunState] = mapped_column(Enum(RunState, native_enum=False, length=16))
    reason: Mapped[str] = mapped_column(Text, default="")
    at: Mapped[float] = mapped_column(Float, default=now)


class MemoryEntry(Base):
    """The ledger: one row per distinct memory (by content key), trained or not."""

    __tablename__ = "memories"
    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    first_seen_at: Mapped[float] = mapped_column(Float, default=now)
    trained_run_id: Mapped[str | None] = mapped_column(String(40), index=True)
    trained_at: Mapped[float | None] = mapped_column(Float)


class MemoryFile(Base):
    """Cache of path → (mtime, size, key) so a warm rescan only stats files."""

    __tablename__ = "memory_files"
    path: Mapped[str] = mapped_column(Text, primary_key=True)
    mtime_ns: Mapped[int] = mapped_column(Integer)
    size: Mapped[int] = mapped_column(Integer)
    key: Mapped[str | None] = mapped_column(String(64), index=True)


_FILES = Table("memory_files", Base.metadata)  # the Table itself (typed), for bulk Core statements
_META = Table("meta", Base.metadata)


class ProgressPoint(Base):
    __tablename__ = "progress"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    run_id: Mapped[str] = mapped_column(ForeignKey("runs.id"), index=True)
    step: Mapped[int | None] = mapped_column(Integer)
    total_steps: Mapped[int | None] = mapped_column(Integer)
    epoch: Mapped[float | None] = mapped_column(Float)
    loss: Mapped[float | None] = mapped_column(Float)
    eval_loss: Mapped[float | None] = mapped_column(Float)
    learning_rate: Mapped[float | None] = mapped_column(Float)
    samples_per_s: Mapped[float | None] = mapped_column(Float)
    eta_s: Mapped[float | None] = mapped_column(Float)
    phase: Mapped[str | None] = mapped_column(String(32))
    gpu_util: Mapped[float | None] = mapped_column(Float)
    gpu_mem_used: Mapped[float | None] = mapped_column(Float)
    gpu_mem_total: Mapped[float | None] = mapped_column(Float)
    time: Mapped[float | None] = mapped_column(Float)


class PodRecord(Base):
    __tablename__ = "pods"
    pod_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    run_id: Mapped[str | None] = mapped_column(String(40), index=True)
    provider: Mapped[str] = mapped_column(String(16))
    name: Mapped[str] = mapped_column(String(128))
    created_at: Mapped[float] = mapped_column(Float, default=now)
    terminated_at: Mapped[float | None] = mapped_column(Float)
    note: Mapped[str | None] = mapped_column(Text)


class ModelRecord(Base):
    """Models mhd registered (Ollama names or peft dirs), for alias, keep-N and rollback."""

    __tablename__ = "models"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    run_id: Mapped[str] = mapped_column(String(40), index=True)
    name: Mapped[str] = mapped_column(String(255))
    kind: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[float] = mapped_column(Float, default=now)
    active: Mapped[bool] = mapped_column(Boolean, default=False)
    deleted_at: Mapped[float | None] = mapped_column(Float)


class EventRecord(Base):
    """Things worth showing in `mhd runs` that are not state changes (rollback, reaper, merge)."""

    __tablename__ = "events"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    run_id: Mapped[str | None] = mapped_column(String(40), index=True)
    kind: Mapped[str] = mapped_column(String(32))
    detail: Mapped[str] = mapped_column(Text, default="")
    at: Mapped[float] = mapped_column(Float, default=now)


class StoreError(MhdError):
    pass


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA busy_timeout=5000")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()


PROGRESS_FIELDS = (
    "step",
    "total_steps",
    "epoch",
    "loss",
    "eval_loss",
    "learning_rate",
    "samples_per_s",
    "eta_s",
    "phase",
    "gpu_util",
    "gpu_mem_used",
    "gpu_mem_total",
    "time",
)


class Store:
    def __init__(self, url: str, *, create: bool = True) -> None:
        if url.startswith("sqlite:///") and url != "sqlite:///:memory:":
            Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        self.url = url
        self.engine: Engine = create_engine(url, future=True)
        if self.engine.dialect.name == "sqlite":
            event.listen(self.engine, "connect", _sqlite_pragmas)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        if create:
            self._init_schema()

    def close(self) -> None:
        self.engine.dispose()

    @contextmanager
    def session(self) -> Iterator[Session]:
        with self._sessions.begin() as s:
            yield s

    def _init_schema(self) -> None:
        with self.session() as s:
            Base.metadata.create_all(s.connection(), tables=[_META])
            row = s.get(Meta, "schema_version")
            found = int(row.value) if row is not None else None
        if found is not None and found > SCHEMA_VERSION:
            raise StoreError(
                f"database {self.url} has schema version {found}, this mhd expects "
                f"{SCHEMA_VERSION}: upgrade mhd or move the database aside"
            )
        Base.metadata.create_all(self.engine)
        with self.engine.begin() as conn:
            # create_all adds indexes only with new tables; this one came after the table.
            conn.execute(text("CREATE INDEX IF NOT EXISTS ix_memory_files_key ON memory_files (key)"))
            if found is not None and found < SCHEMA_VERSION:
                self._migrate(conn)
        with self.session() as s:
            row = s.get(Meta, "schema_version")
            if row is None:
                s.add(Meta(key="schema_version", value=str(SCHEMA_VERSION)))
            else:
                row.value = str(SCHEMA_VERSION)

    @staticmethod
    def _migrate(conn: Connection) -> None:
        """Add the columns a newer schema has and an older database lacks.

        Every schema change so far only adds columns, each with a default or nullable, so an
        ``ALTER TABLE … ADD COLUMN`` per missing column is the whole upgrade; rows keep their data.
        """
        for table in Base.metadata.sorted_tables:
            have = {c["name"] for c in inspect(conn).get_columns(table.name)}
            for col in table.columns:
                if col.name in have:
                    continue
                ddl = f'ALTER TABLE "{table.name}" ADD COLUMN "{col.name}" {col.type.compile(conn.dialect)}'
                default = getattr(col.default, "arg", None)
                if isinstance(default, bool | int | float):
                    ddl += f" DEFAULT {int(default) if isinstance(default, bool) else default}"
                conn.execute(text(ddl))

    def schema_version(self) -> int:
        with self.session() as s:
            row = s.get(Meta, "schema_version")
            return int(row.value) if row else 0

    # Runs -------------------------------------------------------------------------------------
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

    # Memories ledger --------------------------------------------------------------------------
    def trained_keys(self) -> set[str]:
        with self.session() as s:
            return set(s.scalars(select(MemoryEntry.key).where(MemoryEntry.trained_run_id.is_not(None))))

    def mark_trained(self, keys: Iterable[str], run_id: str) -> int:
        t = now()
        n = 0
        with self.session() as s:
            for key in keys:
                row = s.get(MemoryEntry, key)
                if row is None:
                    s.add(MemoryEntry(key=key, trained_run_id=run_id, trained_at=t))
                elif row.trained_run_id is None:
                    row.trained_run_id, row.trained_at = run_id, t
                else:
                    continue
                n += 1
        return n

    def file_cache(self) -> dict[str, tuple[int, int]]:
        """path → (mtime_ns, size) of every memory file seen; what a rescan compares against."""
        # Plain rows, not ORM objects: 100k of them load in a fraction of the time.
        q = select(_FILES.c.path, _FILES.c.mtime_ns, _FILES.c.size)
        with self.engine.connect() as conn:
            return {path: (mtime, size) for path, mtime, size in conn.execute(q)}

    def save_file_cache(self, upserts: dict[str, tuple[int, int, str | None]], deletes: Iterable[str]) -> None:
        """Bulk upsert/delete (one statement per chunk, not one SELECT per row)."""
        gone = list(deletes)
        with self.engine.begin() as conn:
            for i in range(0, len(gone), 500):
                conn.execute(_FILES.delete().where(_FILES.c.path.in_(gone[i:i + 500])))
            self._upsert_files(conn, upserts)

    def _upsert_files(self, conn: Connection, upserts: dict[str, tuple[int, int, str | None]]) -> None:
        rows = [{"path": p, "mtime_ns": m, "size": z, "key": k} for p, (m, z, k) in upserts.items()]
        if not rows:
            return
        if self.engine.dialect.name == "sqlite":
            from sqlalchemy.dialects.sqlite import insert as sqlite_insert

            stmt = sqlite_insert(_FILES)
            stmt = stmt.on_conflict_do_update(
                index_elements=[_FILES.c.path],
                set_={"mtime_ns": stmt.excluded.mtime_ns, "size": stmt.excluded.size, "key": stmt.excluded.key})
            for i in range(0, len(rows), 5000):
                conn.execute(stmt, rows[i:i + 5000])
        else:
            conn.execute(_FILES.delete().where(_FILES.c.path.in_([r["path"] for r in rows])))
            conn.execute(_FILES.insert(), rows)

    def pending_count(self) -> int:
        """Distinct usable memories on disk (by key) that no run has trained on yet."""
        q = text(
            "SELECT COUNT(DISTINCT f.key) FROM memory_files AS f WHERE f.key IS NOT NULL AND NOT EXISTS "
            "(SELECT 1 FROM memories AS m WHERE m.key = f.key AND m.trained_run_id IS NOT NULL)"
        )
        with self.engine.connect() as conn:
            return int(conn.execute(q).scalar_one())

    def change_memory_file(self, path: str, info: tuple[int, int, str | None] | None) -> int:
        """Record one file's new (mtime, size, key), or its removal (None).

        Returns the change in ``pending_count()`` (-1, 0 or +1) so that the daemon can keep
        the count without holding every path and key in memory.
        """
        new_key = info[2] if info else None
        with self.engine.begin() as conn:
            old_key = conn.execute(select(_FILES.c.key).where(_FILES.c.path == path)).scalar()
            if info is None:
                conn.execute(_FILES.delete().where(_FILES.c.path == path))
            else:
                self._upsert_files(conn, {path: info})
            if old_key == new_key:
                return 0
            delta = 0
            if old_key and self._untrained_refs(conn, old_key, 0):
                delta -= 1
            if new_key and self._untrained_refs(conn, new_key, 1):
                delta += 1
            return delta

    @staticmethod
    def _untrained_refs(conn: Connection, key: str, refs: int) -> bool:
        """True if ``key`` is on exactly ``refs`` files and untrained (0: no longer pending; 1: newly)."""
        n = conn.execute(select(func.count()).select_from(_FILES).where(_FILES.c.key == key)).scalar_one()
        if n != refs:
            return False
        trained = conn.execute(select(MemoryEntry.key).where(
            MemoryEntry.key == key, MemoryEntry.trained_run_id.is_not(None))).first()
        return trained is None

    def drop_memory_files_under(self, folder: str) -> int:
        """Forget every file below ``folder`` (a folder moved away or deleted); returns how many."""
        prefix = folder.rstrip("/") + "/"
        # A range, not LIKE: paths may hold % and _.
        upper = prefix[:-1] + chr(ord("/") + 1)
        with self.engine.begin() as conn:
            res = conn.execute(_FILES.delete().where(_FILES.c.path >= prefix, _FILES.c.path < upper))
            return int(res.rowcount or 0)

    # Pods ------------------------------------------------------------------------------------
    def record_pod(self, pod_id: str, run_id: str | None, provider: str, name: str) -> None:
        with self.session() as s:
            if s.get(PodRecord, pod_id) is None:
                s.add(PodRecord(pod_id=pod_id, run_id=run_id, provider=provider, name=name))

    def pod_terminated(self, pod_id: str, note: str = "") -> None:
        with self.session() as s:
            row = s.get(PodRecord, pod_id)
            if row is not None and row.terminated_at is None:
                row.terminated_at, row.note = now(), note

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
