"""Desired state on the Triton backend: two gateways on one real (local, CPU) Triton with explicit model
control follow ``slsg deploy`` forward and back under traffic, with no admin call and no failed request,
and put a Triton that forgot the rollback (restarted: it loads its config.pbtxt default) back on it."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

import httpx
import numpy as np
import pytest

from onnx_fixtures import make_card, write_contract_model
from slsg.contract import model_path
from slsg.triton_config import write_config
from slsg_gateway.server import BackgroundGateway
from slsg_gateway.settings import Settings
from support import local_triton, png_bytes, run_slsg

pytestmark = pytest.mark.slow
PNG = {"Content-Type": "image/png"}
CONVERGE_S = 90.0  # generous on 2 busy cores; it normally takes one interval and a Triton load


def frame_png() -> bytes:
    pixels = np.full((64, 64, 3), 128, np.uint8)
    pixels[10:30, 20:40] = (255, 0, 0)
    return png_bytes(pixels)


def wait_until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + CONVERGE_S
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {CONVERGE_S:.0f} s: {what}")
        time.sleep(0.1)


@pytest.fixture()
def repository(tmp_path):
    root = tmp_path / "repo"
    for version in (1, 2):
        card = make_card("toy", size=32, top_k=2 + version)
        write_contract_model(model_path(root, "toy", version), card)
    write_config(root, "toy", card, gpu=False, max_batch_size=8)
    time.sleep(0.5)  # LocalTriton publishes a version only once its files are 0.3 s old
    return root


@pytest.fixture()
def triton(repository):
    with local_triton(repository, ["toy"]) as server:
        yield server


def served(url: str) -> tuple[int | None, int | None]:
    """(served, desired) version of the toy model; (None, None) while the gateway cannot list models."""
    r = httpx.get(f"{url}/v1/models", timeout=10)
    toy = [m for m in r.json()["models"] if m["name"] == "toy"] if r.status_code == 200 else []
    return (toy[0]["served_version"], toy[0]["desired_version"]) if toy else (None, None)


def test_two_gateways_on_triton_follow_deploys_and_repair_a_restarted_triton(triton, repository, caplog):
    settings = Settings(backend="triton", triton_url=triton.grpc_url, port=0, repository=repository,
                        reconcile_interval_s=0.3, triton_timeout_s=10.0, retry_after_s=1)
    frame = frame_png()
    with BackgroundGateway(settings) as first, BackgroundGateway(settings.model_copy(update={"port": 0})) as second:
        urls = [first.url, second.url]
        assert [served(url)[0] for url in urls] == [2, 2]  # no serving.json yet: Triton's newest

        async def traffic_while(steps: list[int]) -> tuple[list[int], dict[int, set[int]]]:
            statuses: list[int] = []
            after: dict[int, set[int]] = {}
            current: list[int | None] = [None]
            stop = asyncio.Event()
            async with httpx.AsyncClient(timeout=30) as client:
                async def camera(url: str) -> None:
                    while not stop.is_set():
                        expected = current[0]
                        r = await client.post(f"{url}/v1/models/toy/inspect", content=frame, headers=PNG)
                        statuses.append(r.status_code)
                        if r.status_code == 200 and expected is not None:
                            after[expected].add(r.json()["version"])

                cameras = [asyncio.create_task(camera(url)) for url in urls]
                for version in steps:
                    current[0] = None
                    await asyncio.to_thread(run_slsg, "deploy", "toy", "--version", str(version),
                                            "--repository", repository)
                    await asyncio.to_thread(wait_until, lambda: all(served(u) == (version, version) for u in urls),
                                            f"both gateways serve version {version}")
                    after[version], current[0] = set(), version
                    seen = len(statuses)
                    while len(statuses) < seen + 10:
                        await asyncio.sleep(0.05)
                stop.set()
                await asyncio.gather(*cameras)
            return statuses, after

        statuses, after = asyncio.run(traffic_while([1, 2, 1]))
        assert set(statuses) == {200}, f"failed requests while converging: {sorted(set(statuses))}"
        assert after == {1: {1}, 2: {2}}

        # Triton restarts and loads its default (the newest two, so version 2 serves): the gateways notice
        caplog.set_level(logging.INFO, logger="slsg_gateway.reconcile")
        triton.kill()
        triton.start()
        wait_until(lambda: sum("now serving version 1 (desired state; was 2)" in r.getMessage()
                               for r in caplog.records) >= 1, "a gateway reloads the rollback on the restarted Triton")
        wait_until(lambda: all(served(u) == (1, 1) for u in urls), "the rollback restored on the restarted Triton")
        r = httpx.post(f"{first.url}/v1/models/toy/inspect", content=frame, headers=PNG, timeout=30)
        assert r.status_code == 200 and r.json()["version"] == 1
