"""Lineage (which memories are inside which run's model and files) and forgotten memories.

Keys and metadata only: a memory's text never enters these tables.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from sqlalchemy import delete, select, text, update

from mhd.store.base import StoreBase
from mhd.store.tables import ForgottenMemory, LineageRow, Run, now

TRAIN, HELDOUT = "train", "heldout"
LineageEntry = tuple[str, str, str | None, str | None]  # key, role, type, date


class LineageMixin(StoreBase):
    def record_lineage(self, run_id: str, rows: Iterable[LineageEntry]) -> int:
        """The run's memories, as its dataset was built (a rebuild replaces them)."""
        with self.session() as s:
            s.execute(delete(LineageRow).where(LineageRow.run_id == run_id))
            n = 0
            for key, role, mtype, mdate in rows:
                s.add(LineageRow(run_id=run_id, key=key, role=role, mtype=mtype, mdate=mdate))
                n += 1
            return n

    def lineage(self, run_id: str) -> list[LineageRow]:
        with self.session() as s:
            return list(s.scalars(select(LineageRow).where(LineageRow.run_id == run_id)
                                  .order_by(LineageRow.role.desc(), LineageRow.mdate, LineageRow.key)))

    def run_chain(self, run_id: str) -> list[str]:
        """The run, then the run its adapter started from, and so on (incremental training)."""
        chain: list[str] = []
        cur: str | None = run_id
        with self.session() as s:
            while cur is not None and cur not in chain:
                chain.append(cur)
                cur = s.scalar(select(Run.parent_run_id).where(Run.id == cur))
        return chain

    def model_keys(self, run_id: str) -> set[str]:
        """The memories inside the run's model: what it and its ancestors trained on."""
        chain = self.run_chain(run_id)
        with self.session() as s:
            return set(s.scalars(select(LineageRow.key).where(LineageRow.run_id.in_(chain),
                                                              LineageRow.role == TRAIN)))

    def chain_holding(self, keys: Iterable[str]) -> set[str]:
        """Unpurged runs that started from an ancestor's adapter holding any of ``keys``: their
        own lineage may lack the memory, but their weights carry it (``model_keys``)."""
        wanted = set(keys)
        if not wanted:
            return set()
        with self.session() as s:
            started = list(s.scalars(select(Run.id).where(Run.parent_run_id.is_not(None), Run.purged_at.is_(None))))
        return {r for r in started if self.model_keys(r) & wanted}

    def runs_with(self, key: str) -> list[LineageRow]:
        with self.session() as s:
            return list(s.scalars(select(LineageRow).where(LineageRow.key == key).order_by(LineageRow.run_id)))

    # Forgetting ---------------------------------------------------------------------------------
    def forget(self, reasons: Mapping[str, str]) -> list[str]:
        """Record memories as forgotten (``key → reason``); returns the keys that were not yet."""
        new: list[str] = []
        with self.session() as s:
            for key, reason in reasons.items():
                if s.get(ForgottenMemory, key) is None:
                    s.add(ForgottenMemory(key=key, reason=reason))
                    new.append(key)
        return new

    def forgotten(self) -> list[ForgottenMemory]:
        with self.session() as s:
            return list(s.scalars(select(ForgottenMemory).order_by(ForgottenMemory.at)))

    def forgotten_keys(self, *, pending_only: bool = False) -> set[str]:
        q = select(ForgottenMemory.key)
        if pending_only:
            q = q.where(ForgottenMemory.purged_at.is_(None))
        with self.session() as s:
            return set(s.scalars(q))

    def vanished_keys(self) -> list[str]:
        """Memories in some unpurged run that no file under memory_dir holds any more."""
        q = text(
            "SELECT DISTINCT l.key FROM lineage AS l JOIN runs AS r ON r.id = l.run_id "
            "WHERE r.purged_at IS NULL "
            "AND NOT EXISTS (SELECT 1 FROM memory_files AS f WHERE f.key = l.key) "
            "AND NOT EXISTS (SELECT 1 FROM forgotten AS g WHERE g.key = l.key)"
        )
        with self.engine.connect() as conn:
            return [str(k) for (k,) in conn.execute(q)]

    def unforget_returned(self) -> list[str]:
        """A deleted (or excluded) memory that is back on disk is the owner's again: no tombstone.

        Not for `mhd forget`: that one stays forgotten whatever the disk holds.
        """
        back = text("SELECT g.key FROM forgotten AS g WHERE g.reason != 'owner' AND EXISTS "
                    "(SELECT 1 FROM memory_files AS f WHERE f.key = g.key)")
        with self.engine.begin() as conn:
            keys = [str(k) for (k,) in conn.execute(back)]
            if keys:
                conn.execute(delete(ForgottenMemory).where(ForgottenMemory.key.in_(keys)))
        return keys

    def runs_holding(self, keys: Iterable[str]) -> dict[str, set[str]]:
        """Unpurged runs whose lineage has any of ``keys``: run id → the roles they had there."""
        wanted = list(set(keys))
        out: dict[str, set[str]] = {}
        with self.session() as s:
            for i in range(0, len(wanted), 500):
                q = (select(LineageRow.run_id, LineageRow.role).join(Run, Run.id == LineageRow.run_id)
                     .where(LineageRow.key.in_(wanted[i:i + 500]), Run.purged_at.is_(None)))
                for run_id, role in s.execute(q):
                    out.setdefault(run_id, set()).add(role)
        return out

    def forgotten_in(self, run_id: str, *, pending_only: bool = False) -> set[str]:
        """Forgotten memories inside the run's model (trained on by it or an ancestor)."""
        return self.model_keys(run_id) & self.forgotten_keys(pending_only=pending_only)

    def drop_lineage(self, run_id: str, keys: Iterable[str]) -> None:
        """The run keeps its model but no longer holds these (its eval files were scrubbed)."""
        wanted = list(keys)
        with self.session() as s:
            for i in range(0, len(wanted), 500):
                s.execute(delete(LineageRow).where(LineageRow.run_id == run_id,
                                                   LineageRow.key.in_(wanted[i:i + 500])))

    def mark_purged(self, run_id: str) -> None:
        with self.session() as s:
            s.execute(update(Run).where(Run.id == run_id).values(purged_at=now()))

    def resolve_forgotten(self) -> int:
        """Forgotten memories that no unpurged run holds any more are done with; returns how many."""
        q = text(
            "UPDATE forgotten SET purged_at = :t WHERE purged_at IS NULL AND NOT EXISTS "
            "(SELECT 1 FROM lineage AS l JOIN runs AS r ON r.id = l.run_id "
            " WHERE l.key = forgotten.key AND r.purged_at IS NULL)"
        )
        with self.engine.begin() as conn:
            return int(conn.execute(q, {"t": now()}).rowcount or 0)

    def compact(self) -> None:
        """After a purge: deleted rows' bytes leave the file and its WAL (secure_delete is on)."""
        if self.engine.dialect.name != "sqlite":
            return
        with self.engine.connect() as conn:
            conn.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")
