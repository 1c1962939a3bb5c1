"""Persistence: SQLAlchemy models and the few operations the daemon needs.

Transitions are compare-and-set (``UPDATE runs SET state=:new WHERE id=:id AND state=:expected``)
and are committed, with their journal row, before the new state's action begins. Everything
returned is a detached snapshot (``expire_on_commit=False``) so callers never hold a session.
Secrets never enter this database.

The parts, by role: ``tables`` (the schema), ``base`` (engine, sessions, upgrades), ``runs``
(runs, journal, progress), ``ledger`` (memories and memory files), ``lineage`` (which memories
each run holds; forgotten memories), ``registry`` (pods, models, events). ``Store`` is all of them.
"""

from __future__ import annotations

from mhd.store.ledger import LedgerMixin
from mhd.store.lineage import HELDOUT, TRAIN, LineageEntry, LineageMixin
from mhd.store.registry import RegistryMixin
from mhd.store.runs import RunsMixin
from mhd.store.tables import (
    PROGRESS_FIELDS,
    SCHEMA_VERSION,
    EventRecord,
    ForgottenMemory,
    LineageRow,
    MemoryEntry,
    MemoryFile,
    ModelRecord,
    PodRecord,
    ProgressPoint,
    Run,
    StoreError,
    Transition,
    new_run_id,
    now,
)


class Store(RunsMixin, LedgerMixin, LineageMixin, RegistryMixin):
    """The daemon's database (SQLite in practice)."""


__all__ = [
    "HELDOUT", "PROGRESS_FIELDS", "SCHEMA_VERSION", "TRAIN", "EventRecord", "ForgottenMemory", "LineageEntry",
    "LineageRow", "MemoryEntry", "MemoryFile", "ModelRecord",
    "PodRecord", "ProgressPoint", "Run", "Store", "StoreError", "Transition", "new_run_id", "now",
]
