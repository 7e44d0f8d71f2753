"""The record stores on their own (no web app): SQLite always, PostgreSQL from a real server."""

from __future__ import annotations

import io
import time
from datetime import datetime, UTC

import numpy as np
import pytest
from PIL import Image

from slsg_gateway.records import NewRecord, RecordNotFound, RecordWriter, new_record_id, open_store
from slsg_gateway.records.writer import RetentionPolicy
from support import png_bytes


def png(value: int = 128, size: int = 16) -> bytes:
    return png_bytes(np.full((size, size, 3), value, np.uint8))


def new_record(*, ts: float | None = None, model: str = "toy", line: str | None = "line-1", anomalous: bool = False,
               keep: bool = False, value: int = 128, version: int = 1) -> NewRecord:
    ts = time.time() if ts is None else ts
    amap = np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8) if keep else None
    return NewRecord(id=new_record_id(ts), ts=ts, model=model, version=version, line_id=line, camera_id="cam-a",
                     score=0.7 if anomalous else 0.2, threshold=0.5, is_anomalous=anomalous,
                     regions=[{"box": {"x0": 1, "y0": 2, "x1": 5, "y1": 6}, "peak": 0.8, "area": 16}] if anomalous
                     else [], image_width=16, image_height=16, timings={"total_ms": 1.5}, frame=png(value),
                     anomaly_map=amap)


@pytest.fixture(params=["sqlite", "postgres"])
def store(request, tmp_path):
    if request.param == "sqlite":
        s = open_store(tmp_path / "records")
    else:
        s = open_store(request.getfixturevalue("postgres_url"))
    yield s
    s.close()


def test_add_get_frame_and_review(store):
    kept, plain = new_record(anomalous=True, keep=True, value=200), new_record(value=10)
    store.add([kept, plain])
    got = store.get(kept.id)
    assert got.decision == "anomalous" and got.line_id == "line-1" and got.camera_id == "cam-a"
    assert got.regions[0]["box"]["x1"] == 5 and got.timings == {"total_ms": 1.5}
    assert got.frame_media_type == "image/png" and got.has_heatmap and got.review is None
    assert store.frame(kept.id) == kept.frame
    import hashlib
    assert got.frame_sha256 == hashlib.sha256(kept.frame).hexdigest()
    heat = Image.open(io.BytesIO(store.heatmap(kept.id)))
    assert heat.size == (8, 8)
    assert store.frame(plain.id) is None and store.heatmap(plain.id) is None and not store.get(plain.id).has_frame
    reviewed = store.review(kept.id, "false_alarm", note="glare", reviewer="anna")
    assert (reviewed.review.verdict, reviewed.review.note, reviewed.review.reviewer) == ("false_alarm", "glare", "anna")
    assert abs(reviewed.review.time.timestamp() - time.time()) < 60
    with pytest.raises(RecordNotFound):
        store.review("0" * 32, "defect")
    with pytest.raises(ValueError, match="verdict 'maybe'"):
        store.review(kept.id, "maybe")
    assert store.get("nonexistent") is None


def test_query_filters_and_paging(store):
    t0 = float(int(time.time()) - 1000)  # whole seconds: a datetime keeps only microseconds
    records = [new_record(ts=t0 + i, anomalous=i % 2 == 0, line=f"line-{i % 3}", model="a" if i < 6 else "b")
               for i in range(10)]
    store.add(records)
    store.review(records[0].id, "defect", reviewer="x")
    ids = lambda page: [r.id for r in page.records]  # noqa: E731
    assert ids(store.query(limit=100)) == [r.id for r in reversed(records)]
    assert ids(store.query(model="b")) == [r.id for r in reversed(records[6:])]
    assert ids(store.query(line="line-1")) == [records[i].id for i in (7, 4, 1)]
    assert ids(store.query(decision="normal", model="a")) == [records[i].id for i in (5, 3, 1)]
    assert ids(store.query(review="pending")) == [records[i].id for i in (8, 6, 4, 2)]
    assert ids(store.query(review="defect")) == [records[0].id]
    assert ids(store.query(since=datetime.fromtimestamp(t0 + 3, UTC), until=t0 + 5)) == \
        [records[4].id, records[3].id]
    first = store.query(limit=4)
    second = store.query(limit=4, cursor=first.next_cursor)
    third = store.query(limit=4, cursor=second.next_cursor)
    assert ids(first) + ids(second) + ids(third) == [r.id for r in reversed(records)]
    assert third.next_cursor is None
    assert store.pending_by_line() == {"line-2": 2, "line-1": 1, "line-0": 1}
    assert store.review_counts() == [("a", 1, "anomalous", "defect", 1)]
    with pytest.raises(ValueError, match="review state 'later'"):
        store.query(review="later")
    with pytest.raises(ValueError, match="no time zone"):
        store.query(since=datetime(2026, 1, 1))


def test_retention_by_age_and_size(store):
    now = time.time()
    old = new_record(ts=now - 3 * 86400, anomalous=True, keep=True)
    mid = [new_record(ts=now - 100 + i, anomalous=True, keep=True) for i in range(3)]
    store.add([old, *mid])
    assert store.apply_retention(max_age_s=86400, max_bytes=None) == 1
    assert store.get(old.id) is None and store.frame(old.id) is None
    one = len(mid[0].frame) + len(store.heatmap(mid[0].id))
    store.apply_retention(max_age_s=None, max_bytes=one + 1)  # room for the newest file set only
    assert [store.get(r.id).has_frame for r in mid] == [False, False, True]
    assert store.frame(mid[0].id) is None and store.frame(mid[2].id) == mid[2].frame
    assert store.stored_bytes() <= one + 1 and store.count() == 3


def test_writer_flushes_on_close_and_counts_drops(tmp_path):
    store = open_store(tmp_path / "records")
    drops: list[str] = []
    writer = RecordWriter(store, max_queue=10_000, on_drop=drops.append, retention=RetentionPolicy(None, None))
    records = [new_record(anomalous=i % 5 == 0, keep=i % 5 == 0) for i in range(300)]
    assert all(writer.submit(r) for r in records)
    writer.close()
    assert store.count() == 300 and drops == []
    assert not writer.submit(new_record()) and drops == ["closed"]
    store.close()


def test_writer_drops_when_the_queue_is_over_its_byte_budget(tmp_path):
    store = open_store(tmp_path / "records")
    drops: list[str] = []
    big = new_record()
    writer = RecordWriter(store, max_queue_bytes=len(big.frame) - 1, on_drop=drops.append)
    assert not writer.submit(big)
    writer.close()
    assert drops == ["queue_full"] and store.count() == 0
    store.close()


def test_open_store_names_bad_specs(tmp_path):
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(ValueError, match="is a file, not a folder"):
        open_store(tmp_path / "a_file")
    with pytest.raises(ValueError, match="no record store"):
        open_store("off")


def test_records_persist_across_reopen(tmp_path):
    store = open_store(tmp_path / "records")
    record = new_record(anomalous=True, keep=True)
    store.add([record])
    store.close()
    again = open_store(tmp_path / "records")
    assert again.get(record.id).has_frame and again.frame(record.id) == record.frame
    again.close()


def test_postgres_store_reconnects_after_its_connection_is_killed(postgres_url):
    import psycopg

    store = open_store(postgres_url)
    store.add([new_record()])
    with psycopg.connect(postgres_url, autocommit=True) as admin:  # what a server restart does to a session
        admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                      "WHERE datname = current_database() AND pid <> pg_backend_pid()")
    with pytest.raises(psycopg.OperationalError):
        store.count()  # the call that finds the connection dead fails ...
    store.add([new_record()])  # ... the next one reconnects
    assert store.count() == 2
    store.close()
