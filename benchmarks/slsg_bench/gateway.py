"""``slsg bench gateway``: the inspection gateway end to end against the bare model.

One run starts a real gateway (``BackgroundGateway``: uvicorn on a loopback port, embedded ONNX
Runtime backend with the same thread count as the bare model) and measures:

- latency at concurrency 1 vs ONNX Runtime alone on the same frame already decoded and resized
  (the gateway's overhead ratio), and vs decode + ORT;
- throughput at each concurrency vs the bare model's best batched throughput;
- JPEG decode + resize of the frame with and without Pillow's draft mode (``decode_frame``);
- the process's resident memory before and after ``memory_requests`` more requests (growth %).

The HTTP client runs in this process (threads), as the gateway does: its cost is part of the
figures, which therefore overstate the gateway's own overhead a little. ``slsg bench load`` drives
the gateway from a separate locust process instead.
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from slsg_bench.frames import LOCO_FRAME_SIZE, camera_jpeg
from slsg_bench.model import open_session, ort_engine, resolve_model, session_input_size
from slsg_bench.report import Table, environment, format_cell, percentile_timing, ratio, time_calls


@dataclass
class GatewayBenchConfig:
    repository: Path
    name: str
    frame_size: tuple[int, int] = LOCO_FRAME_SIZE  # (width, height) of the JPEG sent
    concurrency: tuple[int, ...] = (1, 8)
    requests: int = 40  # timed requests per concurrency level (after warm-up)
    warmup: int = 4
    memory_requests: int = 200  # requests between the two memory readings (the target: 10,000)
    threads: int = 1
    iterations: int = 20  # bare-model and decode timings
    max_batch_size: int = 8  # the gateway's micro-batch limit; also the bare model's batched run
    separate_process: bool = True  # gateway in its own `slsg serve` process, as in production


def wait_ready(url: str, deadline: float, process: subprocess.Popen | None = None) -> None:
    """Poll ``url``/readyz until it answers 200; RuntimeError once ``time.monotonic()`` passes ``deadline``
    or ``process`` (the gateway's, when the caller started it) has exited."""
    import httpx

    while True:
        if process is not None and process.poll() is not None:
            stderr = process.stderr.read()[-2000:] if process.stderr else ""
            raise RuntimeError(f"slsg serve exited with {process.returncode}: {stderr}")
        try:
            if httpx.get(f"{url}/readyz", timeout=1.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"slsg serve not ready on {url} by its deadline")
        time.sleep(0.2)


@contextmanager
def serve_subprocess(settings_env: dict[str, str], timeout_s: float = 60.0):
    """A real `slsg serve` on a free loopback port; yields (base url, pid); stopped with SIGTERM."""

    from slsg_gateway.server import free_port

    port = free_port()
    slsg = Path(sys.executable).parent / "slsg"
    env = {**os.environ, **settings_env, "SLSG_HOST": "127.0.0.1", "SLSG_PORT": str(port)}
    proc = subprocess.Popen([str(slsg), "serve", "--log-level", "warning"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, time.monotonic() + timeout_s, proc)
        yield url, proc.pid
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()


def resident_memory_mb(pid: int | None = None) -> float | None:
    """Resident set size in MiB of this process (or ``pid``), from Linux /proc; None where unavailable."""
    try:
        with open(f"/proc/{pid or 'self'}/statm", encoding="ascii") as f:
            pages = int(f.read().split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return pages * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


def bench_decode(jpeg: bytes, input_size: tuple[int, int], iterations: int, max_pixels: int) -> dict[str, Any]:
    """decode_frame with Pillow draft mode (as the gateway runs) vs a full decode then resize."""
    from slsg_gateway.imaging import decode_frame

    out = {}
    for label, min_ratio in (("draft", 2.0), ("full", float("inf"))):
        frame = decode_frame(jpeg, input_size, max_pixels=max_pixels, draft_min_ratio=min_ratio)
        timing = time_calls(lambda: decode_frame(jpeg, input_size, max_pixels=max_pixels, draft_min_ratio=min_ratio),
                            iterations)
        out[label] = {"ms": timing.to_dict(), "draft_used": frame.draft}
    out["draft_speedup"] = ratio(out["full"]["ms"]["median_ms"], out["draft"]["ms"]["median_ms"])
    return out


def bench_bare_model(path: Path, pixels: np.ndarray, threads: int, iterations: int,
                     max_batch: int) -> dict[str, Any]:
    """ORT alone on the decoded frame: batch-1 latency and the best of batch 1 / ``max_batch`` throughput."""
    engine = ort_engine(open_session(path, threads))
    out: dict[str, Any] = {}
    for batch_size in sorted({1, max_batch}):
        batch = np.repeat(pixels[None], batch_size, axis=0)
        timing = time_calls(lambda: engine.run(batch), iterations)
        out[str(batch_size)] = {"batch_ms": timing.to_dict(),
                                "images_per_s": round(batch_size / (timing.median_ms / 1e3), 3)}
    out["best_images_per_s"] = max(v["images_per_s"] for v in out.values())
    return out


def drive(url: str, jpeg: bytes, concurrency: int, requests: int, warmup: int = 0) -> dict[str, Any]:
    """POST ``requests`` frames from ``concurrency`` client threads (each its own connection)."""
    import httpx

    headers = {"Content-Type": "image/jpeg", "X-Line-Id": "bench", "X-Camera-Id": "bench-0"}
    tickets = itertools.count()
    lock = threading.Lock()
    latencies: list[float] = []
    server_ms: dict[str, list[float]] = {"total_ms": [], "infer_ms": [], "decode_ms": []}
    statuses: dict[str, int] = {}

    ready = threading.Barrier(concurrency + 1)  # the clock starts once every client has warmed up

    def worker() -> None:
        with httpx.Client(timeout=120.0) as client:
            try:
                for _ in range(warmup):
                    client.post(url, content=jpeg, headers=headers)
            finally:
                ready.wait()
            while next(tickets) < requests:
                start = time.perf_counter()
                try:
                    response = client.post(url, content=jpeg, headers=headers)
                except httpx.HTTPError as exc:  # a dropped connection is a failure, not a crash of the bench
                    with lock:
                        key = type(exc).__name__
                        statuses[key] = statuses.get(key, 0) + 1
                    continue
                elapsed = time.perf_counter() - start
                with lock:
                    statuses[str(response.status_code)] = statuses.get(str(response.status_code), 0) + 1
                    if response.status_code == 200:
                        latencies.append(elapsed)
                        timings = response.json()["timings"]
                        for key, values in server_ms.items():
                            values.append(timings[key])

    with ThreadPoolExecutor(concurrency, thread_name_prefix="bench-client") as pool:
        futures = [pool.submit(worker) for _ in range(concurrency)]
        ready.wait()
        start = time.perf_counter()
        for future in futures:
            future.result()
    wall = time.perf_counter() - start
    ok = len(latencies)
    return {
        "concurrency": concurrency, "requests": requests, "ok": ok, "failures": requests - ok,
        "status_counts": statuses,
        "latency_ms": percentile_timing(latencies).to_dict() if ok else None,
        "server_median_ms": {k: round(float(np.median(v)), 3) for k, v in server_ms.items()} if ok else None,
        "requests_per_s": round(ok / wall, 3),
    }


def run_gateway_bench(cfg: GatewayBenchConfig) -> dict[str, Any]:
    """Measure everything and return the JSON-ready report."""
    from tqdm import tqdm

    from slsg_gateway.imaging import decode_frame
    from slsg_gateway.server import BackgroundGateway
    from slsg_gateway.settings import Settings

    if cfg.requests < 1 or min(cfg.concurrency, default=0) < 1 or cfg.threads < 1:
        raise ValueError("requests, threads and every concurrency level must be >= 1")
    env = environment(cfg.threads)
    version, path = resolve_model(cfg.repository, cfg.name, None)  # the gateway serves the newest
    input_size = session_input_size(open_session(path, 1))
    settings = Settings(repository=Path(cfg.repository), host="127.0.0.1", port=0, ort_threads=cfg.threads,
                        max_batch_size=cfg.max_batch_size)
    jpeg = camera_jpeg(*cfg.frame_size)
    pixels = decode_frame(jpeg, input_size, max_pixels=settings.max_pixels).pixels
    decode = bench_decode(jpeg, input_size, cfg.iterations, settings.max_pixels)
    bare = bench_bare_model(path, pixels, cfg.threads, cfg.iterations, cfg.max_batch_size)
    levels = []
    if cfg.separate_process:
        server = serve_subprocess({"SLSG_REPOSITORY": str(cfg.repository), "SLSG_ORT_THREADS": str(cfg.threads),
                                   "SLSG_MAX_BATCH_SIZE": str(cfg.max_batch_size)})
    else:
        server = _in_process(BackgroundGateway(settings))
    with server as (base_url, pid):
        url = f"{base_url}/v1/models/{cfg.name}/inspect"
        rss_start = resident_memory_mb(pid)
        for concurrency in tqdm(cfg.concurrency, desc="bench gateway", unit="level", leave=False):
            levels.append(drive(url, jpeg, concurrency, cfg.requests, warmup=cfg.warmup if concurrency == 1 else 1))
        memory = soak_memory(url, jpeg, max(cfg.concurrency), cfg.memory_requests, pid=pid)
    memory["rss_mb_after_start"] = _round(rss_start)
    memory["process"] = "gateway subprocess" if cfg.separate_process else "bench process (gateway + client)"
    return _gateway_report(cfg, env, version, input_size, len(jpeg), decode, bare, levels, memory)


@contextmanager
def _in_process(gateway):
    with gateway:
        yield gateway.url, None


def soak_memory(url: str, jpeg: bytes, concurrency: int, requests: int, samples: int = 5,
                pid: int | None = None) -> dict[str, Any]:
    """Resident memory before and after each of ``samples`` equal slices of ``requests`` requests.

    The curve tells a plateau (allocator arenas and pools filling up, growth in the first slices
    only) from a leak (the same growth in every slice); ``late_growth_percent`` is the second half's.
    """
    from tqdm import tqdm

    slices = [requests // samples + (i < requests % samples) for i in range(samples)] if requests else []
    rss = [resident_memory_mb(pid)]
    failures = 0
    with tqdm(total=requests, desc="memory soak", unit="req", leave=False) as bar:
        for size in (s for s in slices if s):
            failures += drive(url, jpeg, concurrency, size)["failures"]
            rss.append(resident_memory_mb(pid))
            bar.update(size)
    known = None not in rss and len(rss) > 1
    half = rss[len(rss) // 2] if known else None
    return {
        "requests": requests, "concurrency": concurrency, "failures": failures if requests else None,
        "rss_mb": [_round(v) for v in rss],
        "growth_percent": round(100.0 * (rss[-1] - rss[0]) / rss[0], 3) if known else None,
        "late_growth_percent": round(100.0 * (rss[-1] - half) / half, 3) if known else None,
        "target": "flat within 10% over 10,000 requests",
    }


def _gateway_report(cfg: GatewayBenchConfig, env: dict[str, Any], version: int, input_size: tuple[int, int],
                    jpeg_bytes: int, decode: dict[str, Any], bare: dict[str, Any], levels: list[dict[str, Any]],
                    memory: dict[str, Any]) -> dict[str, Any]:
    bare_ms = bare["1"]["batch_ms"]["median_ms"]
    by_level = {str(level["concurrency"]): level for level in levels}
    single = by_level.get("1")
    single_ms = single["latency_ms"]["median_ms"] if single and single["latency_ms"] else None
    busiest = levels[-1]
    return {
        "benchmark": "gateway",
        "environment": env,
        "model": {"name": cfg.name, "version": version, "input_size": list(input_size)},
        "settings": {"threads": cfg.threads, "frame_size": list(cfg.frame_size), "jpeg_bytes": jpeg_bytes,
                     "requests": cfg.requests, "concurrency": list(cfg.concurrency),
                     "memory_requests": cfg.memory_requests, "max_batch_size": cfg.max_batch_size},
        "decode": decode,
        "bare_model": bare,
        "gateway": by_level,
        "memory": memory,
        "ratios": {
            "latency_overhead_vs_bare_model": ratio(single_ms, bare_ms),
            "latency_overhead_vs_decode_plus_model": ratio(single_ms, bare_ms + decode["draft"]["ms"]["median_ms"]),
            "throughput_vs_bare_best": ratio(busiest["requests_per_s"], bare["best_images_per_s"]),
            "throughput_concurrency": busiest["concurrency"],
            "draft_decode_speedup": decode["draft_speedup"],
        },
    }


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 2)


def gateway_tables(report: dict[str, Any]) -> list[Table]:
    m, s, bare, dec = report["model"], report["settings"], report["bare_model"], report["decode"]
    rows = [["bare ORT, decoded frame, batch 1", 1, bare["1"]["batch_ms"]["median_ms"],
             bare["1"]["batch_ms"]["p95_ms"], bare["1"]["images_per_s"], None, 0]]
    batched = str(s["max_batch_size"])
    if batched in bare and batched != "1":
        rows.append([f"bare ORT, batch {batched} (per image)", 1, bare[batched]["batch_ms"]["median_ms"] / int(batched),
                     None, bare[batched]["images_per_s"], None, 0])
    for level in report["gateway"].values():
        lat = level["latency_ms"] or {}
        server = level["server_median_ms"] or {}
        rows.append([f"gateway /inspect JPEG {s['frame_size'][0]}x{s['frame_size'][1]}", level["concurrency"],
                     lat.get("median_ms"), lat.get("p95_ms"), level["requests_per_s"], server.get("infer_ms"),
                     level["failures"]])
    main = Table(f"gateway on {m['name']} v{m['version']} {m['input_size'][0]}x{m['input_size'][1]}, "
                 f"{s['threads']} ORT threads, {s['requests']} requests per level",
                 ["path", "concurrency", "median ms", "p95 ms", "per s", "server infer ms", "failures"], rows)
    decode = Table("decode + resize of the JPEG to the model input",
                   ["mode", "median ms", "p95 ms", "draft used"],
                   [[k, dec[k]["ms"]["median_ms"], dec[k]["ms"]["p95_ms"], dec[k]["draft_used"]]
                    for k in ("draft", "full")])
    mem, r = report["memory"], report["ratios"]
    summary = Table("ratios and memory", ["measure", "value"], [
        ["latency overhead: gateway c1 / bare ORT", r["latency_overhead_vs_bare_model"]],
        ["latency overhead: gateway c1 / (draft decode + ORT)", r["latency_overhead_vs_decode_plus_model"]],
        [f"throughput: gateway c{r['throughput_concurrency']} / bare best batched", r["throughput_vs_bare_best"]],
        ["draft-mode decode speed-up", r["draft_decode_speedup"]],
        ["RSS MiB after start", mem["rss_mb_after_start"]],
        [f"RSS MiB every {mem['requests'] // max(1, len(mem['rss_mb']) - 1)} requests (c{mem['concurrency']})",
         " ".join(f"{v:.0f}" for v in mem["rss_mb"] if v is not None)],
        [f"RSS growth % over {mem['requests']} requests (second half)",
         f"{format_cell(mem['growth_percent'])} ({format_cell(mem['late_growth_percent'])})"],
    ])
    return [main, decode, summary]
