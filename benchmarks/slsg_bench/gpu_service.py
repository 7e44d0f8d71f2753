"""Stage 3 of ``python -m slsg_bench.gpu``: the whole service, JPEG in and JSON out, in front of Triton.

N gateway processes (``python -m slsg.cli serve`` on the Triton backend, as deployed) run against the
stage-2 Triton server. A load generator in separate processes (so it does not share the gateways'
cores' interpreter) posts camera-size JPEG frames over keep-alive HTTP connections spread round-robin
over the gateways, at rising concurrency until the throughput stops growing. Where the time goes
comes from the service itself: every response's ``timings`` (decode, preprocess, infer = the
gateway's micro-batch wait plus the Triton call, postprocess, total), the gateways' ``slsg_batch_size``
metric and Triton's queue and compute times; the client's latency minus the gateway's total is HTTP.
The gateway count grows (1, 2, 4, ...) until one more doubling adds less than ``growth`` throughput:
the smallest count within ``growth`` of the best is how many gateway processes one GPU needs.
"""

from __future__ import annotations

import http.client
import json
import os
import subprocess
import sys
import threading
import time
import urllib.request
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from collections.abc import Iterator

import numpy as np

from slsg_bench.gpu_triton import read_metrics, triton_breakdown

TIMING_KEYS = ("decode_ms", "preprocess_ms", "infer_ms", "postprocess_ms", "total_ms")


@dataclass
class ServiceStageConfig:
    gateway_counts: tuple[int, ...]  # tried in order while the throughput still grows
    start_concurrency_per_gateway: int
    max_concurrency: int
    seconds_per_level: float
    load_processes: int  # load-generator processes
    frame_size: tuple[int, int]  # (width, height) of the JPEG frames
    gateway_max_batch: int  # the gateway's own micro-batch limit (SLSG_MAX_BATCH_SIZE)
    growth: float = 0.05  # a level (or a gateway doubling) must add this share of throughput to go on


# ---------------------------------------------------------------------------------------------
# Gateways


def gateway_env(triton_grpc_url: str, port: int, data_dir: Path, max_batch: int) -> dict[str, str]:
    """A production-like gateway on the Triton backend; records off (they measure the disk, not the GPU)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLSG_")}
    env.update({"SLSG_BACKEND": "triton", "SLSG_TRITON_URL": triton_grpc_url, "SLSG_TRITON_PROTOCOL": "grpc",
                "SLSG_HOST": "127.0.0.1", "SLSG_PORT": str(port), "SLSG_RECORDS": "off",
                "SLSG_RECONCILE_INTERVAL_S": "0", "SLSG_DATA_DIR": str(data_dir), "SLSG_TRITON_TIMEOUT_S": "60",
                "SLSG_MAX_BATCH_SIZE": str(max_batch), "SLSG_MAX_QUEUE": "4096"})
    return env


def start_gateway(triton_grpc_url: str, work_dir: Path, max_batch: int) -> tuple[subprocess.Popen, str]:
    """One ``slsg serve`` process on a free port (its log in ``work_dir``); returns it and its base URL."""
    from slsg_gateway.server import free_port

    port = free_port()
    work_dir.mkdir(parents=True, exist_ok=True)
    with open(work_dir / "gateway.log", "ab") as log:  # the child keeps its own descriptor
        proc = subprocess.Popen([sys.executable, "-m", "slsg.cli", "serve", "--log-level", "warning"],
                                env=gateway_env(triton_grpc_url, port, work_dir, max_batch),
                                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    return proc, f"http://127.0.0.1:{port}"


def stop_gateway(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _wait_serving(proc: subprocess.Popen, url: str, model: str, timeout_s: float, log: Path) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        if proc.poll() is not None:
            tail = log.read_text(encoding="utf-8", errors="replace")[-2000:]
            raise RuntimeError(f"slsg serve exited with {proc.returncode}:\n{tail}")
        try:
            with urllib.request.urlopen(f"{url}/readyz", timeout=2) as response:
                if model in json.loads(response.read()).get("ready_models", []):
                    return
        except (OSError, ValueError):
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"gateway at {url} does not serve {model!r} after {timeout_s:.0f} s (log: {log})")
        time.sleep(0.3)


@contextmanager
def gateways(count: int, triton_grpc_url: str, work_dir: Path, max_batch: int, model: str,
             timeout_s: float = 90.0) -> Iterator[list[str]]:
    """``count`` gateway processes, started together; yields their URLs once each serves ``model``."""
    started: list[tuple[subprocess.Popen, str]] = []
    try:
        for i in range(count):
            started.append(start_gateway(triton_grpc_url, work_dir / f"gateway-{i}", max_batch))
        for i, (proc, url) in enumerate(started):
            _wait_serving(proc, url, model, timeout_s, work_dir / f"gateway-{i}" / "gateway.log")
        yield [url for _, url in started]
    finally:
        for proc, _ in started:
            stop_gateway(proc)


def gateway_batches(urls: list[str], model: str) -> tuple[float, float]:
    """(images, backend calls) summed over the gateways' ``slsg_batch_size`` histograms."""
    images = calls = 0.0
    for url in urls:
        with urllib.request.urlopen(f"{url}/metrics", timeout=10) as response:
            for line in response.read().decode("utf-8", "replace").splitlines():
                if f'model="{model}"' not in line:
                    continue
                if line.startswith("slsg_batch_size_sum"):
                    images += float(line.rsplit(" ", 1)[1])
                elif line.startswith("slsg_batch_size_count"):
                    calls += float(line.rsplit(" ", 1)[1])
    return images, calls


# ---------------------------------------------------------------------------------------------
# Load generator (runs in worker processes)


def _camera(url: str, path: str, jpeg: bytes, stop_at: float, out: dict[str, Any]) -> None:
    """One camera on one keep-alive connection: frames back to back until ``stop_at``."""
    host, port = url.removeprefix("http://").split(":")
    headers = {"Content-Type": "image/jpeg", "X-Line-Id": "bench"}
    conn = http.client.HTTPConnection(host, int(port), timeout=120)
    while time.perf_counter() < stop_at:
        t0 = time.perf_counter()
        try:
            conn.request("POST", path, body=jpeg, headers=headers)
            response = conn.getresponse()
            body = response.read()
        except (OSError, http.client.HTTPException) as exc:
            out["status"][type(exc).__name__] = out["status"].get(type(exc).__name__, 0) + 1
            conn.close()
            conn = http.client.HTTPConnection(host, int(port), timeout=120)
            continue
        elapsed = time.perf_counter() - t0
        out["status"][str(response.status)] = out["status"].get(str(response.status), 0) + 1
        if response.status == 200:
            out["latency_s"].append(elapsed)
            timings = json.loads(body)["timings"]
            for key in TIMING_KEYS:
                out[key].append(timings[key])
    conn.close()


def load_worker(urls: list[str], model: str, jpeg: bytes, cameras: int, first: int, seconds: float) -> dict[str, Any]:
    """``cameras`` threads, camera i on gateway (first + i) mod len(urls); lists of what they saw."""
    stop_at = time.perf_counter() + seconds
    outs = [{"status": {}, "latency_s": [], **{k: [] for k in TIMING_KEYS}} for _ in range(cameras)]
    path = f"/v1/models/{model}/inspect"
    threads = [threading.Thread(target=_camera, args=(urls[(first + i) % len(urls)], path, jpeg, stop_at, outs[i]),
                                daemon=True) for i in range(cameras)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    merged: dict[str, Any] = {"status": {}, "latency_s": [], **{k: [] for k in TIMING_KEYS}}
    for out in outs:
        for code, n in out["status"].items():
            merged["status"][code] = merged["status"].get(code, 0) + n
        for key in ("latency_s", *TIMING_KEYS):
            merged[key].extend(out[key])
    return merged


# ---------------------------------------------------------------------------------------------
# Levels


def split_cameras(concurrency: int, processes: int) -> list[int]:
    """Cameras per load process: as even as possible, no empty process."""
    processes = max(1, min(processes, concurrency))
    return [concurrency // processes + (i < concurrency % processes) for i in range(processes)]


def _median(values: list[float]) -> float | None:
    return round(float(np.median(values)), 3) if values else None


def run_level(pool: ProcessPoolExecutor, urls: list[str], model: str, jpeg: bytes, concurrency: int,
              cfg: ServiceStageConfig, triton_metrics: str) -> dict[str, Any]:
    """One concurrency level: throughput, latency, the service's time split and the batches formed."""
    shares = split_cameras(concurrency, cfg.load_processes)
    firsts = np.cumsum([0, *shares[:-1]]).tolist()
    triton_before, gw_before = read_metrics(triton_metrics, model), gateway_batches(urls, model)
    start = time.perf_counter()
    futures = [pool.submit(load_worker, urls, model, jpeg, n, first, cfg.seconds_per_level)
               for n, first in zip(shares, firsts)]
    parts = [f.result() for f in futures]
    wall = time.perf_counter() - start
    triton_after, gw_after = read_metrics(triton_metrics, model), gateway_batches(urls, model)
    merged = {key: [v for p in parts for v in p[key]] for key in ("latency_s", *TIMING_KEYS)}
    status: dict[str, int] = {}
    for p in parts:
        for code, n in p["status"].items():
            status[code] = status.get(code, 0) + n
    ok = len(merged["latency_s"])
    ms = np.asarray(merged["latency_s"]) * 1e3
    server = {key.removesuffix("_ms"): _median(merged[key]) for key in TIMING_KEYS}
    calls = gw_after[1] - gw_before[1]
    return {
        "concurrency": concurrency, "seconds": round(wall, 2), "ok": ok, "failures": sum(status.values()) - ok,
        "status_counts": status, "images_per_s": round(ok / wall, 2),
        "latency_ms": {"p50": round(float(np.median(ms)), 3), "p99": round(float(np.percentile(ms, 99)), 3)}
        if ok else None,
        "server_median_ms": server,
        "http_overhead_ms": round(float(np.median(ms)) - server["total"], 3) if ok and server["total"] else None,
        "gateway_mean_batch": round((gw_after[0] - gw_before[0]) / calls, 3) if calls else None,
        "triton": triton_breakdown(triton_before, triton_after),
    }


def concurrency_levels(gateways_n: int, cfg: ServiceStageConfig) -> list[int]:
    level = max(1, gateways_n * cfg.start_concurrency_per_gateway)
    levels = []
    while level <= cfg.max_concurrency:
        levels.append(level)
        level *= 2
    return levels or [cfg.max_concurrency]


def sweep(pool: ProcessPoolExecutor, urls: list[str], model: str, jpeg: bytes, cfg: ServiceStageConfig,
          triton_metrics: str, deadline: Any, messages: list[str]) -> list[dict[str, Any]]:
    """Rising concurrency until the throughput grows by less than ``growth`` (or fails, or time is up)."""
    levels: list[dict[str, Any]] = []
    for concurrency in concurrency_levels(len(urls), cfg):
        if deadline.remaining() < cfg.seconds_per_level + 10:
            messages.append(f"{len(urls)} gateways, concurrency {concurrency}: skipped, over the time budget")
            break
        print(f"gpu bench: stage 3: {len(urls)} gateway(s), {concurrency} cameras for {cfg.seconds_per_level:g} s ...",
              flush=True)
        level = run_level(pool, urls, model, jpeg, concurrency, cfg, triton_metrics)
        levels.append(level)
        best_before = max((lv["images_per_s"] for lv in levels[:-1]), default=0.0)
        if level["ok"] == 0 or level["failures"] > level["ok"]:
            messages.append(f"{len(urls)} gateways, concurrency {concurrency}: mostly failures "
                            f"({level['status_counts']}); not going higher")
            break
        if best_before and level["images_per_s"] < best_before * (1 + cfg.growth):
            break  # throughput stopped growing
    return levels


def gateways_needed(best_by_count: dict[int, float], growth: float) -> int | None:
    """The smallest gateway count whose best throughput is within ``growth`` of the overall best."""
    if not best_by_count:
        return None
    top = max(best_by_count.values())
    return min(n for n, v in best_by_count.items() if v >= top * (1 - growth))


def run_service_stage(triton: Any, model: str, cfg: ServiceStageConfig, work_dir: Path,
                      deadline: Any) -> dict[str, Any]:
    """Stage 3's report: a concurrency sweep per gateway count, and how many gateways one GPU needs."""
    from slsg_bench.frames import camera_jpeg

    jpeg = camera_jpeg(*cfg.frame_size)
    messages: list[str] = []
    runs: list[dict[str, Any]] = []
    best: dict[int, float] = {}
    import multiprocessing

    with ProcessPoolExecutor(cfg.load_processes, mp_context=multiprocessing.get_context("spawn")) as pool:
        for count in cfg.gateway_counts:
            if deadline.remaining() < 2 * cfg.seconds_per_level + 20:
                messages.append(f"{count} gateways: skipped, over the time budget")
                break
            print(f"gpu bench: stage 3: starting {count} gateway process(es) ...", flush=True)
            with gateways(count, triton.grpc_url, work_dir / f"gateways-{count}", cfg.gateway_max_batch, model) as urls:
                levels = sweep(pool, urls, model, jpeg, cfg, triton.metrics_url, deadline, messages)
            if not levels:
                break
            runs.append({"gateways": count, "levels": levels})
            best[count] = max(level["images_per_s"] for level in levels)
            previous = [v for n, v in best.items() if n < count]
            if previous and best[count] < max(previous) * (1 + cfg.growth):
                break  # one more gateway process no longer pays
    return {"frame_size": list(cfg.frame_size), "jpeg_bytes": len(jpeg), "gateway_max_batch": cfg.gateway_max_batch,
            "load_processes": cfg.load_processes, "runs": runs,
            "best_images_per_s": {str(n): v for n, v in best.items()},
            "gateways_needed": gateways_needed(best, cfg.growth), "messages": messages}
