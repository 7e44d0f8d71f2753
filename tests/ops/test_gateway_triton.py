"""The gateway on the Triton backend against a real local Triton server (CPU, loopback):
inspection over gRPC and HTTP, explicit load of a new version, and fault handling
(Triton killed -> 503 + Retry-After and not ready; Triton back -> recovers by itself)."""

from __future__ import annotations

import logging
import shutil
import time

import httpx
import numpy as np
import onnxruntime as ort
import pytest

from onnx_fixtures import make_card, write_contract_model
from slsg.contract import INPUT_IMAGE, OUTPUT_SCORE, model_path
from slsg.triton_config import write_config
from slsg_gateway.imaging import decode_frame
from slsg_gateway.server import BackgroundGateway
from slsg_gateway.settings import Settings
from support import local_triton, png_bytes

pytestmark = pytest.mark.slow
ADMIN = {"X-API-Key": "admin-secret"}
PNG = {"Content-Type": "image/png"}
PATCH = (100, 30, 160, 90)


def frame_png(patch: tuple | None = PATCH) -> bytes:
    pixels = np.full((160, 240, 3), 128, np.uint8)
    if patch:
        x0, y0, x1, y1 = patch
        pixels[y0:y1, x0:x1] = (255, 0, 0)
    return png_bytes(pixels)


def ort_score(path, data: bytes, size: int) -> float:
    pixels = decode_frame(data, (size, size), max_pixels=10**8).pixels[None]
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return float(session.run([OUTPUT_SCORE], {INPUT_IMAGE: pixels})[0][0, 0])


@pytest.fixture(scope="module")
def repository(tmp_path_factory):
    root = tmp_path_factory.mktemp("triton_repo")
    card = make_card("toy", size=64)
    write_contract_model(model_path(root, "toy", 1), card)
    write_config(root, "toy", card, gpu=False, max_batch_size=8)
    time.sleep(0.5)  # LocalTriton publishes a version only once its files are 0.3 s old
    return root


@pytest.fixture(scope="module")
def triton(repository):
    with local_triton(repository, ["toy"]) as server:
        yield server


def gateway_settings(triton, protocol: str = "grpc") -> Settings:
    url = triton.grpc_url if protocol == "grpc" else triton.http_url
    return Settings(backend="triton", triton_url=url, triton_protocol=protocol, port=0, admin_keys=["admin-secret"],
                    triton_timeout_s=5.0, retry_after_s=1)


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_inspect_through_triton_matches_onnx_runtime(triton, repository, protocol):
    with BackgroundGateway(gateway_settings(triton, protocol)) as gw:
        listed = httpx.get(f"{gw.url}/v1/models").json()
        toy = {m["name"]: m for m in listed["models"]}["toy"]
        assert listed["backend"] == "triton" and toy["ready"] and toy["served_version"] == 1
        assert (toy["input_height"], toy["input_width"], toy["max_batch_size"]) == (64, 64, 8)
        assert toy["card"]["calibration"]["pixel_threshold"] == pytest.approx(0.3)
        for data in (frame_png(), frame_png(None)):
            r = httpx.post(f"{gw.url}/v1/models/toy/inspect", content=data, headers=PNG, timeout=30)
            assert r.status_code == 200, r.text
            body = r.json()
            assert body["version"] == 1
            assert body["score"] == pytest.approx(ort_score(model_path(repository, "toy", 1), data, 64), abs=1e-5)
        body_red = httpx.post(f"{gw.url}/v1/models/toy/inspect", content=frame_png(), headers=PNG).json()
        box = body_red["regions"][0]["box"]
        assert all(abs(g - w) <= 6 for g, w in zip((box["x0"], box["y0"], box["x1"], box["y1"]), PATCH))
        assert httpx.get(f"{gw.url}/readyz").json()["ready"] is True


def test_explicit_load_serves_a_new_version_and_a_failed_load_keeps_it(triton, repository):
    with BackgroundGateway(gateway_settings(triton)) as gw:
        data = frame_png()
        before = httpx.post(f"{gw.url}/v1/models/toy/inspect", content=data, headers=PNG).json()
        write_contract_model(model_path(repository, "toy", 2), make_card("toy", size=64, top_k=2048))
        triton.wait_synced()
        loaded = httpx.post(f"{gw.url}/v1/models/toy/load", headers=ADMIN, timeout=90)
        assert loaded.status_code == 200, loaded.text
        assert loaded.json()["served_version"] == 2
        after = httpx.post(f"{gw.url}/v1/models/toy/inspect", content=data, headers=PNG).json()
        assert after["version"] == 2 and after["score"] < before["score"]  # top-k over more pixels: lower score
        broken = model_path(repository, "toy", 3)
        broken.parent.mkdir()
        broken.write_bytes(b"not an onnx model")
        triton.wait_synced()
        try:
            failed = httpx.post(f"{gw.url}/v1/models/toy/load", headers=ADMIN, timeout=90)
            assert failed.status_code == 422 and failed.json()["error"]["code"] == "load_failed", failed.text
            assert "version 3" in failed.json()["error"]["message"]
            still = httpx.post(f"{gw.url}/v1/models/toy/inspect", content=data, headers=PNG)
            assert still.status_code == 200 and still.json()["version"] == 2, still.text
        finally:  # a broken version would stop the restarted server from loading the model
            shutil.rmtree(broken.parent)
            triton.wait_synced()


def test_triton_down_gives_503_and_gateway_recovers_by_itself(triton, caplog):
    caplog.set_level(logging.INFO, logger="slsg_gateway")
    with BackgroundGateway(gateway_settings(triton)) as gw:
        assert httpx.post(f"{gw.url}/v1/models/toy/inspect", content=frame_png(), headers=PNG).status_code == 200
        triton.kill()
        r = httpx.post(f"{gw.url}/v1/models/toy/inspect", content=frame_png(), headers=PNG, timeout=30)
        assert r.status_code == 503 and r.json()["error"]["code"] == "backend_unavailable", r.text
        assert int(r.headers["Retry-After"]) >= 1
        ready = httpx.get(f"{gw.url}/readyz", timeout=30)
        assert ready.status_code == 503 and ready.json()["backend_reachable"] is False
        assert httpx.get(f"{gw.url}/healthz").status_code == 200  # alive, just not ready
        errors = [line for line in httpx.get(f"{gw.url}/metrics").text.splitlines()
                  if line.startswith('slsg_backend_errors_total{kind="backend_unavailable",model="toy"}')]
        assert errors and float(errors[0].split()[-1]) >= 1
        triton.start()
        deadline, status = time.monotonic() + 60, None
        while time.monotonic() < deadline:
            status = httpx.post(f"{gw.url}/v1/models/toy/inspect", content=frame_png(), headers=PNG,
                                timeout=30).status_code
            if status == 200:
                break
            time.sleep(0.5)
        assert status == 200, "gateway did not recover after Triton came back"
        assert httpx.get(f"{gw.url}/readyz").json()["ready"] is True
    # one line when it went away (with the cause), one when it came back: not one per failed request
    events = [(r.fields["event"], r.fields.get("cause")) for r in caplog.records if hasattr(r, "fields")]
    assert [e for e, _ in events[:2]] == ["backend_unavailable", "backend_available"], events
    assert events[0][1], "the warning must say why Triton is unavailable"
