"""The engine, sessions and schema (create, version check, in-place upgrade) that the store's parts share."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, event, inspect, text
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.orm import Session, sessionmaker

from mhd.store.tables import _META, SCHEMA_VERSION, Base, Meta, StoreError


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA busy_timeout=5000")
    cur.execute("PRAGMA foreign_keys=ON")
    # A deleted row's bytes are zeroed, not left in a free page: a purge must really remove.
    cur.execute("PRAGMA secure_delete=ON")
    cur.close()


class StoreBase:
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
