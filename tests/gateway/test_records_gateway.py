"""Inspection records through real gateway processes (``slsg serve`` on loopback, embedded ONNX backend):
every answer's record survives a restart, with its frame; the same with PostgreSQL and two gateways."""

from __future__ import annotations

import concurrent.futures
import os
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from collections.abc import Iterator

import httpx
import pytest
from PIL import Image

from support import free_ports
from onnx_fixtures import make_card, write_contract_model
from slsg.contract import model_path
from slsg_gateway.records import open_store
from slsg_gateway.server import BackgroundGateway
from slsg_gateway.settings import Settings
from test_gateway_api import PATCH, encode, frame, metric_samples

KEY = "line-operator-key"
SCRAPE = {"X-API-Key": "prometheus-key"}  # /metrics is closed once API keys are set: Prometheus's own key


@pytest.fixture(scope="module")
def repository(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("repo")
    write_contract_model(model_path(root, "toy", 1), make_card("toy", size=64))
    return root


@contextmanager
def gateway_process(repository: Path, records: str, port: int, **env: str) -> Iterator[str]:
    """``slsg serve`` in its own process; stopped with SIGTERM (a clean shutdown) on exit."""
    slsg = Path(sys.executable).with_name("slsg")
    environ = {**os.environ, "SLSG_API_KEYS": KEY, "SLSG_LINES": "line-1,line-2", "OMP_NUM_THREADS": "1",
               "SLSG_RECORDS_NORMAL_SAMPLE": "0", "SLSG_METRICS_KEYS": SCRAPE["X-API-Key"], **env}
    proc = subprocess.Popen([str(slsg), "serve", "--repository", str(repository), "--port", str(port),
                             "--records", records, "--log-level", "warning"], env=environ, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline, "gateway did not become ready in 60 s"
            try:
                if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        # uvicorn shuts down gracefully, then re-raises the SIGTERM it caught
        assert proc.wait(timeout=30) in (0, -15), proc.stderr.read().decode()


def inspect(url: str, i: int) -> tuple[dict, bytes]:
    """Frame ``i``: every third anomalous (a red patch), line-1/line-2 alternating; distinct bytes each."""
    pixels = frame(patch=PATCH if i % 3 == 0 else None)
    pixels[0, 0] = (i % 256, i // 256, 7)  # distinct frames, distinct hashes
    data = encode(pixels)
    r = httpx.post(url + "/v1/models/toy/inspect", content=data, timeout=30,
                   headers={"Content-Type": "image/png", "X-API-Key": KEY, "X-Line-Id": f"line-{1 + i % 2}",
                            "X-Camera-Id": "cam-7"})
    assert r.status_code == 200, r.text
    return r.json(), data


def all_records(url: str, **params) -> list[dict]:
    out, cursor = [], None
    while True:
        r = httpx.get(url + "/v1/inspections", params={**params, "limit": 7, **({"cursor": cursor} if cursor else {})},
                      headers={"X-API-Key": KEY})
        assert r.status_code == 200, r.text
        out += r.json()["records"]
        cursor = r.json()["next_cursor"]
        if cursor is None:
            return out


def check_frames(url: str, sent: dict[str, tuple[dict, bytes]]) -> None:
    """Every anomalous verdict's frame comes back byte for byte with a heat map; normal ones are not kept."""
    for rid, (answer, data) in sent.items():
        f = httpx.get(f"{url}/v1/inspections/{rid}/frame", headers={"X-API-Key": KEY})
        h = httpx.get(f"{url}/v1/inspections/{rid}/heatmap", headers={"X-API-Key": KEY})
        if answer["is_anomalous"]:
            assert f.status_code == 200 and f.content == data and f.headers["content-type"] == "image/png"
            assert h.status_code == 200 and Image.open(__import__("io").BytesIO(h.content)).size == (64, 64)
        else:
            assert f.status_code == 404 and f.json()["error"]["code"] == "frame_not_stored"


def test_every_inspection_is_recorded_and_survives_a_restart(repository, tmp_path):
    records = str(tmp_path / "records")
    port = free_ports(1)[0]
    with gateway_process(repository, records, port) as url:
        sent = {}
        for i in range(14):
            answer, data = inspect(url, i)
            sent[answer["id"]] = (answer, data)
    assert len(sent) == 14 and all(len(rid) == 32 for rid in sent)
    with gateway_process(repository, records, port) as url:
        listed = all_records(url)
        assert [r["id"] for r in listed] == sorted(sent, reverse=True)  # newest first, every one
        by_id = {r["id"]: r for r in listed}
        for rid, (answer, _) in sent.items():
            rec = by_id[rid]
            assert (rec["score"], rec["decision"] == "anomalous", rec["line_id"], rec["camera_id"]) == \
                (answer["score"], answer["is_anomalous"], answer["line_id"], "cam-7")
            assert rec["regions"] == answer["regions"] and rec["version"] == 1
            assert rec["frame_stored"] == answer["is_anomalous"]
        check_frames(url, sent)
        flagged = [rid for rid, (a, _) in sent.items() if a["is_anomalous"]]
        assert {r["id"] for r in all_records(url, review="pending")} == set(flagged)
        assert {r["id"] for r in all_records(url, line="line-2", decision="anomalous")} == \
            {rid for rid in flagged if sent[rid][0]["line_id"] == "line-2"}

        r = httpx.post(f"{url}/v1/inspections/{flagged[0]}/review", json={"verdict": "false_alarm", "note": "glare"},
                       headers={"X-API-Key": KEY})
        assert r.status_code == 200 and r.json()["review"]["verdict"] == "false_alarm"
        assert r.json()["review"]["reviewer"].startswith("key-") and KEY not in r.text
        r = httpx.post(f"{url}/v1/inspections/{flagged[1]}/review",
                       json={"verdict": "defect", "reviewer": "anna"}, headers={"X-API-Key": KEY})
        assert r.json()["review"]["reviewer"] == "anna"
        assert len(all_records(url, review="pending")) == len(flagged) - 2
        text = httpx.get(url + "/metrics", headers=SCRAPE).text
        pending = {s.labels["line"]: s.value for s in metric_samples(text, "slsg_review_pending")}
        assert sum(pending.values()) == len(flagged) - 2
        reviewed = {(s.labels["decision"], s.labels["verdict"]): s.value
                    for s in metric_samples(text, "slsg_reviewed_inspections")}
        assert reviewed == {("anomalous", "false_alarm"): 1, ("anomalous", "defect"): 1}
        assert [s.value for s in metric_samples(text, "slsg_reviews_total")] == [1.0, 1.0]


def test_records_and_reviews_need_the_inspection_key(repository, tmp_path):
    settings = Settings(repository=repository, port=0, api_keys=[KEY], records=str(tmp_path / "r"))
    with BackgroundGateway(settings) as gw:
        assert httpx.get(gw.url + "/v1/inspections").status_code == 401
        assert httpx.get(gw.url + "/v1/inspections", headers={"X-API-Key": "wrong"}).status_code == 403
        r = httpx.post(gw.url + "/v1/inspections/" + "0" * 32 + "/review", json={"verdict": "defect"},
                       headers={"X-API-Key": KEY})
        assert r.status_code == 404 and r.json()["error"]["code"] == "inspection_not_found"
        r = httpx.post(gw.url + "/v1/inspections/" + "0" * 32 + "/review", json={"verdict": "maybe"},
                       headers={"X-API-Key": KEY})
        assert r.status_code == 422 and "verdict" in r.json()["error"]["message"]
        r = httpx.get(gw.url + "/v1/inspections", params={"since": "2026-01-01T00:00:00"},
                      headers={"X-API-Key": KEY})
        assert r.status_code == 400 and "time zone" in r.json()["error"]["message"]


def test_records_off_answers_without_id_and_the_api_says_so(repository):
    settings = Settings(repository=repository, port=0, records="off")
    with BackgroundGateway(settings) as gw:
        r = httpx.post(gw.url + "/v1/models/toy/inspect", content=encode(frame()),
                       headers={"Content-Type": "image/png"})
        assert r.status_code == 200 and r.json()["id"] is None
        r = httpx.get(gw.url + "/v1/inspections")
        assert r.status_code == 404 and r.json()["error"]["code"] == "records_off"


def test_two_gateways_share_one_postgresql_store(repository, postgres_url):
    ports = free_ports(2)
    with gateway_process(repository, postgres_url, ports[0]) as a, \
            gateway_process(repository, postgres_url, ports[1]) as b:
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            results = list(pool.map(lambda i: inspect((a, b)[i % 2], i), range(24)))
        sent = {answer["id"]: (answer, data) for answer, data in results}
        flagged = next(rid for rid, (ans, _) in sent.items() if ans["is_anomalous"])
        # a review through one gateway is seen through the other
        httpx.post(f"{a}/v1/inspections/{flagged}/review", json={"verdict": "defect"}, headers={"X-API-Key": KEY})
    assert len(sent) == 24
    with gateway_process(repository, postgres_url, ports[1]) as b:
        assert {r["id"] for r in all_records(b)} == set(sent)
        check_frames(b, sent)
        assert httpx.get(f"{b}/v1/inspections/{flagged}", headers={"X-API-Key": KEY}).json()["review"]["verdict"] \
            == "defect"
    store = open_store(postgres_url)  # the reading API, without a gateway
    assert store.count() == 24 and store.frame(flagged) == sent[flagged][1]
    store.close()


def test_the_api_answers_every_field_of_a_stored_record():
    import dataclasses
    from datetime import datetime, UTC

    from slsg_gateway.api.routes.inspections import RENAMED_FIELDS, record_out
    from slsg_gateway.records.model import InspectionRecord, Review
    from slsg_gateway.schemas import InspectionRecordOut

    names = {RENAMED_FIELDS.get(f.name, f.name) for f in dataclasses.fields(InspectionRecord)}
    assert names | {"frame_stored"} == set(InspectionRecordOut.model_fields)  # a new field needs its API twin
    when = datetime(2026, 12, 7, tzinfo=UTC)
    record = InspectionRecord(
        id="0" * 32, time=when, model="toy", version=2, line_id="l1", camera_id=None, score=0.7, threshold=0.5,
        decision="anomalous", regions=[{"box": {"x0": 1, "y0": 2, "x1": 3, "y1": 4}, "peak": 0.9, "area": 4}],
        frame_sha256="ab" * 32, image_width=64, image_height=48, timings={"model_ms": 1.5},
        frame_media_type="image/png", has_heatmap=False, review=Review("defect", "dent", "ann", when))
    out = record_out(record).model_dump()
    assert (out["frame_stored"], out["heatmap_stored"], out["frame_media_type"]) == (True, False, "image/png")
    assert out["review"] == {"verdict": "defect", "note": "dent", "reviewer": "ann", "time": when}
    assert out["regions"][0]["box"] == {"x0": 1, "y0": 2, "x1": 3, "y1": 4} and out["line_id"] == "l1"
    assert record_out(dataclasses.replace(record, review=None, frame_media_type=None)).frame_stored is False
