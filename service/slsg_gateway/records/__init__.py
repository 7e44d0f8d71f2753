"""Inspection records: every verdict the gateway gives, kept for traceability and review.

A record holds the inspection's id, time, model, version, line, camera, score, threshold, decision,
regions, frame hash and timings; the frame and its heat map are kept for every anomalous verdict and a
sample of normal ones. Two stores implement one interface:

- embedded (the default): a folder with ``records.sqlite3`` (SQLite in WAL mode) and ``files/``;
- PostgreSQL (``postgresql://`` URL): rows and files in the database, shared by several gateways.

Stable API (other code, e.g. ``slsg dataset from-reviews`` and ``slsg promote``, may rely on it; it
needs neither the web app nor torch)::

    from slsg_gateway.records import open_store
    store = open_store("gateway-data/records")           # or "postgresql://user@host/db"
    page = store.query(model="tray", review="defect", stored=True, limit=100)
    for record in page.records:                           # InspectionRecord, newest first
        png = store.frame(record.id)                      # original frame bytes or None
        heat = store.heatmap(record.id)                   # heat-map PNG (model resolution) or None
    page = store.query(..., cursor=page.next_cursor)      # the next (older) page
    store.review(record.id, "false_alarm", note="glare", reviewer="anna")
    store.close()

Stable: ``open_store``, ``RecordStore.query/get/frame/heatmap/review/close``, the fields of
``InspectionRecord``, ``Review``, ``Page``, ``VERDICTS``, ``REVIEW_STATES`` and the meaning of record
ids (32 hex characters, the first 12 the creation time in ms, so they sort by time). Internal (may
change): the table layout, the file layout, ``RecordWriter`` and ``NewRecord``.
"""

from slsg_gateway.records.model import (
    DECISIONS, REVIEW_STATES, VERDICTS, InspectionRecord, NewRecord, Page, RecordNotFound, Review, new_record_id,
)
from slsg_gateway.records.store import RecordStore, open_store
from slsg_gateway.records.writer import RecordWriter

__all__ = [
    "DECISIONS", "REVIEW_STATES", "VERDICTS", "InspectionRecord", "NewRecord", "Page", "RecordNotFound", "Review",
    "RecordStore", "RecordWriter", "new_record_id", "open_store",
]
