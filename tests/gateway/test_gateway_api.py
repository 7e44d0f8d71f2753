"""The inspection gateway on the embedded ONNX Runtime backend: real uvicorn on loopback, real
ONNX model (the toy contract model scores red patches), real HTTP through httpx."""

from __future__ import annotations

import asyncio
import base64
import io
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from onnx_fixtures import make_card, write_contract_model
from slsg.contract import model_path
from slsg_gateway.server import BackgroundGateway, free_port
from slsg_gateway.settings import Settings
from support import png_bytes

INSPECT_KEY, ADMIN_KEY = "inspect-secret", "admin-secret"
PATCH = (180, 40, 240, 100)  # x0, y0, x1, y1 of the red patch in a 300x200 frame


def frame(width: int = 300, height: int = 200, patch: tuple | None = None,
          colour: tuple = (255, 0, 0)) -> np.ndarray:
    pixels = np.full((height, width, 3), 128, np.uint8)
    if patch:
        x0, y0, x1, y1 = patch
        pixels[y0:y1, x0:x1] = colour
    return pixels


def encode(pixels: np.ndarray, fmt: str = "PNG", **kw) -> bytes:
    return png_bytes(pixels, fmt, **kw)


def metric_samples(text: str, name: str) -> list:
    return [s for fam in text_string_to_metric_families(text) for s in fam.samples if s.name == name]


@pytest.fixture(scope="module")
def repository(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("repo")
    write_contract_model(model_path(root, "toy", 1), make_card("toy", size=64))
    write_contract_model(model_path(root, "strict", 1), make_card("strict", size=64))
    return root


@pytest.fixture(scope="module")
def gateway(repository):
    settings = Settings(repository=repository, port=0, api_keys=[INSPECT_KEY], admin_keys=[ADMIN_KEY],
                        lines=["line-1"], thresholds={"strict": 0.6}, max_body_bytes=2_000_000,
                        max_pixels=4_000_000, batch_window_ms=20, max_batch_size=8)
    with BackgroundGateway(settings) as gw:
        yield gw


@pytest.fixture()
def client(gateway):
    with httpx.Client(base_url=gateway.url, headers={"X-API-Key": INSPECT_KEY}, timeout=30) as c:
        yield c


def post_image(client: httpx.Client, data: bytes, media: str = "image/png", model: str = "toy", **kw):
    headers = {"Content-Type": media, **kw.pop("headers", {})}
    return client.post(f"/v1/models/{model}/inspect", content=data, headers=headers, **kw)


def assert_error(response: httpx.Response, status: int, code: str) -> str:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and body["error"]["code"] == code and body["error"]["message"]
    return body["error"]["message"]


def test_normal_frame_is_not_anomalous(client):
    r = post_image(client, encode(frame()), headers={"X-Camera-Id": "cam-7", "X-Line-Id": "line-1"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == "toy" and body["version"] == 1
    assert body["score"] < 0.5 and body["is_anomalous"] is False and body["threshold"] == 0.5
    assert body["regions"] == [] and body["heatmap"] is None
    assert (body["image_width"], body["image_height"]) == (300, 200)
    assert (body["camera_id"], body["line_id"]) == ("cam-7", "line-1")
    t = body["timings"]
    assert min(t.values()) >= 0 and t["total_ms"] >= t["infer_ms"]


@pytest.mark.parametrize("fmt,media", [("PNG", "image/png"), ("JPEG", "image/jpeg"), ("BMP", "image/bmp"),
                                       ("TIFF", "image/tiff")])
def test_region_lands_on_painted_patch_in_original_pixels(client, fmt, media):
    r = post_image(client, encode(frame(patch=PATCH), fmt), media)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["is_anomalous"] is True and body["score"] > 0.85  # a raw score above 0.983: JPEG keeps it near 1
    assert len(body["regions"]) == 1
    region = body["regions"][0]
    box = region["box"]
    # one model pixel is 300/64 x 200/64 frame pixels; JPEG ringing may add one more
    for got, want in zip((box["x0"], box["y0"], box["x1"], box["y1"]), PATCH):
        assert abs(got - want) <= 10, (box, PATCH)
    assert region["peak"] > 0.9
    assert 0.7 * 60 * 60 <= region["area"] <= 1.5 * 60 * 60


def test_multipart_upload_gives_the_same_answer_as_raw_body(client):
    data = encode(frame(patch=PATCH))
    raw = post_image(client, data).json()
    multi = client.post("/v1/models/toy/inspect", files={"file": ("f.png", data, "image/png")}).json()
    assert multi["score"] == pytest.approx(raw["score"]) and multi["regions"] == raw["regions"]


def test_sensitivity_override_changes_the_decision(client):
    # redness 100/255 -> calibrated score ~0.58: anomalous at the default 0.5, normal at strict's 0.6
    data = encode(frame(patch=PATCH, colour=(200, 100, 100)))
    default, strict = post_image(client, data, model="toy").json(), post_image(client, data, model="strict").json()
    assert default["score"] == pytest.approx(strict["score"]) and 0.5 < default["score"] < 0.6
    assert default["is_anomalous"] is True and strict["is_anomalous"] is False
    assert (default["threshold"], strict["threshold"]) == (0.5, 0.6)


@pytest.mark.parametrize("mode", ["overlay", "map"])
def test_heatmap_png_has_frame_size_and_is_hot_at_the_patch(client, mode):
    body = post_image(client, encode(frame(patch=PATCH)), params={"heatmap": mode}).json()
    assert body["heatmap"]["mode"] == mode
    png = Image.open(io.BytesIO(base64.b64decode(body["heatmap"]["png_base64"])))
    assert png.format == "PNG" and png.size == (300, 200)
    pixels = np.asarray(png.convert("RGB")).astype(int)
    hot, cold = pixels[70, 210], pixels[150, 50]
    assert hot[0] > cold[0] + 60 and cold[2] > hot[2]  # red where anomalous, blue where normal


def test_heatmap_as_png_bytes_when_accept_is_image_png(client):
    r = post_image(client, encode(frame(patch=PATCH)), params={"heatmap": "overlay"},
                   headers={"Accept": "image/png"})
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(r.content)).size == (300, 200)
    assert r.headers["x-slsg-anomalous"] == "true" and float(r.headers["x-slsg-score"]) > 0.9


def test_batch_endpoint_keeps_order_and_reports_bad_items(client):
    files = [("files", ("ok.png", encode(frame()), "image/png")),
             ("files", ("bad.png", b"not an image", "image/png")),
             ("files", ("red.jpg", encode(frame(patch=PATCH), "JPEG"), "image/jpeg"))]
    r = client.post("/v1/models/toy/inspect:batch", files=files)
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert results[0]["is_anomalous"] is False and results[2]["is_anomalous"] is True
    assert results[1] == {"filename": "bad.png", "error": {"code": "not_an_image", "message": results[1]["error"]["message"]}}
    assert_error(client.post("/v1/models/toy/inspect:batch", content=encode(frame()),
                             headers={"Content-Type": "image/png"}), 415, "unsupported_media_type")
    assert_error(client.post("/v1/models/toy/inspect:batch", files={"other": ("a.png", b"x", "image/png")}),
                 400, "bad_multipart")


def _bomb_png() -> bytes:
    return encode(np.zeros((2000, 2500, 3), np.uint8))  # 5 Mpx, compresses to a few kB


@pytest.mark.parametrize("case,status,code", [
    ("not_an_image", 400, "not_an_image"),
    ("truncated_png", 400, "truncated_image"),
    ("truncated_jpeg", 400, "truncated_image"),
    ("zero_bytes", 400, "empty_body"),
    ("pixel_bomb", 413, "image_too_large"),
    ("body_too_large", 413, "payload_too_large"),
    ("wrong_content_type", 415, "unsupported_media_type"),
    ("unknown_model", 404, "model_not_found"),
])
def test_bad_input_gets_a_clear_4xx_and_service_keeps_serving(client, case, status, code):
    noisy = np.random.default_rng(0).integers(0, 255, (200, 300, 3), dtype=np.uint8)
    data, media, model = {
        "not_an_image": (b"hello, this is text", "image/png", "toy"),
        "truncated_png": (encode(noisy)[:5000], "image/png", "toy"),
        "truncated_jpeg": (encode(noisy, "JPEG")[:3000], "image/jpeg", "toy"),
        "zero_bytes": (b"", "image/png", "toy"),
        "pixel_bomb": (_bomb_png(), "image/png", "toy"),
        "body_too_large": (os.urandom(2_100_000), "image/png", "toy"),
        "wrong_content_type": (encode(frame()), "text/plain", "toy"),
        "unknown_model": (encode(frame()), "image/png", "no-such-model"),
    }[case]
    message = assert_error(post_image(client, data, media, model=model), status, code)
    if case == "unknown_model":
        assert "no-such-model" in message
    assert post_image(client, encode(frame())).status_code == 200


def test_api_keys(gateway):
    url, data = f"{gateway.url}/v1/models/toy/inspect", encode(frame())
    png = {"Content-Type": "image/png"}
    assert_error(httpx.post(url, content=data, headers=png), 401, "unauthorized")
    assert_error(httpx.post(url, content=data, headers={**png, "X-API-Key": "wrong"}), 403, "forbidden")
    assert httpx.post(url, content=data, headers={**png, "Authorization": f"Bearer {INSPECT_KEY}"}).status_code == 200
    load = f"{gateway.url}/v1/models/toy/load"
    assert_error(httpx.post(load), 401, "unauthorized")
    assert_error(httpx.post(load, headers={"X-API-Key": INSPECT_KEY}), 403, "forbidden")
    r = httpx.post(load, headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=30)
    assert r.status_code == 200 and r.json()["served_version"] == 1


def test_without_keys_inspect_is_open_and_admin_closed(repository):
    with BackgroundGateway(Settings(repository=repository, port=0)) as gw:
        assert httpx.post(f"{gw.url}/v1/models/toy/inspect", content=encode(frame()),
                          headers={"Content-Type": "image/png"}).status_code == 200
        message = assert_error(httpx.post(f"{gw.url}/v1/models/toy/load", headers={"X-API-Key": "x"}),
                               403, "forbidden")
        assert "SLSG_ADMIN_KEYS" in message


def test_model_listing_reads_the_card_from_the_model(client):
    body = client.get("/v1/models").json()
    assert body["backend"] == "embedded"
    toy = {m["name"]: m for m in body["models"]}["toy"]
    assert toy["versions"] == [1] and toy["served_version"] == 1 and toy["ready"] is True
    assert (toy["input_height"], toy["input_width"]) == (64, 64)
    assert toy["card"]["calibration"]["raw_threshold"] == pytest.approx(0.3) and toy["card"]["top_k"] == 16
    # 60 calibration images at a 1 % target: above all of them, 1 / 61 of normal images on average
    assert toy["card"]["calibration"]["expected_fpr"] == pytest.approx(1 / 61)
    assert toy["card"]["calibration"]["fpr_upper_90"] == pytest.approx(1 - 0.1 ** (1 / 60))  # 3.8 %


def test_health_and_readiness(client, tmp_path):
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["ready"] is True and "toy" in ready.json()["ready_models"]
    with BackgroundGateway(Settings(repository=tmp_path, port=0)) as empty:
        r = httpx.get(f"{empty.url}/readyz")
        assert r.status_code == 503 and r.json()["ready"] is False and r.json()["ready_models"] == []


def test_concurrent_requests_are_batched_and_metrics_are_labelled(gateway, client):
    data = encode(frame(patch=PATCH))

    async def burst() -> list[int]:
        async with httpx.AsyncClient(base_url=gateway.url, headers={"X-API-Key": INSPECT_KEY}, timeout=30) as ac:
            rs = await asyncio.gather(*(ac.post("/v1/models/toy/inspect", content=data, headers={
                "Content-Type": "image/png", "X-Line-Id": "line-1" if i % 2 else f"ad-hoc-{i}"}) for i in range(16)))
        return [r.status_code for r in rs]

    assert asyncio.run(burst()) == [200] * 16
    text = client.get("/metrics", headers={"X-API-Key": ADMIN_KEY}).text
    sizes = {s.labels.get("le"): s.value for s in metric_samples(text, "slsg_batch_size_bucket")
             if s.labels["model"] == "toy"}
    count = sizes["+Inf"]
    total = [s.value for s in metric_samples(text, "slsg_batch_size_sum") if s.labels["model"] == "toy"][0]
    assert total > count, "no batch held more than one image"
    decisions = {(s.labels["line"], s.labels["decision"]): s.value
                 for s in metric_samples(text, "slsg_decisions_total") if s.labels["model"] == "toy"}
    assert decisions[("line-1", "anomalous")] >= 8 and decisions[("other", "anomalous")] >= 8
    assert not any(line.startswith("ad-hoc") for line, _ in decisions)
    requests = {(s.labels["route"], s.labels["model"], s.labels["status"]): s.value
                for s in metric_samples(text, "slsg_requests_total")}
    assert requests[("/v1/models/{name}/inspect", "toy", "200")] >= 16
    version = [s for s in metric_samples(text, "slsg_model_version_info") if s.labels["model"] == "toy"]
    assert [(s.labels["version"], s.value) for s in version] == [("1", 1.0)]
    stages = {s.labels["stage"] for s in metric_samples(text, "slsg_stage_seconds_count")}
    assert stages == {"decode", "preprocess", "infer", "postprocess", "total"}
    assert metric_samples(text, "slsg_in_flight")[0].value == 0


def test_openapi_declares_every_route_and_typed_errors(client):
    spec = client.get("/openapi.json").json()
    paths = spec["paths"]
    for path in ("/v1/models/{name}/inspect", "/v1/models/{name}/inspect:batch", "/v1/models",
                 "/v1/models/{name}/load", "/v1/models/{name}/unload", "/healthz", "/readyz", "/metrics"):
        assert path in paths, path
    inspect = paths["/v1/models/{name}/inspect"]["post"]
    assert {"image/png", "image/jpeg", "multipart/form-data"} <= set(inspect["requestBody"]["content"])
    assert inspect["responses"]["200"]["content"]["application/json"]["schema"]["$ref"].endswith("InspectionResult")
    for status in ("400", "404", "413", "415", "503"):
        assert inspect["responses"][status]["content"]["application/json"]["schema"]["$ref"].endswith("ErrorResponse")


def test_settings_from_environment(monkeypatch):
    monkeypatch.setenv("SLSG_THRESHOLDS", '{"tray": 0.7}')
    monkeypatch.setenv("SLSG_API_KEYS", "a, b")
    monkeypatch.setenv("SLSG_LINES", '["l1", "l2"]')
    monkeypatch.setenv("SLSG_BACKEND", "triton")
    s = Settings()
    assert s.threshold_for("tray") == 0.7 and s.threshold_for("other") == 0.5
    assert s.api_keys == ["a", "b"] and s.lines == ["l1", "l2"] and s.backend == "triton"


def test_gateway_never_imports_torch_or_training():
    code = ("import sys; from slsg_gateway.app import create_app; from slsg_gateway.settings import Settings; "
            "import slsg_gateway.backends.embedded, slsg_gateway.backends.triton, slsg_gateway.commands.serve; "
            "create_app(Settings()); "
            "bad = [m for m in sys.modules if m == 'torch' or m.startswith(('torch.', 'slsg_train'))]; "
            "assert not bad, bad")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def test_slsg_serve_command_serves(repository):
    port = free_port()
    slsg = Path(sys.executable).with_name("slsg")
    env = {**os.environ, "SLSG_API_KEYS": INSPECT_KEY, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([str(slsg), "serve", "--repository", str(repository), "--port", str(port),
                             "--log-level", "warning"], env=env, stderr=subprocess.PIPE)
    try:
        deadline, ready = time.monotonic() + 60, None
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                ready = httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2)
                break
            except httpx.TransportError:
                time.sleep(0.2)
        assert ready is not None and ready.status_code == 200, proc.stderr.read().decode() if proc.poll() else ""
        r = httpx.post(f"http://127.0.0.1:{port}/v1/models/toy/inspect", content=encode(frame(patch=PATCH)),
                       headers={"Content-Type": "image/png", "X-API-Key": INSPECT_KEY})
        assert r.status_code == 200 and r.json()["is_anomalous"] is True
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def test_full_queue_refuses_at_once_with_429(repository):
    from slsg_gateway.backends.embedded import EmbeddedBackend
    from slsg_gateway.batching import MicroBatcher
    from slsg_gateway.errors import Overloaded
    from slsg_gateway.metrics import GatewayMetrics

    async def scenario() -> list:
        backend = EmbeddedBackend(Settings(repository=repository))
        await backend.start()
        batcher = MicroBatcher(backend, GatewayMetrics(), window_ms=50, max_batch=8, max_queue=3, max_concurrent=1)
        image = np.zeros((64, 64, 3), np.uint8)
        # all six are queued before the first batch runs: the first starts at once (idle model),
        # two wait for company, the rest find the queue full
        outcomes = await asyncio.gather(*(batcher.submit("toy", image) for _ in range(6)), return_exceptions=True)
        await batcher.close()
        await backend.close()
        return outcomes

    outcomes = asyncio.run(scenario())
    refused = [o for o in outcomes if isinstance(o, Overloaded)]
    served = [o for o in outcomes if not isinstance(o, BaseException)]
    assert len(served) == 3 and len(refused) == 3
    assert refused[0].status == 429 and refused[0].headers["Retry-After"] and "full" in refused[0].message
    assert all(s.version == 1 and s.anomaly_map.shape == (64, 64) for s in served)


def test_large_jpeg_is_decoded_in_draft_mode_with_the_same_content():
    from slsg_gateway.imaging import decode_frame

    data = encode(frame(1024, 768, patch=(512, 256, 768, 512)), "JPEG", quality=90)
    fast = decode_frame(data, (64, 64), max_pixels=10**7)
    full = decode_frame(data, (64, 64), max_pixels=10**7, draft_min_ratio=float("inf"))
    assert fast.draft is True and full.draft is False
    assert (fast.width, fast.height) == (full.width, full.height) == (1024, 768)  # original size, not the draft's
    assert fast.pixels.shape == full.pixels.shape == (64, 64, 3)
    assert np.abs(fast.pixels.astype(int) - full.pixels.astype(int)).mean() < 3
    assert fast.pixels[24, 40, 0] > 200 and fast.pixels[24, 40, 1] < 60  # the patch is still red
    # an overlay needs the frame at the heat map's size: drafted no further than that
    at_frame_size = decode_frame(data, (64, 64), max_pixels=10**7, preview_size=(1024, 768))
    assert at_frame_size.draft is False and at_frame_size.preview.size == (1024, 768)
    halved = decode_frame(data, (64, 64), max_pixels=10**7, preview_size=(512, 384))
    assert halved.draft is True and halved.preview.size == (512, 384) and halved.width == 1024
