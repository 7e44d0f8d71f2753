"""Model administration on the embedded backend: a new version is served under live traffic
without a failed request, and a failed load keeps the old version serving."""

from __future__ import annotations

import asyncio

import httpx
import numpy as np
import pytest

from onnx_fixtures import make_card, write_contract_model
from support import png_bytes
from slsg.contract import model_path
from slsg_gateway.server import BackgroundGateway
from slsg_gateway.settings import Settings

ADMIN = {"X-API-Key": "admin-secret"}


def red_patch_png() -> bytes:
    pixels = np.full((96, 128, 3), 128, np.uint8)
    pixels[20:50, 30:70] = (255, 0, 0)
    return png_bytes(pixels)


@pytest.fixture()
def gateway(tmp_path):
    write_contract_model(model_path(tmp_path, "toy", 1), make_card("toy", size=32))
    with BackgroundGateway(Settings(repository=tmp_path, port=0, admin_keys=["admin-secret"],
                                    batch_window_ms=2)) as gw:
        yield gw, tmp_path


def test_new_version_is_served_under_traffic_without_failures(gateway):
    gw, root = gateway
    data = red_patch_png()

    async def scenario() -> tuple[list[int], list[int], dict]:
        statuses, versions = [], []
        stop = asyncio.Event()
        async with httpx.AsyncClient(base_url=gw.url, timeout=30) as client:
            async def camera() -> None:
                while not stop.is_set():
                    r = await client.post("/v1/models/toy/inspect", content=data,
                                          headers={"Content-Type": "image/png"})
                    statuses.append(r.status_code)
                    if r.status_code == 200:
                        versions.append(r.json()["version"])

            cameras = [asyncio.create_task(camera()) for _ in range(4)]
            while len(statuses) < 20:
                await asyncio.sleep(0.01)
            # the new version has a different calibration, so its scores differ too
            write_contract_model(model_path(root, "toy", 2), make_card("toy", size=32, top_k=4))
            loaded = (await client.post("/v1/models/toy/load", headers=ADMIN)).json()
            seen_after = len(statuses)
            while len(statuses) < seen_after + 20:
                await asyncio.sleep(0.01)
            stop.set()
            await asyncio.gather(*cameras)
        return statuses, versions, loaded

    statuses, versions, loaded = asyncio.run(scenario())
    assert loaded["served_version"] == 2 and loaded["versions"] == [1, 2] and loaded["card"]["top_k"] == 4
    assert set(statuses) == {200}, f"failed requests during reload: {sorted(set(statuses))}"
    assert versions[0] == 1 and versions[-1] == 2 and set(versions) == {1, 2}
    assert versions[-8:] == [2] * 8, "version 1 still answering after the reload"


def test_failed_load_keeps_the_old_version(gateway):
    gw, root = gateway
    broken = model_path(root, "toy", 2)
    broken.parent.mkdir(parents=True)
    broken.write_bytes(b"this is not an onnx file")
    r = httpx.post(f"{gw.url}/v1/models/toy/load", headers=ADMIN, timeout=30)
    assert r.status_code == 422 and r.json()["error"]["code"] == "load_failed"
    message = r.json()["error"]["message"]
    assert str(broken) in message and "still serving version 1" in message
    listed = {m["name"]: m for m in httpx.get(f"{gw.url}/v1/models").json()["models"]}["toy"]
    assert listed["served_version"] == 1 and listed["versions"] == [1, 2] and listed["ready"] is True
    inspected = httpx.post(f"{gw.url}/v1/models/toy/inspect", content=red_patch_png(),
                           headers={"Content-Type": "image/png"})
    assert inspected.status_code == 200 and inspected.json()["version"] == 1


def test_unload_then_load_again(gateway):
    gw, _ = gateway
    png = {"Content-Type": "image/png"}
    r = httpx.post(f"{gw.url}/v1/models/toy/unload", headers=ADMIN)
    assert r.status_code == 200 and r.json()["ready"] is False and r.json()["served_version"] is None
    r = httpx.post(f"{gw.url}/v1/models/toy/inspect", content=red_patch_png(), headers=png)
    assert r.status_code == 503 and r.json()["error"]["code"] == "model_not_ready" and "Retry-After" in r.headers
    assert httpx.get(f"{gw.url}/readyz").status_code == 503
    assert httpx.post(f"{gw.url}/v1/models/nope/load", headers=ADMIN).json()["error"]["code"] == "model_not_found"
    assert httpx.post(f"{gw.url}/v1/models/toy/load", headers=ADMIN, timeout=30).json()["served_version"] == 1
    assert httpx.post(f"{gw.url}/v1/models/toy/inspect", content=red_patch_png(), headers=png).status_code == 200
