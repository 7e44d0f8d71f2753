"""Camera formats and bounded work at a real gateway (uvicorn on loopback, embedded ONNX Runtime).

Two toy contract models: ``toy`` scores redness and its card says it was trained on colour images;
``bright`` scores brightness, so a frame wrongly decoded as white is flagged, as a 16-bit grey
frame was before the shared decoding rule.
"""

from __future__ import annotations

import asyncio
import base64
import io

import httpx
import numpy as np
import pytest
from PIL import Image, PngImagePlugin
from pydantic import ValidationError

from onnx_fixtures import make_card, write_contract_model
from slsg.contract import Calibration, model_path
from slsg.image_modes import COLOUR
from slsg_gateway.limits import DecodeBudget
from slsg_gateway.server import BackgroundGateway
from slsg_gateway.settings import Settings

INSPECT_KEY, ADMIN_KEY, METRICS_KEY = "station-key", "admin-key", "scrape-key"
BRIGHT_CALIBRATION = Calibration(raw_threshold=0.9, score_min=0.0, pixel_threshold=0.9,
                                 num_images=60, score_median=0.5)


@pytest.fixture(scope="module")
def repository(tmp_path_factory):
    root = tmp_path_factory.mktemp("inputs_repo")
    write_contract_model(model_path(root, "toy", 1), make_card("toy", size=64, image_colour=COLOUR))
    write_contract_model(model_path(root, "bright", 1), make_card("bright", size=64, calibration=BRIGHT_CALIBRATION),
                         signal="brightness")
    return root


def settings_for(repository, **kw) -> Settings:
    base = dict(repository=repository, port=0, api_keys=[INSPECT_KEY], admin_keys=[ADMIN_KEY],
                metrics_keys=[METRICS_KEY], heatmap_max_side=128, batch_window_ms=2)
    return Settings(**{**base, **kw})


@pytest.fixture(scope="module")
def gateway(repository):
    with BackgroundGateway(settings_for(repository)) as gw:
        yield gw


@pytest.fixture()
def client(gateway):
    with httpx.Client(base_url=gateway.url, headers={"X-API-Key": INSPECT_KEY}, timeout=60) as c:
        yield c


def png(array: np.ndarray, sbit: int | None = None) -> bytes:
    info = None
    if sbit is not None:
        info = PngImagePlugin.PngInfo()
        info.add(b"sBIT", bytes([sbit]))
    out = io.BytesIO()
    Image.fromarray(array).save(out, format="PNG", **({"pnginfo": info} if info else {}))
    return out.getvalue()


def inspect(client: httpx.Client, data: bytes, model: str = "toy", media: str = "image/png", **params):
    return client.post(f"/v1/models/{model}/inspect", content=data, headers={"Content-Type": media}, params=params)


def test_sixteen_bit_grey_png_is_scaled_by_its_depth_not_flagged_as_white(client):
    deep = np.full((120, 160), 30000, np.uint16)
    r16 = inspect(client, png(deep), "bright")
    assert r16.status_code == 200, r16.text
    eight_bit = np.full((120, 160), round(30000 / 65535 * 255), np.uint8)  # 117: the same frame at 8 bits
    r8 = inspect(client, png(eight_bit), "bright").json()
    white = inspect(client, png(np.full((120, 160), 255, np.uint8)), "bright").json()
    assert white["is_anomalous"] and white["score"] > 0.9  # what the 16-bit frame got when decoded as white
    assert r16.json()["is_anomalous"] is False and r16.json()["score"] == pytest.approx(r8["score"], abs=1e-6)


def test_twelve_bit_data_in_a_sixteen_bit_png_uses_sbit(client):
    raw12 = np.full((120, 160), 1800, np.uint16)  # a 12-bit camera's value: 1800 / 4095 of full scale
    same_8 = np.full((120, 160), round(1800 / 4095 * 255), np.uint8)
    with_sbit = inspect(client, png(raw12, sbit=12), "bright").json()
    assert with_sbit["score"] == pytest.approx(inspect(client, png(same_8), "bright").json()["score"], abs=1e-6)
    without = inspect(client, png(raw12), "bright").json()  # read as 16-bit: far darker
    assert without["score"] < with_sbit["score"]


def test_greyscale_frame_to_a_colour_model_gets_a_warning(client):
    grey = np.full((120, 160), 128, np.uint8)
    warned = inspect(client, png(grey), "toy").json()
    assert len(warned["warnings"]) == 1 and "greyscale" in warned["warnings"][0] and "'toy'" in warned["warnings"][0]
    assert inspect(client, png(np.stack([grey] * 3, axis=2)), "toy").json()["warnings"] == []
    assert inspect(client, png(grey), "bright").json()["warnings"] == []  # its card does not say colour


def test_a_mode_without_a_rule_is_refused_with_the_reason(client):
    out = io.BytesIO()
    Image.new("LAB", (120, 100)).save(out, format="TIFF")
    r = inspect(client, out.getvalue(), media="image/tiff")
    assert r.status_code == 400 and r.json()["error"]["code"] == "unsupported_image_mode"
    assert "'LAB'" in r.json()["error"]["message"]


def test_heat_map_is_at_most_the_configured_size_and_regions_stay_in_frame_pixels(client):
    pixels = np.full((800, 1200, 3), 128, np.uint8)
    pixels[200:400, 600:900] = (255, 0, 0)
    body = inspect(client, png(pixels), heatmap="overlay").json()
    assert (body["image_width"], body["image_height"]) == (1200, 800)
    assert (body["heatmap"]["width"], body["heatmap"]["height"]) == (128, 85)
    overlay = Image.open(io.BytesIO(base64.b64decode(body["heatmap"]["png_base64"])))
    assert overlay.size == (128, 85)
    (region,) = body["regions"]
    box = region["box"]
    assert abs(box["x0"] - 600) <= 20 and abs(box["x1"] - 900) <= 20 and abs(box["y0"] - 200) <= 20
    as_png = client.post("/v1/models/toy/inspect", content=png(pixels), params={"heatmap": "map"},
                         headers={"Content-Type": "image/png", "Accept": "image/png"})
    assert Image.open(io.BytesIO(as_png.content)).size == (128, 85)


def test_overlay_shows_the_sixteen_bit_frame_as_decoded(client):
    ramp = np.tile(np.linspace(0, 65535, 160).astype(np.uint16), (120, 1))
    body = inspect(client, png(ramp), "bright", heatmap="overlay").json()
    overlay = np.asarray(Image.open(io.BytesIO(base64.b64decode(body["heatmap"]["png_base64"]))).convert("L"))
    assert overlay[:, :10].mean() < overlay[:, -10:].mean() - 60  # dark to bright, not all white


def test_frames_far_smaller_than_the_model_input_are_refused(client):
    r = inspect(client, png(np.zeros((1, 1, 3), np.uint8)))
    assert r.status_code == 422 and r.json()["error"]["code"] == "image_too_small"
    assert "1x1" in r.json()["error"]["message"] and "64x64" in r.json()["error"]["message"]
    assert inspect(client, png(np.zeros((15, 40, 3), np.uint8))).status_code == 422
    assert inspect(client, png(np.zeros((16, 16, 3), np.uint8))).status_code == 200  # a quarter of 64


def test_model_list_and_metrics_are_closed_once_keys_are_configured(gateway):
    def status(path: str, key: str | None) -> int:
        return httpx.get(gateway.url + path, headers={"X-API-Key": key} if key else {}).status_code

    assert status("/v1/models", None) == 401 and status("/v1/models", "wrong") == 403
    assert status("/v1/models", INSPECT_KEY) == 200 and status("/v1/models", ADMIN_KEY) == 200
    assert status("/metrics", None) == 401 and status("/metrics", INSPECT_KEY) == 403
    assert status("/metrics", METRICS_KEY) == 200 and status("/metrics", ADMIN_KEY) == 200
    bearer = httpx.get(gateway.url + "/metrics", headers={"Authorization": f"Bearer {METRICS_KEY}"})
    assert bearer.status_code == 200 and "slsg_requests_total" in bearer.text


@pytest.mark.parametrize("settings, models, metrics", [
    ({"open_models": True, "open_metrics": True}, 200, 200),
    ({"metrics_networks": ["127.0.0.0/8"]}, 401, 200),
    ({"metrics_networks": ["10.0.0.0/8", "::1/128"]}, 401, 401),
    ({"api_keys": [], "metrics_keys": []}, 200, 200),  # no keys at all: open, as before
])
def test_settings_open_them_or_let_a_network_scrape(repository, settings, models, metrics):
    with BackgroundGateway(settings_for(repository, **settings)) as gw:
        assert httpx.get(gw.url + "/v1/models").status_code == models
        assert httpx.get(gw.url + "/metrics").status_code == metrics


def test_a_metrics_network_must_be_a_network():
    with pytest.raises(ValidationError, match="'10.0.0.300/8' is not a network"):
        Settings(metrics_networks="10.0.0.300/8")
    assert Settings(metrics_networks="10.0.0.0/8, 192.168.1.7").metrics_networks == ["10.0.0.0/8", "192.168.1.7"]


def test_decode_budget_holds_decodes_back_in_arrival_order():
    async def scenario() -> list[str]:
        budget, events = DecodeBudget(100), []

        async def decode(name: str, size: int, hold: float) -> None:
            async with budget.reserve(size):
                events.append(f"+{name}")
                assert budget.reserved <= budget.capacity
                await asyncio.sleep(hold)
                events.append(f"-{name}")

        await asyncio.gather(decode("a", 60, 0.05), decode("huge", 500, 0.01), decode("b", 30, 0.0))
        return events

    # "b" would fit next to "a", but "huge" asked first and needs the whole budget: it waits for "a", runs alone
    assert asyncio.run(scenario()) == ["+a", "-a", "+huge", "-huge", "+b", "-b"]
