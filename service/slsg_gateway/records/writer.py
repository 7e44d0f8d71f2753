"""The background writer: inspections hand records to a bounded queue and never wait for storage.

A thread drains the queue in batches (one transaction each) and applies retention now and then.
When the queue is full, or its frames hold more than ``max_queue_bytes``, a record is dropped and
counted instead of slowing the inspection down; ``close()`` writes everything still queued.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass
from collections.abc import Callable

from slsg_gateway.records.model import NewRecord
from slsg_gateway.records.store import RecordStore

log = logging.getLogger(__name__)
_STOP = object()


@dataclass
class RetentionPolicy:
    max_age_s: float | None = 30 * 86400.0
    max_bytes: int | None = 10 * 1024**3
    interval_s: float = 60.0


class RecordWriter:
    """``submit(record)`` from any thread or the event loop; ``close()`` flushes and stops the thread.

    ``on_drop(reason)`` and ``on_written(count)`` let the gateway count drops and writes in its metrics.
    """

    def __init__(self, store: RecordStore, *, max_queue: int = 1000, max_queue_bytes: int = 256 * 1024**2,
                 max_batch: int = 64, retention: RetentionPolicy | None = None,
                 on_drop: Callable[[str], None] | None = None,
                 on_written: Callable[[int], None] | None = None) -> None:
        self.store = store
        self.max_queue_bytes = max_queue_bytes
        self.max_batch = max_batch
        self.retention = retention or RetentionPolicy()
        self._on_drop = on_drop or (lambda reason: None)
        self._on_written = on_written or (lambda n: None)
        self._queue: queue.Queue = queue.Queue(maxsize=max_queue)
        self._queued_bytes = 0
        self._bytes_lock = threading.Lock()
        self._closed = False
        self._next_retention = 0.0
        self._thread = threading.Thread(target=self._run, name="record-writer", daemon=True)
        self._thread.start()

    def submit(self, record: NewRecord) -> bool:
        """Queue ``record``; False (and counted as dropped) when the queue is full or closed."""
        if self._closed:
            self._on_drop("closed")
            return False
        size = len(record.frame)
        with self._bytes_lock:
            if self._queued_bytes + size > self.max_queue_bytes:
                self._on_drop("queue_full")
                return False
            self._queued_bytes += size
        try:
            self._queue.put_nowait(record)
        except queue.Full:
            self._release(size)
            self._on_drop("queue_full")
            return False
        return True

    def close(self, timeout_s: float = 30.0) -> None:
        """Write what is queued, then stop (a clean shutdown loses nothing)."""
        if self._closed:
            return
        self._closed = True
        self._queue.put(_STOP)  # blocks only while the queue is full, and the thread is draining it
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            log.warning("record writer did not finish within %.0f s; %d records left unwritten",
                        timeout_s, self._queue.qsize())

    @property
    def pending(self) -> int:
        return self._queue.qsize()

    def _release(self, size: int) -> None:
        with self._bytes_lock:
            self._queued_bytes -= size

    def _run(self) -> None:
        stop = False
        while not stop:
            try:
                first = self._queue.get(timeout=1.0)
            except queue.Empty:
                self._maybe_retain()
                continue
            batch = []
            item = first
            while True:
                if item is _STOP:
                    stop = True
                    break
                batch.append(item)
                if len(batch) >= self.max_batch:
                    break
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
            if batch:
                self._write(batch)
            self._maybe_retain()

    def _write(self, batch: list[NewRecord]) -> None:
        try:
            self.store.add(batch)
            self._on_written(len(batch))
        except Exception:  # storage trouble must not kill the writer: count and carry on
            log.exception("could not write %d inspection records to %s", len(batch), self.store.description)
            for _ in batch:
                self._on_drop("store_error")
        finally:
            self._release(sum(len(r.frame) for r in batch))

    def _maybe_retain(self) -> None:
        now = time.monotonic()
        if now < self._next_retention:
            return
        self._next_retention = now + self.retention.interval_s
        try:
            removed = self.store.apply_retention(self.retention.max_age_s, self.retention.max_bytes)
            if removed:
                log.info("record retention removed %d records or file sets", removed)
        except Exception:
            log.exception("record retention failed on %s", self.store.description)
