"""``slsg bench load``: a locust camera-mix load test against a gateway started for the run.

The gateway runs in this process (``BackgroundGateway``, embedded ONNX Runtime backend on a
free loopback port); locust runs headless in a child process with ``--csv`` (so the load
generator does not share the gateway's interpreter), and its CSV statistics are turned into
p50/p95/p99 latency, throughput and failures. The gateway's resident memory is read before
and after the run.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from slsg_bench.gateway import resident_memory_mb
from slsg_bench.model import resolve_model
from slsg_bench.report import Table, environment

AGGREGATED = "Aggregated"


def default_locustfile() -> Path:
    """``benchmarks/slsg_bench/locustfile.py`` of the source tree this package runs from."""
    return Path(__file__).with_name("locustfile.py")


def parse_duration(text: str) -> int:
    """``"20s"``, ``"2m"``, ``"1h"`` or plain seconds -> seconds (locust's --run-time forms)."""
    units = {"s": 1, "m": 60, "h": 3600}
    text = text.strip().lower()
    try:
        seconds = int(text[:-1]) * units[text[-1]] if text[-1] in units else int(text)
    except (ValueError, IndexError):
        raise ValueError(f"duration {text!r}: expected e.g. 20s, 2m or 30") from None
    if seconds < 1:
        raise ValueError(f"duration {text!r}: must be at least 1 s")
    return seconds


@dataclass
class LoadBenchConfig:
    repository: Path
    name: str
    users: int = 8  # cameras
    duration_s: int = 20
    spawn_rate: float = 0.0  # users started per second; 0 = all at once
    lines: int = 3
    cameras_per_line: int = 4
    fps: tuple[float, float] = (1.0, 3.0)
    frame_size: tuple[int, int] = (1600, 1280)
    threads: int = 1  # ONNX Runtime threads in the gateway
    locustfile: Path | None = None


def locust_command(cfg: LoadBenchConfig, host: str, csv_prefix: Path) -> list[str]:
    locustfile = Path(cfg.locustfile) if cfg.locustfile else default_locustfile()
    if not locustfile.is_file():
        raise FileNotFoundError(f"locustfile {locustfile} not found (pass --locustfile)")
    return [sys.executable, "-m", "locust", "-f", str(locustfile), "--headless",
            "--users", str(cfg.users), "--spawn-rate", str(cfg.spawn_rate or cfg.users),
            "--run-time", f"{cfg.duration_s}s", "--stop-timeout", "10", "--host", host,
            "--csv", str(csv_prefix), "--only-summary", "--loglevel", "WARNING"]


def locust_environment(cfg: LoadBenchConfig) -> dict[str, str]:
    return dict(os.environ, SLSG_LOAD_MODEL=cfg.name, SLSG_LOAD_LINES=str(cfg.lines),
                SLSG_LOAD_CAMERAS_PER_LINE=str(cfg.cameras_per_line), SLSG_LOAD_FPS=f"{cfg.fps[0]}-{cfg.fps[1]}",
                SLSG_LOAD_FRAME_SIZE=f"{cfg.frame_size[0]}x{cfg.frame_size[1]}")


def read_locust_stats(csv_prefix: Path) -> dict[str, Any]:
    """The ``Aggregated`` row of locust's ``<prefix>_stats.csv`` as numbers."""
    path = Path(f"{csv_prefix}_stats.csv")
    if not path.is_file():
        raise FileNotFoundError(f"locust wrote no statistics at {path}")
    with open(path, newline="", encoding="utf-8") as f:
        rows = {row["Name"]: row for row in csv.DictReader(f)}
    if AGGREGATED not in rows:
        raise ValueError(f"{path}: no {AGGREGATED!r} row (columns: {list(next(iter(rows.values()), {}))})")
    row = rows[AGGREGATED]
    number = lambda key: float(row[key]) if row.get(key) not in (None, "", "N/A") else None  # noqa: E731
    return {
        "requests": int(row["Request Count"]), "failures": int(row["Failure Count"]),
        "requests_per_s": _round(number("Requests/s")), "failures_per_s": _round(number("Failures/s")),
        "latency_ms": {"p50": number("50%"), "p95": number("95%"), "p99": number("99%"),
                       "mean": _round(number("Average Response Time")), "max": _round(number("Max Response Time"))},
    }


def read_failures(csv_prefix: Path, limit: int = 5) -> list[str]:
    path = Path(f"{csv_prefix}_failures.csv")
    if not path.is_file():
        return []
    with open(path, newline="", encoding="utf-8") as f:
        return [f"{row['Occurrences']} x {row['Error']}" for row in csv.DictReader(f)][:limit]


def warm_up(url: str, cfg: LoadBenchConfig, requests: int = 3) -> None:
    """A few frames through the gateway with the standard library (no extra client in this process)."""
    import urllib.request

    from slsg_bench.frames import camera_jpeg

    frame = camera_jpeg(*cfg.frame_size)
    for _ in range(requests):
        request = urllib.request.Request(f"{url}/v1/models/{cfg.name}/inspect", data=frame, method="POST",
                                         headers={"Content-Type": "image/jpeg"})
        with urllib.request.urlopen(request, timeout=60) as response:
            response.read()


def run_load_bench(cfg: LoadBenchConfig) -> dict[str, Any]:
    """Start a gateway, run locust against it for ``duration_s``, return the JSON-ready report."""
    from slsg_gateway.server import BackgroundGateway
    from slsg_gateway.settings import Settings

    if cfg.users < 1:
        raise ValueError(f"users must be >= 1, got {cfg.users}")
    env = environment(cfg.threads)
    version, _ = resolve_model(cfg.repository, cfg.name, None)
    settings = Settings(repository=Path(cfg.repository), host="127.0.0.1", port=0, ort_threads=cfg.threads,
                        lines=[f"line-{i + 1}" for i in range(cfg.lines)])
    with tempfile.TemporaryDirectory(prefix="slsg-load-") as tmp, BackgroundGateway(settings) as gateway:
        prefix = Path(tmp) / "load"
        command = locust_command(cfg, gateway.url, prefix)
        warm_up(gateway.url, cfg)  # first requests allocate ORT arenas and pools: not growth
        rss_before = resident_memory_mb()
        done = subprocess.run(command, env=locust_environment(cfg), capture_output=True, text=True,
                              timeout=cfg.duration_s + 120)
        rss_after = resident_memory_mb()
        if not Path(f"{prefix}_stats.csv").is_file():  # locust exits 1 on failed requests too: judge by its files
            raise RuntimeError(f"locust failed (exit {done.returncode}): {' '.join(command)}\n{done.stderr[-3000:]}")
        stats, failures = read_locust_stats(prefix), read_failures(prefix)
    return {
        "benchmark": "load",
        "environment": env,
        "model": {"name": cfg.name, "version": version},
        "settings": {"users": cfg.users, "duration_s": cfg.duration_s, "lines": cfg.lines,
                     "cameras_per_line": cfg.cameras_per_line, "fps": list(cfg.fps),
                     "frame_size": list(cfg.frame_size), "threads": cfg.threads,
                     "offered_requests_per_s": [round(cfg.users * cfg.fps[0], 2), round(cfg.users * cfg.fps[1], 2)]},
        "locust": {"exit_code": done.returncode, "version": _locust_version()},
        "results": stats,
        "failure_samples": failures,
        "memory": {"rss_mb_before": _round(rss_before), "rss_mb_after": _round(rss_after),
                   "growth_percent": round(100 * (rss_after - rss_before) / rss_before, 3)
                   if rss_before and rss_after else None},
    }


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 2)


def _locust_version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("locust")
    except PackageNotFoundError:
        return None


def load_tables(report: dict[str, Any]) -> list[Table]:
    s, r, mem = report["settings"], report["results"], report["memory"]
    lat = r["latency_ms"]
    title = (f"locust camera mix on {report['model']['name']}: {s['users']} cameras over {s['lines']} lines at "
             f"{s['fps'][0]:g}-{s['fps'][1]:g} frames/s, {s['frame_size'][0]}x{s['frame_size'][1]} JPEG, "
             f"{s['duration_s']} s")
    return [Table(title, ["requests", "failures", "req/s", "p50 ms", "p95 ms", "p99 ms", "max ms", "RSS growth %"],
                  [[r["requests"], r["failures"], r["requests_per_s"], lat["p50"], lat["p95"], lat["p99"], lat["max"],
                    mem["growth_percent"]]])]
