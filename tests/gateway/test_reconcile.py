"""Desired state (NAME/serving.json): gateways converge on the deployed version by themselves.

Two real gateway processes (``slsg serve``) share one repository; ``slsg deploy`` moves them forward
and back under live traffic with no admin call and no failed request. A serving.json that cannot be
used, or names a version that cannot be loaded, is reported (log, metrics) while the gateway keeps
serving what it had.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import numpy as np
import pytest

from onnx_fixtures import make_card, write_contract_model
from slsg.contract import model_path, serving_path
from slsg_gateway.server import BackgroundGateway
from slsg_gateway.settings import Settings
from support import SLSG_BIN, free_ports, png_bytes, run_slsg

INTERVAL_S = 0.2
CONVERGE_S = 60.0  # a generous bound on 2 busy cores; convergence normally takes one interval and a load
PNG = {"Content-Type": "image/png"}


def red_patch_png() -> bytes:
    pixels = np.full((48, 64, 3), 128, np.uint8)
    pixels[10:30, 20:40] = (255, 0, 0)
    return png_bytes(pixels)


def add_version(root: Path, version: int) -> None:
    """Version ``version`` of the toy model; each has its own top-K, so its card tells them apart."""
    write_contract_model(model_path(root, "toy", version), make_card("toy", size=32, top_k=2 + version))


@pytest.fixture()
def repository(tmp_path) -> Path:
    root = tmp_path / "repo"
    for version in (1, 2):
        add_version(root, version)
    return root


def wait_until(condition: Callable[[], bool], what: str, timeout_s: float = CONVERGE_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout_s:.0f} s: {what}")
        time.sleep(0.05)


def toy(url: str) -> dict:
    models = httpx.get(f"{url}/v1/models", timeout=10).json()["models"]
    return next(m for m in models if m["name"] == "toy")


def metric(url: str, name: str, labels: str) -> float | None:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    found = re.search(rf"^{re.escape(name)}\{{{re.escape(labels)}\}} (\S+)$", text, re.MULTILINE)
    return float(found.group(1)) if found else None


def start_gateway(root: Path, port: int, log_path: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SLSG_RECONCILE_INTERVAL_S": str(INTERVAL_S),
           "SLSG_BATCH_WINDOW_MS": "2", "SLSG_ORT_THREADS": "1"}
    with log_path.open("w") as log:
        return subprocess.Popen([SLSG_BIN, "serve", "--backend", "embedded", "--repository", str(root),
                                 "--port", str(port), "--log-level", "warning"],
                                env=env, stdout=log, stderr=subprocess.STDOUT)


@pytest.fixture()
def two_gateways(repository, tmp_path):
    ports = free_ports(2)
    processes = [start_gateway(repository, port, tmp_path / f"gateway-{port}.log") for port in ports]
    urls = [f"http://127.0.0.1:{port}" for port in ports]
    try:
        for url, process in zip(urls, processes):
            wait_until(lambda: process.poll() is not None or _ready(url), f"{url} ready")
            assert process.poll() is None, (tmp_path / f"gateway-{url.rsplit(':', 1)[1]}.log").read_text()
        yield urls
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            process.wait(timeout=30)


def _ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/readyz", timeout=2).status_code == 200
    except httpx.TransportError:
        return False


def converged(urls: list[str], version: int) -> bool:
    return all(toy(url)["served_version"] == version and toy(url)["desired_version"] == version for url in urls)


def deploy_under_traffic(urls: list[str], steps: list[Callable[[], int]]) -> tuple[list[int], dict[int, set[int]]]:
    """Cameras post to both gateways while each step deploys a version; after each step converges,
    the versions answering the requests sent next are collected. Returns every status, and per step the
    versions that answered requests sent once both gateways had converged."""
    frame = red_patch_png()

    async def scenario() -> tuple[list[int], dict[int, set[int]]]:
        statuses: list[int] = []
        after: dict[int, set[int]] = {}
        collecting: list[int | None] = [None]
        stop = asyncio.Event()
        async with httpx.AsyncClient(timeout=30) as client:
            async def camera(url: str) -> None:
                while not stop.is_set():
                    step = collecting[0]  # counted only if sent once both had converged
                    r = await client.post(f"{url}/v1/models/toy/inspect", content=frame, headers=PNG)
                    statuses.append(r.status_code)
                    if r.status_code == 200 and step is not None:
                        after[step].add(r.json()["version"])

            cameras = [asyncio.create_task(camera(url)) for url in urls for _ in range(2)]
            for index, step in enumerate(steps):
                version = await asyncio.to_thread(step)
                await asyncio.to_thread(wait_until, lambda: converged(urls, version),
                                        f"both gateways on version {version}")
                collecting[0], after[index] = index, set()
                seen = len(statuses)
                while len(statuses) < seen + 16:
                    await asyncio.sleep(0.02)
                collecting[0] = None
            stop.set()
            await asyncio.gather(*cameras)
        return statuses, after

    return asyncio.run(scenario())


@pytest.mark.slow  # two gateway processes
def test_two_gateways_converge_on_each_deploy_and_rollback_under_traffic(two_gateways, repository):
    urls = two_gateways
    assert [toy(url)["served_version"] for url in urls] == [2, 2]  # no serving.json: the newest, as before

    def deploy(*args: str) -> Callable[[], int]:
        def step() -> int:
            out = run_slsg("deploy", "toy", *args, "--repository", repository).stdout
            return int(re.search(r"serve version (\d+)", out).group(1))
        return step

    def export_then_deploy_latest() -> int:
        add_version(repository, 3)
        return deploy("--latest")()

    statuses, after = deploy_under_traffic(urls, [
        deploy("--version", "1"),        # roll back from the newest
        export_then_deploy_latest,       # a new export goes live only when deployed
        deploy("--version", "2"),        # roll back again
    ])
    assert set(statuses) == {200}, f"failed requests while converging: {sorted(set(statuses))}"
    assert after == {0: {1}, 1: {3}, 2: {2}}, "a gateway answered with another version once converged"
    for url in urls:
        model = toy(url)
        assert model["card"]["top_k"] == 4 and model["versions"] == [1, 2, 3]  # version 2's own card
        assert metric(url, "slsg_model_version_info", 'model="toy",version="2"') == 1
        assert metric(url, "slsg_model_version_info", 'model="toy",version="3"') is None
        assert metric(url, "slsg_model_desired_version", 'model="toy"') == 2
        assert metric(url, "slsg_model_version_mismatch", 'model="toy"') == 0


@pytest.fixture()
def gateway(repository):
    settings = Settings(repository=repository, port=0, reconcile_interval_s=INTERVAL_S, admin_keys=["admin-secret"],
                        batch_window_ms=2)
    with BackgroundGateway(settings) as gw:
        yield gw.url


def test_a_restarted_gateway_serves_the_desired_version_from_its_first_request(repository):
    run_slsg("deploy", "toy", "--version", "1", "--repository", repository)
    settings = Settings(repository=repository, port=0, reconcile_interval_s=INTERVAL_S)
    with BackgroundGateway(settings) as gw:
        first = httpx.post(f"{gw.url}/v1/models/toy/inspect", content=red_patch_png(), headers=PNG, timeout=30)
        assert first.status_code == 200 and first.json()["version"] == 1
        assert toy(gw.url)["served_version"] == 1 and toy(gw.url)["desired_version"] == 1


def test_a_corrupt_serving_json_is_reported_and_the_served_version_stays(gateway, repository, caplog):
    run_slsg("deploy", "toy", "--version", "1", "--repository", repository)
    wait_until(lambda: toy(gateway)["served_version"] == 1, "version 1 served")
    errors_before = metric(gateway, "slsg_reconcile_errors_total", 'kind="invalid_state",model="toy"') or 0
    caplog.set_level(logging.ERROR, logger="slsg_gateway.reconcile")
    serving_path(repository, "toy").write_text('{"version": 2')  # cut short, as by a bad hand edit

    wait_until(lambda: metric(gateway, "slsg_desired_state_invalid", 'model="toy"') == 1, "invalid state reported")
    wait_until(lambda: (metric(gateway, "slsg_reconcile_errors_total", 'kind="invalid_state",model="toy"') or 0)
               >= errors_before + 2, "two failed passes counted")
    logged = [r.getMessage() for r in caplog.records  # errors: the gateway's info lines are on too
              if r.name == "slsg_gateway.reconcile" and r.levelno >= logging.ERROR]
    assert len(logged) == 1, f"the same problem must be logged once, got {logged}"
    assert "still serving version 1" in logged[0] and "not valid JSON" in logged[0] and "serving.json" in logged[0]
    r = httpx.post(f"{gateway}/v1/models/toy/inspect", content=red_patch_png(), headers=PNG, timeout=30)
    assert r.status_code == 200 and r.json()["version"] == 1
    assert toy(gateway)["desired_version"] == 1  # the last usable desired state

    run_slsg("deploy", "toy", "--version", "2", "--repository", repository)  # repairs the file
    wait_until(lambda: toy(gateway)["served_version"] == 2, "version 2 served after the repair")
    assert metric(gateway, "slsg_desired_state_invalid", 'model="toy"') == 0


def test_a_desired_version_that_does_not_load_keeps_the_old_one_and_shows_a_mismatch(gateway, repository):
    run_slsg("deploy", "toy", "--latest", "--repository", repository)
    broken = model_path(repository, "toy", 3)
    broken.parent.mkdir()
    broken.write_bytes(b"this is not an onnx file")
    run_slsg("deploy", "toy", "--version", "3", "--repository", repository)

    wait_until(lambda: metric(gateway, "slsg_model_version_mismatch", 'model="toy"') == 1, "mismatch reported")
    wait_until(lambda: (metric(gateway, "slsg_reconcile_errors_total", 'kind="load_failed",model="toy"') or 0) >= 1,
               "failed load counted")
    model = toy(gateway)
    assert (model["served_version"], model["desired_version"], model["ready"]) == (2, 3, True)
    assert metric(gateway, "slsg_model_desired_version", 'model="toy"') == 3
    r = httpx.post(f"{gateway}/v1/models/toy/inspect", content=red_patch_png(), headers=PNG, timeout=30)
    assert r.status_code == 200 and r.json()["version"] == 2


def test_the_desired_state_wins_over_a_one_off_admin_load(gateway, repository):
    run_slsg("deploy", "toy", "--version", "2", "--repository", repository)
    wait_until(lambda: toy(gateway)["desired_version"] == 2, "desired state read")
    loaded = httpx.post(f"{gateway}/v1/models/toy/load", json={"version": 1},
                        headers={"X-API-Key": "admin-secret"}, timeout=30).json()
    assert loaded["served_version"] == 1 and loaded["desired_version"] == 2
    wait_until(lambda: toy(gateway)["served_version"] == 2, "back on the desired version")


def test_removing_serving_json_leaves_the_served_version_and_drops_its_series(gateway, repository):
    run_slsg("deploy", "toy", "--version", "1", "--repository", repository)
    wait_until(lambda: toy(gateway)["served_version"] == 1, "version 1 served")
    serving_path(repository, "toy").unlink()
    wait_until(lambda: toy(gateway)["desired_version"] is None, "desired state forgotten")
    assert toy(gateway)["served_version"] == 1
    assert metric(gateway, "slsg_model_desired_version", 'model="toy"') is None
    assert metric(gateway, "slsg_model_version_info", 'model="toy",version="1"') == 1


def test_desired_state_from_a_mounted_config_map(repository, tmp_path):
    """SLSG_SERVING_ROOT apart from the repository, laid out as the kubelet mounts a ConfigMap with items
    ``toy/serving.json``: the files live in a timestamped folder behind ``..data``, swapped by a symlink."""
    mount = tmp_path / "serving"
    (mount / "..2026_12_07_00_00_00.1" / "toy").mkdir(parents=True)
    (mount / "..2026_12_07_00_00_00.1" / "toy" / "serving.json").write_text('{"version": 1}')
    (mount / "..data").symlink_to("..2026_12_07_00_00_00.1")
    (mount / "toy").symlink_to("..data/toy")
    settings = Settings(repository=repository, serving_root=mount, port=0, reconcile_interval_s=INTERVAL_S)
    with BackgroundGateway(settings) as gw:
        assert toy(gw.url)["served_version"] == 1 and toy(gw.url)["desired_version"] == 1
        # an update: a new timestamped folder, then the ..data link swapped atomically
        (mount / "..2026_12_07_00_01_00.2" / "toy").mkdir(parents=True)
        (mount / "..2026_12_07_00_01_00.2" / "toy" / "serving.json").write_text('{"version": 2}')
        (mount / "..data_tmp").symlink_to("..2026_12_07_00_01_00.2")
        os.replace(mount / "..data_tmp", mount / "..data")
        wait_until(lambda: toy(gw.url)["served_version"] == 2, "version 2 served after the ConfigMap update")
        assert metric(gw.url, "slsg_desired_state_invalid", 'model="toy"') == 0
