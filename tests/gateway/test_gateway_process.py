"""The gateway as its own process (`slsg serve`), where the process itself is what is checked:
its resident memory under several large frames at once, and its log lines when the backend hangs."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import subprocess
import time
from pathlib import Path
from collections.abc import Iterator

import httpx
import numpy as np
import pytest

from support import SLSG_BIN, free_ports, png_bytes
from onnx_fixtures import make_card, write_contract_model
from slsg.contract import model_path

pytestmark = pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc (Linux)")


@contextlib.contextmanager
def serve(tmp_path: Path, *args: str, **env: str) -> Iterator[tuple[subprocess.Popen, str]]:
    """`slsg serve ARGS` on a free port with SLSG_* ``env``; yields the process and its URL."""
    (port,) = free_ports(1)
    log = open(tmp_path / "serve.log", "wb")
    proc = subprocess.Popen([SLSG_BIN, "serve", "--port", str(port), *args], stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, "OMP_NUM_THREADS": "1", **env})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"slsg serve did not start:\n{(tmp_path / 'serve.log').read_text()[-3000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                    break
            time.sleep(0.1)
        yield proc, url
    finally:
        proc.terminate()
        proc.wait(timeout=20)
        log.close()


def status_kib(pid: int, field: str) -> int:
    """A memory figure of /proc/PID/status in KiB (VmRSS: resident now, VmHWM: its peak)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def large_png(width: int, height: int) -> bytes:
    pixels = np.full((height, width, 3), 128, np.uint8)
    pixels[height // 4:height // 2, width // 2:3 * width // 4] = (255, 0, 0)
    return png_bytes(pixels, compress_level=1)


def test_resident_memory_stays_bounded_with_four_large_frames_at_once(tmp_path):
    """Four 6000x4000 overlays at once; before the bounds a gateway grew by over 2 GB doing this."""
    write_contract_model(model_path(tmp_path / "repo", "toy", 1), make_card("toy", size=64))
    frame = large_png(6000, 4000)  # 24 Mpixel: 96 MB as decoded RGB in Pillow (4 bytes a pixel)
    budget_mb, limit_mb = 128, 400
    with serve(tmp_path, "--repository", str(tmp_path / "repo"), SLSG_DECODE_BUDGET_MB=str(budget_mb),
               SLSG_ORT_THREADS="1", SLSG_RECORDS=str(tmp_path / "records")) as (proc, url):
        small = large_png(320, 240)
        warm = httpx.post(f"{url}/v1/models/toy/inspect?heatmap=overlay", content=small,
                          headers={"Content-Type": "image/png"}, timeout=60)
        assert warm.status_code == 200, warm.text
        Path(f"/proc/{proc.pid}/clear_refs").write_text("5")  # restart the peak (VmHWM) from here
        baseline = status_kib(proc.pid, "VmRSS")

        async def burst() -> list[httpx.Response]:
            async with httpx.AsyncClient(base_url=url, timeout=300) as client:
                return await asyncio.gather(*(client.post("/v1/models/toy/inspect?heatmap=overlay", content=frame,
                                                          headers={"Content-Type": "image/png"}) for _ in range(4)))

        responses = asyncio.run(burst())
        peak = status_kib(proc.pid, "VmHWM")
    for r in responses:
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["is_anomalous"] and (body["heatmap"]["width"], body["heatmap"]["height"]) == (1024, 683)
        assert len(r.content) < 3_000_000  # was 105 MB for an 8000x6000 frame
    growth_mb = (peak - baseline) / 1024
    assert growth_mb < limit_mb, f"resident memory grew by {growth_mb:.0f} MB (limit {limit_mb} MB)"


@contextlib.contextmanager
def unresponsive_server() -> Iterator[int]:
    """A port that accepts TCP connections (the kernel's backlog) and never answers: a hung backend."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(64)
        yield sock.getsockname()[1]


def test_a_hung_backend_is_logged_once_as_json_with_the_timeout(tmp_path):
    with unresponsive_server() as port:
        with serve(tmp_path, "--backend", "triton", "--triton-url", f"127.0.0.1:{port}", "--triton-protocol", "http",
                   "--log-format", "json", SLSG_TRITON_TIMEOUT_S="0.5", SLSG_RETRY_AFTER_S="1",
                   SLSG_RECORDS="off") as (_, url):
            for _ in range(3):
                r = httpx.post(f"{url}/v1/models/toy/inspect", content=large_png(320, 240),
                               headers={"Content-Type": "image/png"}, timeout=30)
                assert r.status_code == 503 and r.json()["error"]["code"] == "backend_unavailable"
                assert "timed out after 0.5 s" in r.json()["error"]["message"], r.text
                assert "TimeoutError: " not in r.json()["error"]["message"]
                time.sleep(0.6)  # past the gateway's refresh interval, so each request asks Triton again
            assert httpx.get(f"{url}/readyz", timeout=30).status_code == 503
    lines = [json.loads(line) for line in (tmp_path / "serve.log").read_text().splitlines() if line.startswith("{")]
    events = [line for line in lines if line.get("event", "").startswith("backend_")]
    assert len(events) == 1, events
    (event,) = events
    assert event["event"] == "backend_unavailable" and event["level"] == "warning"
    assert event["backend"] == "Triton" and event["address"] == f"127.0.0.1:{port}"
    assert "timed out after 0.5 s" in event["cause"] and event["time"] and event["logger"].startswith("slsg_gateway")
