"""The database's tables (SQLAlchemy models), and the small helpers every part of the store uses.

Memory text never enters these tables: memories are known by their content key, and a run's
dataset lives in its run folder. (A file's path is kept while the file exists; its name holds a
slug of the text.) Secrets never enter them either.
"""

from __future__ import annotations

import json
import secrets
import time
from datetime import UTC, datetime
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
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from mhd.errors import MhdError
from mhd.states.model import ACTIVE_STATES, Outcome, RunState

# 2: runs.merge_attempts / merge_retry_at (a failed merge is retried, never retrained);
#    runs.eval_json / eval_decision (the quality gate's numbers and verdict).
# 3: runs.preemptions / on_demand / pod_interruptible / prior_billed_s / prior_cost_usd /
#    checkpoint_step, pods.cost_per_hr / interruptible / preempted (interruptible pods, issue 15).
# 4: tables lineage + forgotten, runs.purged_at / parent_run_id (lineage and forgetting, issue 14).
# Older databases are upgraded in place at start (added columns and tables only; see ``_migrate``).
SCHEMA_VERSION = 4


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
    # lineage: the run whose adapter this one started from (incremental), and when a forgotten
    # memory made mhd remove this run's files and model (the row and journal stay, as history)
    parent_run_id: Mapped[str | None] = mapped_column(String(40))
    purged_at: Mapped[float | None] = mapped_column(Float)
    # interruptible pods: a preempted run moves to a new pod; the budget of preemptions and the
    # on-demand fallback live here so that a restart resets neither. The pods already given up
    # are billed in prior_*, so the run's time and cost sum every pod it rented.
    preemptions: Mapped[int] = mapped_column(Integer, default=0)
    on_demand: Mapped[bool] = mapped_column(Boolean, default=False)
    pod_interruptible: Mapped[bool] = mapped_column(Boolean, default=False)
    prior_billed_s: Mapped[float] = mapped_column(Float, default=0.0)
    prior_cost_usd: Mapped[float] = mapped_column(Float, default=0.0)
    checkpoint_step: Mapped[int | None] = mapped_column(Integer)  # newest checkpoint kept here

    # Derived views ---------------------------------------------------------------------------
    @property
    def active(self) -> bool:
        return self.state in ACTIVE_STATES

    def pod_billed_s(self, at: float | None = None) -> float:
        """The current pod's time only."""
        if self.pod_started_at is None:
            return 0.0
        end = self.pod_stopped_at or at or now()
        return max(0.0, end - self.pod_started_at)

    def billed_s(self, at: float | None = None) -> float:
        return (self.prior_billed_s or 0.0) + self.pod_billed_s(at)

    def cost_usd(self, at: float | None = None) -> float:
        return (self.prior_cost_usd or 0.0) + (self.cost_per_hr or 0.0) * self.pod_billed_s(at) / 3600.0

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
    cost_per_hr: Mapped[float | None] = mapped_column(Float)
    interruptible: Mapped[bool] = mapped_column(Boolean, default=False)
    preempted: Mapped[bool] = mapped_column(Boolean, default=False)


class LineageRow(Base):
    """Which memory (by key) went into which run, and as what: ``train`` or ``heldout``.

    Written when the run's dataset is built, from the same records that go into its files. A
    model's memories are its run's ``train`` rows plus those of its parent run (incremental
    training starts from the parent's adapter). Metadata only: never the memory's text.
    """

    __tablename__ = "lineage"
    run_id: Mapped[str] = mapped_column(ForeignKey("runs.id"), primary_key=True)
    key: Mapped[str] = mapped_column(String(64), primary_key=True, index=True)
    role: Mapped[str] = mapped_column(String(8))
    mtype: Mapped[str | None] = mapped_column(String(32))
    mdate: Mapped[str | None] = mapped_column(String(40))


class ForgottenMemory(Base):
    """A memory its owner took back: file deleted, ``trainingConsent: false``, edited, or `mhd forget`.

    ``purged_at`` is set once no run folder and no model holds it any more. The row stays as
    the tombstone that keeps it out of every later dataset.
    """

    __tablename__ = "forgotten"
    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    reason: Mapped[str] = mapped_column(String(16))
    at: Mapped[float] = mapped_column(Float, default=now)
    purged_at: Mapped[float | None] = mapped_column(Float)


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
