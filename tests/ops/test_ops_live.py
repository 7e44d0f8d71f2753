"""The monitoring stack against real servers on loopback: a real Prometheus (the Debian binary)
with the production rules, scraping a real gateway that serves the toy contract model through a
real local Triton (CPU). After real inspections, every dashboard query and every recording rule
returns data, the rules evaluate without error, and the availability alerts stay quiet. The
containers' health-check commands (Triton's script, the gateway image's HEALTHCHECK) run
against these live servers too.

Excluded from the "returns data" check: the GPU panel (nv_gpu_*), which a CPU-only Triton does
not export. Without a tritonserver binary the gateway falls back to the embedded ONNX Runtime
backend and every Triton (nv_*) query is excluded as well.
"""

from __future__ import annotations

import math
import os
import re
import sys
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
import yaml

from support import free_ports, png_bytes
from onnx_fixtures import make_card, write_contract_model
from slsg.contract import model_path, write_serving_state
from slsg.triton_config import write_config
from slsg_gateway.server import BackgroundGateway
from slsg_gateway.settings import Settings
from test_ops_dashboards import dashboard_queries
from test_ops_prometheus import PROMETHEUS_DIR, rules

pytestmark = pytest.mark.slow
MODEL, LINES, API_KEY = "toy", ["line-1", "line-2"], "station-key"
METRICS_KEY = "prometheus-scrape-key"
DOCKER_DIR = Path(__file__).resolve().parents[2] / "docker"
HEALTHCHECK = DOCKER_DIR / "triton" / "healthcheck.sh"


@dataclass
class Stack:
    prometheus: str  # base URL
    gateway: str
    triton: object | None  # LocalTriton when a tritonserver binary exists


def frame_png(anomalous: bool) -> bytes:
    pixels = np.full((96, 128, 3), 128, np.uint8)
    if anomalous:
        pixels[20:60, 40:90] = (255, 0, 0)  # the toy model scores red
    return png_bytes(pixels)


def loopback_config(gateway_port: int, triton_metrics_port: int | None, metrics_key_file: Path) -> dict:
    """The production prometheus.yml with DNS discovery swapped for loopback targets and 1 s intervals.

    The gateway's /metrics is closed (API keys are set): Prometheus scrapes it with its own metrics key,
    as the comment in prometheus.yml describes for a Prometheus outside the compose network."""
    config = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())
    config["global"].update(scrape_interval="1s", scrape_timeout="1s", evaluation_interval="1s")
    config["rule_files"] = [str(PROMETHEUS_DIR / pattern) for pattern in config["rule_files"]]
    targets = {"slsg-gateway": gateway_port, "triton": triton_metrics_port}
    jobs = []
    for job in config["scrape_configs"]:
        if job["job_name"] in targets:
            if targets[job["job_name"]] is None:
                continue
            job.pop("dns_sd_configs")
            job["static_configs"] = [{"targets": [f"127.0.0.1:{targets[job['job_name']]}"]}]
            if job["job_name"] == "slsg-gateway":
                job["authorization"] = {"type": "Bearer", "credentials_file": str(metrics_key_file)}
        jobs.append(job)
    config["scrape_configs"] = jobs
    return config


def prometheus_binary() -> str:
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip("prometheus not found: apt-get install -y prometheus (Debian/Ubuntu) provides it")
    return binary


def start_prometheus(binary: str, config: dict, workdir: Path, port: int) -> subprocess.Popen:
    path = workdir / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    log = open(workdir / "prometheus.log", "wb")
    process = subprocess.Popen([binary, f"--config.file={path}", f"--storage.tsdb.path={workdir / 'tsdb'}",
                                f"--web.listen-address=127.0.0.1:{port}"], stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"prometheus exited: {(workdir / 'prometheus.log').read_text()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/-/ready", timeout=1).status_code == 200:
                return process
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    process.terminate()
    raise RuntimeError("prometheus did not become ready in 30 s")


def start_triton(repository: Path):
    """A real Triton on CPU over the repository, or None when no tritonserver binary is installed."""
    try:
        from slsg_triton import local as triton_local
    except ImportError:
        return None
    try:
        triton_local.find_tritonserver()
    except triton_local.TritonNotFoundError:
        return None
    http, grpc, metrics = free_ports(3)
    return triton_local.LocalTriton(repository, http, grpc, metrics, model_control_mode="explicit",
                                    load_models=[MODEL]).start()


def query(base: str, expr: str) -> list[dict]:
    body = httpx.get(f"{base}/api/v1/query", params={"query": expr}, timeout=10).json()
    assert body["status"] == "success", f"{expr}: {body}"
    return body["data"]["result"]


def wait_for(base: str, expr: str, minimum: float, timeout_s: float = 20.0) -> None:
    """Until Prometheus has scraped the value ``expr`` >= minimum (and evaluated the rules once more)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        result = query(base, expr)
        if result and float(result[0]["value"][1]) >= minimum:
            time.sleep(2.5)  # two more rule evaluations, so recorded series see the new samples
            return
        time.sleep(0.3)
    raise AssertionError(f"Prometheus never saw {expr} >= {minimum}")


# one wave: (line, anomalous) per single-frame request; the first four create every decision series
WAVE = [("line-1", True), ("line-1", False), ("line-2", True), ("line-2", False),
        ("line-1", True), ("line-1", False), ("line-2", False), ("line-2", False),
        ("line-1", True), ("line-1", False), ("line-2", False), ("line-2", False)]
EXPECTED_ANOMALY_RATIO = {"line-1": 4 / 8, "line-2": 1 / 6}  # with the batch of two below on line-1


def inspect_wave(client: httpx.Client) -> int:
    """The WAVE as single-frame inspections plus one batch of two frames (one anomalous) on line-1."""
    for line, anomalous in WAVE:
        response = client.post(f"/v1/models/{MODEL}/inspect", content=frame_png(anomalous),
                               headers={"Content-Type": "image/png", "X-Line-Id": line})
        assert response.status_code == 200, response.text
        assert response.json()["is_anomalous"] is anomalous
    files = [("files", (f"{i}.png", frame_png(anomalous=bool(i)), "image/png")) for i in range(2)]
    response = client.post(f"/v1/models/{MODEL}/inspect:batch", files=files, headers={"X-Line-Id": "line-1"})
    assert response.status_code == 200, response.text
    return len(WAVE) + len(files)


def review_flagged(client: httpx.Client) -> None:
    """An operator confirms one flagged frame and calls another a false alarm (the review panels' data)."""
    deadline = time.monotonic() + 20
    while True:  # records are written in the background
        pending = client.get("/v1/inspections", params={"decision": "anomalous", "review": "pending",
                                                        "limit": 2}).json()["records"]
        if len(pending) == 2 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert len(pending) == 2, "the gateway recorded fewer than two flagged frames"
    for record, verdict in zip(pending, ("defect", "false_alarm")):
        response = client.post(f"/v1/inspections/{record['id']}/review", json={"verdict": verdict, "reviewer": "ops"})
        assert response.status_code == 200, response.text


@pytest.fixture(scope="module")
def stack(tmp_path_factory) -> Iterator[Stack]:
    binary = prometheus_binary()
    work = tmp_path_factory.mktemp("ops_live")
    repository = work / "models"
    card = make_card(MODEL, size=64)
    write_contract_model(model_path(repository, MODEL, 1), card)
    write_config(repository, MODEL, card, gpu=False, max_batch_size=8)
    write_serving_state(repository, MODEL, 1)  # the desired-state panel's data (`slsg deploy toy --version 1`)
    time.sleep(0.5)  # LocalTriton publishes a version only once its files are 0.3 s old
    triton = start_triton(repository)
    try:
        backend = ({"backend": "triton", "triton_url": triton.grpc_url, "serving_root": repository} if triton
                   else {"repository": repository})
        settings = Settings(port=0, api_keys=[API_KEY], metrics_keys=[METRICS_KEY], lines=LINES, batch_window_ms=5,
                            **backend)
        key_file = work / "metrics_key"
        key_file.write_text(METRICS_KEY)
        with BackgroundGateway(settings) as gateway:
            (prometheus_port,) = free_ports(1)
            config = loopback_config(gateway.settings.port, triton.metrics_port if triton else None, key_file)
            process = start_prometheus(binary, config, work, prometheus_port)
            try:
                base = f"http://127.0.0.1:{prometheus_port}"
                with httpx.Client(base_url=gateway.url, headers={"X-API-Key": API_KEY}, timeout=30) as client:
                    # two waves with a scrape between them, so every rate() is positive
                    first = inspect_wave(client)
                    review_flagged(client)
                    wait_for(base, "sum(slsg_decisions_total)", first)
                    second = inspect_wave(client)
                    review_flagged(client)
                    wait_for(base, "sum(slsg_decisions_total)", first + second)
                    wait_for(base, "sum(slsg_reviews_total)", 4)
                yield Stack(base, gateway.url, triton)
            finally:
                process.terminate()
                process.wait(timeout=10)
    finally:
        if triton:
            triton.stop()


def excluded(expr: str, stack: Stack) -> bool:
    return "nv_gpu_" in expr or (stack.triton is None and "nv_" in expr)


def test_every_dashboard_query_returns_data(stack):
    """Each query gives at least one finite value, and every series carries the labels its legend shows."""
    checked, empty, unlabelled = 0, [], []
    for where, expr, legend in dashboard_queries():
        if excluded(expr, stack):
            continue
        series = query(stack.prometheus, expr)
        checked += 1
        if not any(math.isfinite(float(s["value"][1])) for s in series):
            empty.append(f"{where}: {expr}")
        unlabelled += [f"{where}: {sorted(legend - set(s['metric']))}" for s in series if legend - set(s["metric"])]
    assert checked >= 30
    assert empty == [], "queries without data:\n" + "\n".join(empty)
    assert unlabelled == [], "series without their legend's labels:\n" + "\n".join(unlabelled)


def test_every_recording_rule_has_data(stack):
    recorded = [r["record"] for r in rules() if "record" in r]
    missing = [name for name in recorded if not (excluded(name, stack) or query(stack.prometheus, name))]
    assert missing == []


def test_recorded_anomaly_ratio_matches_what_was_sent(stack):
    """The recorded per-line anomaly ratio is what was sent (up to rate() extrapolation)."""
    ratios = {s["metric"]["line"]: float(s["value"][1])
              for s in query(stack.prometheus, f'model_line:slsg_anomaly_ratio:rate5m{{model="{MODEL}"}}')}
    assert ratios == pytest.approx(EXPECTED_ANOMALY_RATIO, abs=0.05)


def test_rules_evaluate_without_errors_and_availability_alerts_stay_quiet(stack):
    groups = httpx.get(f"{stack.prometheus}/api/v1/rules", timeout=10).json()["data"]["groups"]
    loaded = [rule for group in groups for rule in group["rules"]]
    assert len(loaded) == len(rules())
    assert [r["name"] for r in loaded if r["health"] != "ok"] == []
    quiet = "SLSGGatewayDown|TritonNotReady" if stack.triton else "SLSGGatewayDown"
    # pending counts too: a job-name mismatch would make absent() fire at once
    assert query(stack.prometheus, f'ALERTS{{alertname=~"{quiet}"}}') == []


def test_triton_container_healthcheck(stack):
    if stack.triton is None:
        pytest.skip("no tritonserver binary: nothing to health-check")
    ready = subprocess.run(["bash", str(HEALTHCHECK), str(stack.triton.http_port)], capture_output=True, timeout=10)
    assert ready.returncode == 0, ready.stderr
    (closed,) = free_ports(1)
    down = subprocess.run(["bash", str(HEALTHCHECK), str(closed)], capture_output=True, timeout=10)
    assert down.returncode != 0


def test_gateway_image_healthcheck(stack):
    """The gateway Dockerfile's HEALTHCHECK command, run as written against the live gateway."""
    text = (DOCKER_DIR / "gateway.Dockerfile").read_text().replace("\\\n", " ")
    (command,) = re.findall(r"^HEALTHCHECK .*? CMD (.+)$", text, flags=re.M)
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"  # `python` = this interpreter
    port = int(stack.gateway.rsplit(":", 1)[1])
    (closed,) = free_ports(1)
    results = {p: subprocess.run(["sh", "-c", command], env={**os.environ, "PATH": path, "SLSG_PORT": str(p)},
                                 capture_output=True, timeout=30).returncode for p in (port, closed)}
    assert results == {port: 0, closed: 1}
