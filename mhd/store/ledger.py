"""The memories ledger (which memory a run trained) and the cache of memory files on disk."""

from __future__ import annotations

from collections.abc import Iterable

from sqlalchemy import func, select, text
from sqlalchemy.engine import Connection

from mhd.store.base import StoreBase
from mhd.store.tables import _FILES, MemoryEntry, now


class LedgerMixin(StoreBase):
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
        """Distinct usable memories on disk (by key) that no run has trained on yet (nor forgotten)."""
        q = text(
            "SELECT COUNT(DISTINCT f.key) FROM memory_files AS f WHERE f.key IS NOT NULL AND NOT EXISTS "
            "(SELECT 1 FROM memories AS m WHERE m.key = f.key AND m.trained_run_id IS NOT NULL) "
            "AND NOT EXISTS (SELECT 1 FROM forgotten AS g WHERE g.key = f.key)"
        )
        with self.engine.connect() as conn:
            return int(conn.execute(q).scalar_one())

    def memory_file_key(self, path: str) -> str | None:
        with self.engine.connect() as conn:
            key = conn.execute(select(_FILES.c.key).where(_FILES.c.path == path)).scalar()
            return str(key) if key else None

    def has_memory_files(self) -> bool:
        with self.engine.connect() as conn:
            return conn.execute(select(_FILES.c.path).where(_FILES.c.key.is_not(None)).limit(1)).first() is not None

    def paths_of(self, key: str) -> list[str]:
        """Where this memory is on disk now (as the last scan saw it)."""
        with self.engine.connect() as conn:
            return [str(p) for (p,) in conn.execute(select(_FILES.c.path).where(_FILES.c.key == key))]

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
