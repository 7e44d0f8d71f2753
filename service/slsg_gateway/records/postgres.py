"""The PostgreSQL store: rows and files in one database, for several gateway replicas.

Frames and heat maps go into ``inspection_files`` (``bytea``), so every replica reads what any other
wrote. Needs the ``psycopg`` driver (``pip install 'psycopg[binary]'``). Schema creation takes an
advisory lock, so replicas starting together do not race.
"""

from __future__ import annotations

import re
from contextlib import contextmanager
from typing import Any
from collections.abc import Iterator

from slsg_gateway.records.store import SCHEMA, RecordStore, StoredFiles, committed

_FILES_SCHEMA = """
CREATE TABLE IF NOT EXISTS inspection_files (
    id TEXT NOT NULL,
    kind TEXT NOT NULL,
    data BYTEA NOT NULL,
    PRIMARY KEY (id, kind)
)
"""
_SCHEMA_LOCK = 0x51_56_25  # any constant shared by every replica


def _redact(url: str) -> str:
    return re.sub(r"://([^:/@]+):[^@]*@", r"://\1:***@", url)


class PostgresStore(RecordStore):
    def __init__(self, url: str) -> None:
        super().__init__()
        try:
            import psycopg
        except ImportError:
            raise RuntimeError("a postgresql:// record store needs the psycopg driver: "
                               "pip install 'psycopg[binary]'") from None
        self.url = url
        self._psycopg = psycopg
        self._conn = self._connect()
        with self._transaction() as cur:
            cur.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK,))
            for statement in (*SCHEMA.split(";"), _FILES_SCHEMA):
                if statement.strip():
                    cur.execute(statement)

    def _connect(self) -> Any:
        try:
            return self._psycopg.connect(self.url, autocommit=False, connect_timeout=10)
        except self._psycopg.OperationalError as exc:
            raise RuntimeError(f"cannot connect to the record store {_redact(self.url)}: {exc}") from None

    @property
    def description(self) -> str:
        return f"PostgreSQL store {_redact(self.url)}"

    @contextmanager
    def _transaction(self, write: bool = True) -> Iterator[Any]:
        with self._lock:
            if self._conn.broken:  # the server restarted or the network dropped: a new connection
                self._conn = self._connect()
            with committed(self._conn) as cur:
                yield cur

    def _sql(self, text: str) -> str:
        return text.replace("?", "%s")

    def _put_files(self, cur: Any, items: list[tuple[str, StoredFiles]]) -> None:
        cur.executemany("INSERT INTO inspection_files (id, kind, data) VALUES (%s, %s, %s)",
                        [(rid, kind, data) for rid, f in items
                         for kind, data in (("frame", f.frame), ("heatmap", f.heatmap))])

    def _read_file(self, record_id: str, kind: str) -> bytes | None:
        rows = self._fetch("SELECT data FROM inspection_files WHERE id = ? AND kind = ?", [record_id, kind])
        return bytes(rows[0][0]) if rows else None

    def _delete_files(self, cur: Any, ids: list[str]) -> None:
        if ids:
            cur.execute("DELETE FROM inspection_files WHERE id = ANY(%s)", (ids,))

    def close(self) -> None:
        with self._lock:
            self._conn.close()
