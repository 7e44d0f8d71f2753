"""The embedded store: SQLite in WAL mode plus a folder of files, nothing to install or run.

Layout under the store's folder: ``records.sqlite3`` and ``files/YYYY-MM-DD/<id>.frame`` /
``<id>.heatmap.png`` (the day of the record's time, so old days are easy to see and remove by hand).
Several processes on one machine may share the folder (WAL allows one writer and many readers).
"""

from __future__ import annotations

import sqlite3
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from collections.abc import Iterator

from slsg_gateway.records.model import record_time
from slsg_gateway.records.store import SCHEMA, RecordStore, StoredFiles, committed

_SUFFIX = {"frame": ".frame", "heatmap": ".heatmap.png"}


class SqliteStore(RecordStore):
    def __init__(self, folder: Path) -> None:
        super().__init__()
        self.folder = Path(folder)
        if self.folder.exists() and not self.folder.is_dir():
            raise ValueError(f"record store {self.folder} is a file, not a folder")
        self.files = self.folder / "files"
        self.files.mkdir(parents=True, exist_ok=True)
        self._conn = sqlite3.connect(self.folder / "records.sqlite3", timeout=30, check_same_thread=False,
                                     isolation_level=None)  # explicit BEGIN/COMMIT below
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=NORMAL")  # with WAL: consistent after a crash, fsync per checkpoint
        self._conn.executescript(SCHEMA)

    @property
    def description(self) -> str:
        return f"embedded store {self.folder}"

    @contextmanager
    def _transaction(self, write: bool = True) -> Iterator[Any]:
        # a writer takes the lock up front: upgrading a read transaction can fail without waiting
        with self._lock, committed(self._conn, "BEGIN IMMEDIATE" if write else "BEGIN") as cur:
            yield cur

    def _sql(self, text: str) -> str:
        return text

    def _path(self, record_id: str, kind: str) -> Path:
        day = time.strftime("%Y-%m-%d", time.gmtime(record_time(record_id)))
        return self.files / day / f"{record_id}{_SUFFIX[kind]}"

    def _put_files(self, cur: Any, items: list[tuple[str, StoredFiles]]) -> None:
        for record_id, files in items:
            for kind, data in (("frame", files.frame), ("heatmap", files.heatmap)):
                path = self._path(record_id, kind)
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(data)

    def _read_file(self, record_id: str, kind: str) -> bytes | None:
        try:
            path = self._path(record_id, kind)
        except ValueError:  # not a record id at all
            return None
        try:
            return path.read_bytes()
        except FileNotFoundError:
            return None

    def _delete_files(self, cur: Any, ids: list[str]) -> None:
        for record_id in ids:
            for kind in _SUFFIX:
                self._path(record_id, kind).unlink(missing_ok=True)

    def close(self) -> None:
        with self._lock:
            self._conn.close()
