"""The record store interface and the SQL both stores share; ``open_store(spec)`` picks one.

Rows live in one table ``inspections``; the stores differ in where frame and heat-map bytes go
(files next to the SQLite database, or a table in PostgreSQL) and in SQL parameter style.
"""

from __future__ import annotations

import hashlib
import json
import threading
from abc import ABC, abstractmethod
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any
from collections.abc import Iterator, Sequence

from slsg_gateway.imaging import heatmap_png
from slsg_gateway.records.model import (
    DECISIONS, REVIEW_STATES, VERDICTS, InspectionRecord, NewRecord, Page, RecordNotFound, Review, utc,
)

SCHEMA = """
CREATE TABLE IF NOT EXISTS inspections (
    id TEXT PRIMARY KEY,
    ts DOUBLE PRECISION NOT NULL,
    model TEXT NOT NULL,
    version INTEGER NOT NULL,
    line_id TEXT,
    camera_id TEXT,
    score DOUBLE PRECISION NOT NULL,
    threshold DOUBLE PRECISION NOT NULL,
    decision TEXT NOT NULL,
    regions TEXT NOT NULL,
    frame_sha256 TEXT NOT NULL,
    image_width INTEGER NOT NULL,
    image_height INTEGER NOT NULL,
    timings TEXT NOT NULL,
    frame_media_type TEXT,
    frame_bytes BIGINT NOT NULL DEFAULT 0,
    heatmap_bytes BIGINT NOT NULL DEFAULT 0,
    review_verdict TEXT,
    review_note TEXT,
    reviewer TEXT,
    reviewed_at DOUBLE PRECISION,
    gateway TEXT
);
CREATE INDEX IF NOT EXISTS inspections_ts ON inspections (ts);
CREATE INDEX IF NOT EXISTS inspections_model ON inspections (model, id);
CREATE INDEX IF NOT EXISTS inspections_line ON inspections (line_id, id);
CREATE INDEX IF NOT EXISTS inspections_pending ON inspections (decision, review_verdict, line_id);
"""

_COLUMNS = ("id, ts, model, version, line_id, camera_id, score, threshold, decision, regions, frame_sha256, "
            "image_width, image_height, timings, frame_media_type, heatmap_bytes, review_verdict, review_note, "
            "reviewer, reviewed_at")
_INSERT = ("INSERT INTO inspections (id, ts, model, version, line_id, camera_id, score, threshold, decision, "
           "regions, frame_sha256, image_width, image_height, timings, frame_media_type, frame_bytes, "
           "heatmap_bytes, gateway) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)")
MAX_PAGE = 500

_MAGIC = ((b"\x89PNG\r\n\x1a\n", "image/png"), (b"\xff\xd8", "image/jpeg"), (b"BM", "image/bmp"),
          (b"II*\x00", "image/tiff"), (b"MM\x00*", "image/tiff"))


def sniff_media_type(data: bytes) -> str:
    """The image media type from the first bytes (the gateway only accepts these formats)."""
    for magic, media in _MAGIC:
        if data.startswith(magic):
            return media
    return "application/octet-stream"


class StoredFiles:
    """Bytes to keep for one record (frame as received, heat-map PNG)."""

    def __init__(self, frame: bytes, heatmap: bytes) -> None:
        self.frame = frame
        self.heatmap = heatmap


def _prepare(record: NewRecord) -> tuple[tuple, StoredFiles | None]:
    """The row's values and, when kept, the files (hashing and PNG encoding: the writer thread's work)."""
    files = None
    media = None
    if record.anomaly_map is not None:
        h, w = record.anomaly_map.shape[-2:]
        files = StoredFiles(record.frame, heatmap_png(record.anomaly_map.reshape(h, w), (w, h)))
        media = sniff_media_type(record.frame)
    row = (record.id, record.ts, record.model, record.version, record.line_id, record.camera_id,
           float(record.score), float(record.threshold), "anomalous" if record.is_anomalous else "normal",
           json.dumps(record.regions), hashlib.sha256(record.frame).hexdigest(), record.image_width,
           record.image_height, json.dumps(record.timings), media, len(files.frame) if files else 0,
           len(files.heatmap) if files else 0, record.gateway)
    return row, files


def _epoch(value: datetime | float | None) -> float | None:
    if value is None or isinstance(value, (int, float)):
        return value
    if value.tzinfo is None:
        raise ValueError(f"time {value.isoformat()} has no time zone; give an aware datetime (e.g. UTC)")
    return value.timestamp()


def _check_choice(name: str, value: str | None, allowed: Sequence[str]) -> None:
    if value is not None and value not in allowed:
        raise ValueError(f"{name} {value!r} is not one of {', '.join(allowed)}")


@contextmanager
def committed(conn: Any, begin: str | None = None) -> Iterator[Any]:
    """A DB-API cursor on ``conn`` whose work is committed when the block ends, or rolled back when it
    raises; ``begin``: the statement that opens the transaction, where the driver does not."""
    cur = conn.cursor()
    if begin:
        cur.execute(begin)
    try:
        yield cur
    except BaseException:
        conn.rollback()
        raise
    else:
        conn.commit()
    finally:
        cur.close()


class RecordStore(ABC):
    """Inspection records. Thread-safe: the writer thread and request handlers share one store."""

    def __init__(self) -> None:
        self._lock = threading.RLock()

    # --- what each store provides -------------------------------------------------------------
    @abstractmethod
    @contextmanager
    def _transaction(self, write: bool = True) -> Iterator[Any]:
        """A cursor inside one transaction (committed on success, rolled back on error)."""

    @abstractmethod
    def _sql(self, text: str) -> str:
        """``text`` with ``?`` placeholders in this driver's parameter style."""

    @abstractmethod
    def _put_files(self, cur: Any, items: list[tuple[str, StoredFiles]]) -> None: ...

    @abstractmethod
    def _read_file(self, record_id: str, kind: str) -> bytes | None: ...

    @abstractmethod
    def _delete_files(self, cur: Any, ids: list[str]) -> None: ...

    def close(self) -> None:  # noqa: B027 - a store without a connection has nothing to release
        """Release the connection; the store is unusable afterwards."""

    @property
    @abstractmethod
    def description(self) -> str:
        """Where the records are (no passwords)."""

    # --- writing --------------------------------------------------------------------------------
    def add(self, records: Sequence[NewRecord]) -> None:
        """Store ``records`` (files first, so a row never points at missing bytes)."""
        prepared = [_prepare(r) for r in records]
        files = [(row[0], f) for row, f in prepared if f is not None]
        with self._transaction() as cur:
            if files:
                self._put_files(cur, files)
            cur.executemany(self._sql(_INSERT), [row for row, _ in prepared])

    def review(self, record_id: str, verdict: str, note: str = "", reviewer: str = "",
               at: datetime | float | None = None) -> InspectionRecord:
        """Record an operator's verdict (the latest review replaces an earlier one)."""
        _check_choice("verdict", verdict, VERDICTS)
        when = _epoch(at) if at is not None else datetime.now().timestamp()
        with self._transaction() as cur:
            cur.execute(self._sql("UPDATE inspections SET review_verdict = ?, review_note = ?, reviewer = ?, "
                                  "reviewed_at = ? WHERE id = ?"), (verdict, note or "", reviewer or "", when,
                                                                   record_id))
            if cur.rowcount == 0:
                raise RecordNotFound(record_id)
        record = self.get(record_id)
        if record is None:  # removed by retention in between
            raise RecordNotFound(record_id)
        return record

    # --- reading --------------------------------------------------------------------------------
    def query(self, *, model: str | None = None, line: str | None = None, camera: str | None = None,
              decision: str | None = None, review: str | None = None, since: datetime | float | None = None,
              until: datetime | float | None = None, stored: bool | None = None, version: int | None = None,
              limit: int = 50, cursor: str | None = None) -> Page:
        """Records matching every given filter, newest first, at most ``limit`` (<= 500) per page.

        ``review``: "pending" (anomalous, not reviewed), "reviewed", "defect" or "false_alarm";
        ``stored``: only records whose frame was kept (True) or not (False); ``since`` inclusive,
        ``until`` exclusive; ``cursor``: the previous page's ``next_cursor``.
        """
        _check_choice("decision", decision, DECISIONS)
        _check_choice("review state", review, REVIEW_STATES)
        if not 1 <= limit <= MAX_PAGE:
            raise ValueError(f"limit {limit} is outside 1..{MAX_PAGE}")
        where, params = [], []
        for column, value in (("model", model), ("line_id", line), ("camera_id", camera),
                              ("decision", decision), ("version", version)):
            if value is not None:
                where.append(f"{column} = ?")
                params.append(value)
        if review == "pending":
            where.append("decision = 'anomalous' AND review_verdict IS NULL")
        elif review == "reviewed":
            where.append("review_verdict IS NOT NULL")
        elif review is not None:
            where.append("review_verdict = ?")
            params.append(review)
        if stored is not None:
            where.append("frame_media_type IS NOT NULL" if stored else "frame_media_type IS NULL")
        for clause, value in (("ts >= ?", _epoch(since)), ("ts < ?", _epoch(until)), ("id < ?", cursor)):
            if value is not None:
                where.append(clause)
                params.append(value)
        sql = f"SELECT {_COLUMNS} FROM inspections"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += f" ORDER BY id DESC LIMIT {limit + 1}"
        rows = self._fetch(sql, params)
        records = [self._record(row) for row in rows[:limit]]
        return Page(records, records[-1].id if len(rows) > limit else None)

    def get(self, record_id: str) -> InspectionRecord | None:
        rows = self._fetch(f"SELECT {_COLUMNS} FROM inspections WHERE id = ?", [record_id])
        return self._record(rows[0]) if rows else None

    def frame(self, record_id: str) -> bytes | None:
        """The frame as the camera sent it (PNG, JPEG, BMP or TIFF), or None when not kept."""
        return self._read_file(record_id, "frame")

    def heatmap(self, record_id: str) -> bytes | None:
        """The coloured anomaly map as a PNG at the model's resolution, or None when not kept."""
        return self._read_file(record_id, "heatmap")

    def pending_by_line(self) -> dict[str | None, int]:
        """Anomalous verdicts not yet reviewed, per line id (None: no line given)."""
        rows = self._fetch("SELECT line_id, COUNT(*) FROM inspections WHERE decision = 'anomalous' "
                           "AND review_verdict IS NULL GROUP BY line_id", [])
        return {line: int(n) for line, n in rows}

    def review_counts(self) -> list[tuple[str, int, str, str, int]]:
        """(model, version, decision, verdict, count) over every reviewed record."""
        rows = self._fetch("SELECT model, version, decision, review_verdict, COUNT(*) FROM inspections "
                           "WHERE review_verdict IS NOT NULL GROUP BY model, version, decision, review_verdict "
                           "ORDER BY model, version, decision, review_verdict", [])
        return [(m, int(v), d, verdict, int(n)) for m, v, d, verdict, n in rows]

    def count(self) -> int:
        return int(self._fetch("SELECT COUNT(*) FROM inspections", [])[0][0])

    def stored_bytes(self) -> int:
        """Frame and heat-map bytes kept, in total."""
        rows = self._fetch("SELECT COALESCE(SUM(frame_bytes + heatmap_bytes), 0) FROM inspections", [])
        return int(rows[0][0])

    # --- retention ------------------------------------------------------------------------------
    def apply_retention(self, max_age_s: float | None, max_bytes: int | None, now: float | None = None) -> int:
        """Delete records older than ``max_age_s``, then the oldest kept files until the files take at most
        ``max_bytes`` (those records stay, without frame). Returns the records and file sets removed."""
        removed = 0
        if max_age_s is not None:
            cutoff = (datetime.now().timestamp() if now is None else now) - max_age_s
            with self._transaction() as cur:
                cur.execute(self._sql("SELECT id FROM inspections WHERE ts < ? AND frame_media_type IS NOT NULL"),
                            (cutoff,))
                self._delete_files(cur, [r[0] for r in cur.fetchall()])
                cur.execute(self._sql("DELETE FROM inspections WHERE ts < ?"), (cutoff,))
                removed += max(cur.rowcount, 0)
        if max_bytes is not None:
            removed += self._trim_files(max_bytes)
        return removed

    def _trim_files(self, max_bytes: int) -> int:
        excess = self.stored_bytes() - max_bytes
        if excess <= 0:
            return 0
        rows = self._fetch("SELECT id, frame_bytes + heatmap_bytes FROM inspections "
                           "WHERE frame_media_type IS NOT NULL ORDER BY id", [])
        victims = []
        for record_id, size in rows:
            if excess <= 0:
                break
            victims.append(record_id)
            excess -= int(size)
        with self._transaction() as cur:
            self._delete_files(cur, victims)
            cur.executemany(self._sql("UPDATE inspections SET frame_media_type = NULL, frame_bytes = 0, "
                                      "heatmap_bytes = 0 WHERE id = ?"), [(v,) for v in victims])
        return len(victims)

    # --- helpers --------------------------------------------------------------------------------
    def _fetch(self, sql: str, params: Sequence[Any]) -> list[tuple]:
        with self._transaction(write=False) as cur:
            cur.execute(self._sql(sql), tuple(params))
            return list(cur.fetchall())

    @staticmethod
    def _record(row: tuple) -> InspectionRecord:
        (rid, ts, model, version, line, camera, score, threshold, decision, regions, sha, width, height, timings,
         media, heatmap_bytes, verdict, note, reviewer, reviewed_at) = row
        review = (Review(verdict, note or "", reviewer or "", utc(reviewed_at)) if verdict is not None else None)
        return InspectionRecord(
            id=rid, time=utc(ts), model=model, version=int(version), line_id=line, camera_id=camera,
            score=float(score), threshold=float(threshold), decision=decision, regions=json.loads(regions),
            frame_sha256=sha, image_width=int(width), image_height=int(height), timings=json.loads(timings),
            frame_media_type=media, has_heatmap=int(heatmap_bytes) > 0, review=review)


def is_postgres_url(spec: str) -> bool:
    return spec.startswith(("postgresql://", "postgres://"))


def open_store(spec: str | Path) -> RecordStore:
    """The store ``spec`` names: a ``postgresql://`` URL, or a folder for the embedded store (created)."""
    text = str(spec).strip()
    if not text or text.lower() == "off":
        raise ValueError("no record store named: give a folder or a postgresql:// URL")
    if is_postgres_url(text):
        from slsg_gateway.records.postgres import PostgresStore

        return PostgresStore(text)
    from slsg_gateway.records.sqlite import SqliteStore

    return SqliteStore(Path(text))
