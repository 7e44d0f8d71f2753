"""Redeploy and rollback under live traffic, end to end with a real trained SLSG model.

The MLOps flow of docs/operations.md (runbook): `slsg export` version N+1 while cameras keep posting frames,
``POST /v1/models/{name}/load`` moves traffic to it, ``POST .../load {"version": N}`` rolls back
(a pin), a load without a body serves the newest again. Runs on the real local Triton (explicit
model control) behind the gateway's triton backend, and on the embedded ONNX Runtime backend.
Every request must succeed, and every request sent after a load returned (and answered before the
next load began) must be answered by the version that load reported, with that version's own score
(checked against ONNX Runtime).
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx
import onnxruntime as ort
import pytest

from slsg.contract import INPUT_IMAGE, OUTPUT_SCORE, model_path
from slsg_gateway.imaging import decode_frame
from slsg_gateway.server import BackgroundGateway
from slsg_gateway.settings import Settings
from support import local_triton

pytestmark = pytest.mark.slow
SLSG = Path(sys.executable).parent / "slsg"
MODEL, SIZE = "tray", 64
ADMIN = {"X-API-Key": "admin-secret"}
PNG = {"Content-Type": "image/png"}


def slsg(*args: str | Path, cwd: Path) -> subprocess.Popen:
    """Start the real `slsg` console script (one torch thread: the test machine has few cores)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([str(SLSG), *map(str, args)], cwd=cwd, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def finish(process: subprocess.Popen) -> str:
    out, err = process.communicate(timeout=300)
    assert process.returncode == 0, f"{process.args} failed:\n{err[-2000:]}"
    return out


@dataclass(frozen=True)
class Trained:
    """Two tiny checkpoints of the same product (different seeds and checks, so different scores)."""

    work: Path
    checkpoints: tuple[Path, Path]
    frame: bytes  # a logical-anomaly test image of the synthetic data set, PNG


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Trained:
    work = tmp_path_factory.mktemp("redeploy")
    finish(slsg("synth", "data", "--categories", MODEL, "--image-size", SIZE, "--train", 8, "--validation", 4,
                "--test-good", 2, "--test-logical", 2, "--test-structural", 2, cwd=work))
    # the second without the reference checks: the frozen ImageNet checks score both seeds alike, and
    # their fused scores could then agree to 1e-5 (the test needs two versions it can tell apart)
    checks = {0: ("--composition-steps", 5), 1: ("--patch-memory", "off", "--composition-check", "off")}
    runs = [slsg("train", "--data", "data", "--category", MODEL, "--out", f"run{seed}", "--image-size", SIZE,
                 "--steps", 3, "--pretrain-steps", 0, "--workers", 0, "--seed", seed, *checks[seed], cwd=work)
            for seed in (0, 1)]
    for run in runs:
        finish(run)
    frame = sorted((work / "data" / MODEL / "test" / "logical_anomalies").glob("*.png"))[0].read_bytes()
    return Trained(work, (work / "run0" / "checkpoint.pt", work / "run1" / "checkpoint.pt"), frame)


def export(trained: Trained, checkpoint: Path, repository: Path) -> int:
    """`slsg export` into ``repository`` as the next free version; returns that version."""
    out = finish(slsg("export", "--checkpoint", checkpoint, "--repository", repository, "--name", MODEL,
                      "--cpu-config", cwd=trained.work))
    return int(out.split("(version ")[1].split(")")[0])


def ort_score(repository: Path, version: int, frame: bytes) -> float:
    """The calibrated score of ``version``'s model.onnx on ``frame``, straight from ONNX Runtime."""
    pixels = decode_frame(frame, (SIZE, SIZE), max_pixels=10**8).pixels[None]
    session = ort.InferenceSession(str(model_path(repository, MODEL, version)), providers=["CPUExecutionProvider"])
    return float(session.run([OUTPUT_SCORE], {INPUT_IMAGE: pixels})[0][0, 0])


@dataclass
class Answer:
    sent: float  # time.monotonic() when the request was sent
    status: int
    version: int | None
    score: float | None
    answered: float = 0.0  # time.monotonic() when the answer arrived


class Cameras:
    """A few asyncio tasks posting the same frame continuously, recording every answer."""

    def __init__(self, client: httpx.AsyncClient, frame: bytes, count: int = 3) -> None:
        self.client, self.frame, self.answers = client, frame, []
        self._stop = asyncio.Event()
        self._tasks = [asyncio.create_task(self._camera()) for _ in range(count)]

    async def _camera(self) -> None:
        while not self._stop.is_set():
            sent = time.monotonic()
            r = await self.client.post(f"/v1/models/{MODEL}/inspect", content=self.frame, headers=PNG)
            body = r.json() if r.status_code == 200 else {}
            self.answers.append(Answer(sent, r.status_code, body.get("version"), body.get("score"), time.monotonic()))

    async def wait_for(self, more: int) -> None:
        """Until ``more`` further answers arrived (traffic keeps flowing meanwhile)."""
        target = len(self.answers) + more
        while len(self.answers) < target:
            if all(task.done() for task in self._tasks):  # every camera failed: say why instead of waiting
                await asyncio.gather(*self._tasks)
                raise AssertionError("every camera stopped")
            await asyncio.sleep(0.01)

    async def stop(self) -> list[Answer]:
        self._stop.set()
        await asyncio.gather(*self._tasks)
        return self.answers


async def load(client: httpx.AsyncClient, version: int | None = None) -> tuple[dict, float, float]:
    """POST /load (pinning ``version`` if given); returns the served model, when it was called and returned."""
    called = time.monotonic()
    r = await client.post(f"/v1/models/{MODEL}/load", headers=ADMIN,
                          json={"version": version} if version is not None else None)
    assert r.status_code == 200, r.text
    return r.json(), called, time.monotonic()


async def redeploy_and_roll_back(url: str, trained: Trained, repository: Path,
                                 publish: Callable[[], None]) -> list[Answer]:
    """Export v2 under traffic, load it, pin v1 (rollback), unpin; checks every step's served model."""
    async with httpx.AsyncClient(base_url=url, timeout=60) as client:
        cameras = Cameras(client, trained.frame)
        await cameras.wait_for(10)
        assert await asyncio.to_thread(export, trained, trained.checkpoints[1], repository) == 2
        await asyncio.to_thread(publish)
        await cameras.wait_for(5)
        switches = []  # (load called, load returned, version served from then on)
        for pin, served in ((None, 2), (1, 1), (None, 2)):
            model, called, returned = await load(client, pin)
            assert (model["served_version"], model["pinned_version"]) == (served, pin), model
            switches.append((called, returned, served))
            await cameras.wait_for(15)
        listed = {m["name"]: m for m in (await client.get("/v1/models")).json()["models"]}[MODEL]
        answers = await cameras.stop()
    assert listed["served_version"] == 2 and listed["pinned_version"] is None and 2 in listed["versions"]
    assert [a.status for a in answers if a.status != 200] == [], "failed requests during the redeploy"
    assert {a.version for a in answers if a.sent < switches[0][0]} == {1}, "an export alone must not move traffic"
    # a request sent after one load returned and answered before the next load was called is served
    # by the loaded version (one still queued when the next load starts belongs to that next switch)
    for (_, start, version), (end, _, _) in zip(switches, switches[1:] + [(float("inf"), None, None)]):
        served = {a.version for a in answers if start < a.sent and a.answered < end}
        assert served == {version}, f"requests sent after the load of v{version} were answered by {served}"
    return answers


def check_scores(answers: list[Answer], repository: Path, frame: bytes) -> None:
    """Each answer carries the score of the version it names, and the two versions differ."""
    expected = {v: ort_score(repository, v, frame) for v in (1, 2)}
    assert abs(expected[1] - expected[2]) > 1e-4, "the two checkpoints must be distinguishable"
    assert {a.version for a in answers} == {1, 2}
    for a in answers:
        assert a.score == pytest.approx(expected[a.version], abs=1e-4), a


def test_redeploy_and_rollback_on_local_triton(trained: Trained, tmp_path: Path) -> None:
    repository = tmp_path / "model_repository"
    server = local_triton(repository, [MODEL])  # skips here, before the export, without a tritonserver
    assert export(trained, trained.checkpoints[0], repository) == 1
    time.sleep(0.4)  # LocalTriton publishes a version once its files are 0.3 s old
    settings = Settings(backend="triton", triton_url=server.grpc_url, port=0, admin_keys=["admin-secret"],
                        triton_timeout_s=30.0)
    with server:
        with BackgroundGateway(settings) as gw:
            answers = asyncio.run(redeploy_and_roll_back(gw.url, trained, repository, server.wait_synced))
            load_url = f"{gw.url}/v1/models/{MODEL}/load"
            missing = httpx.post(load_url, headers=ADMIN, json={"version": 7}, timeout=60)
            assert missing.status_code == 422 and missing.json()["error"]["code"] == "load_failed", missing.text
            assert "still serving version 2" in missing.json()["error"]["message"]
            pinned = httpx.post(load_url, headers=ADMIN, json={"version": 1}, timeout=60)
            assert pinned.status_code == 200 and pinned.json()["served_version"] == 1, pinned.text
        # a restarted gateway has forgotten the pin it made; a load without a version still lifts it
        with BackgroundGateway(settings) as restarted:
            unpinned = httpx.post(f"{restarted.url}/v1/models/{MODEL}/load", headers=ADMIN, timeout=60)
            assert unpinned.status_code == 200 and unpinned.json()["served_version"] == 2, unpinned.text
            inspected = httpx.post(f"{restarted.url}/v1/models/{MODEL}/inspect", content=trained.frame,
                                   headers=PNG, timeout=60)
            assert inspected.status_code == 200 and inspected.json()["version"] == 2, inspected.text
    check_scores(answers, repository, trained.frame)


def test_redeploy_and_rollback_on_embedded_backend(trained: Trained, tmp_path: Path) -> None:
    repository = tmp_path / "model_repository"
    assert export(trained, trained.checkpoints[0], repository) == 1
    settings = Settings(repository=repository, port=0, admin_keys=["admin-secret"], batch_window_ms=2)
    with BackgroundGateway(settings) as gw:
        answers = asyncio.run(redeploy_and_roll_back(gw.url, trained, repository, lambda: None))
        missing = httpx.post(f"{gw.url}/v1/models/{MODEL}/load", headers=ADMIN, json={"version": 7})
        assert missing.status_code == 404 and "version 7" in missing.json()["error"]["message"]
        typo = httpx.post(f"{gw.url}/v1/models/{MODEL}/load", headers=ADMIN, json={"verison": 1})
        assert typo.status_code == 422, typo.text
        still = httpx.get(f"{gw.url}/v1/models").json()["models"][0]
        assert (still["served_version"], still["pinned_version"]) == (2, None)
    check_scores(answers, repository, trained.frame)
