"""``slsg bench records``: what recording every inspection costs the gateway's throughput.

Three ``slsg serve`` processes over the same model start together and are driven in turn, round by
round (off, on all normal, on all flagged, off, ...), so drift on a shared machine hits every variant
alike; only one is under load at a time:

- ``off``: ``SLSG_RECORDS=off``;
- ``on, all normal``: the embedded store (SQLite WAL + files) in a temporary folder, with the model's
  threshold above every score (the calibrated score never reaches 1), so every verdict is normal and
  only the default sample of frames (1 %) is kept: a line making good parts;
- ``on, all flagged``: the same with the threshold at 0, so every verdict is anomalous and every frame
  and heat map is written (the worst case).

The threshold is forced so that the figures do not depend on what the model thinks of the frame.

The figure is each variant's median throughput over the rounds divided by ``off``'s; the issue's
target is at least 0.95 at concurrency 8. On a machine other work shares, throughput swings from round to
round, so the bench also reads each gateway's own CPU time (user + system, from /proc) per request: its
ratio to ``off`` is what recording costs a machine the gateway has to itself. The store's own count
afterwards checks nothing was lost.
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from slsg_bench.frames import LOCO_FRAME_SIZE, camera_jpeg
from slsg_bench.gateway import drive, serve_subprocess
from slsg_bench.model import resolve_model
from slsg_bench.report import Table, environment, ratio

VARIANTS = ("off", "on, all normal", "on, all flagged")
_THRESHOLD = {"on, all normal": 1.01, "on, all flagged": 0.0}


@dataclass
class RecordsBenchConfig:
    repository: Path
    name: str
    frame_size: tuple[int, int] = LOCO_FRAME_SIZE
    concurrency: int = 8
    requests: int = 80  # timed requests per variant and round
    rounds: int = 5
    warmup: int = 2  # untimed requests per client before the first round
    threads: int = 1  # ONNX Runtime threads in each gateway
    max_batch_size: int = 8


def _variant_env(cfg: RecordsBenchConfig, variant: str, folder: Path) -> dict[str, str]:
    env = {"SLSG_REPOSITORY": str(cfg.repository), "SLSG_ORT_THREADS": str(cfg.threads),
           "SLSG_MAX_BATCH_SIZE": str(cfg.max_batch_size), "SLSG_API_KEYS": "", "SLSG_DATA_DIR": str(folder)}
    if variant == "off":
        env["SLSG_RECORDS"] = "off"
    else:
        env["SLSG_RECORDS"] = str(folder / variant.replace(", ", "-").replace(" ", "-"))
    if variant in _THRESHOLD:
        env["SLSG_THRESHOLDS"] = json.dumps({cfg.name: _THRESHOLD[variant]})
    return env


def process_cpu_s(pid: int) -> float | None:
    """User + system CPU seconds of process ``pid`` so far (Linux /proc); None where unavailable."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime: fields 14, 15


def _stored(folder: str) -> dict[str, int]:
    from slsg_gateway.records import open_store

    store = open_store(folder)
    try:
        with_frame, cursor = 0, None
        while True:
            page = store.query(stored=True, limit=500, cursor=cursor)
            with_frame += len(page.records)
            if (cursor := page.next_cursor) is None:
                break
        return {"records": store.count(), "with_frame": with_frame, "file_bytes": store.stored_bytes()}
    finally:
        store.close()


def run_records_bench(cfg: RecordsBenchConfig) -> dict[str, Any]:
    from tqdm import tqdm

    if min(cfg.requests, cfg.rounds, cfg.concurrency, cfg.threads) < 1:
        raise ValueError("requests, rounds, concurrency and threads must be >= 1")
    version, _ = resolve_model(cfg.repository, cfg.name, None)
    jpeg = camera_jpeg(*cfg.frame_size)
    per_round: dict[str, list[float]] = {v: [] for v in VARIANTS}
    cpu_ms: dict[str, list[float]] = {v: [] for v in VARIANTS}
    failures = {v: 0 for v in VARIANTS}
    sent = {v: 0 for v in VARIANTS}
    with tempfile.TemporaryDirectory(prefix="slsg-bench-records-") as tmp, ExitStack() as stack:
        envs = {v: _variant_env(cfg, v, Path(tmp)) for v in VARIANTS}
        servers = {v: stack.enter_context(serve_subprocess(envs[v])) for v in VARIANTS}
        urls = {v: f"{url}/v1/models/{cfg.name}/inspect" for v, (url, _) in servers.items()}
        for variant in VARIANTS:
            drive(urls[variant], jpeg, cfg.concurrency, cfg.concurrency, warmup=cfg.warmup)
            sent[variant] += cfg.concurrency * (cfg.warmup + 1)
        for _ in tqdm(range(cfg.rounds), desc="bench records", unit="round", leave=False):
            for variant in VARIANTS:
                cpu_before = process_cpu_s(servers[variant][1])
                level = drive(urls[variant], jpeg, cfg.concurrency, cfg.requests, warmup=1)
                cpu_after = process_cpu_s(servers[variant][1])
                per_round[variant].append(level["requests_per_s"])
                if cpu_before is not None and cpu_after is not None:
                    cpu_ms[variant].append(round(1e3 * (cpu_after - cpu_before) / (cfg.requests + cfg.concurrency), 3))
                failures[variant] += level["failures"]
                sent[variant] += cfg.requests + cfg.concurrency
        stack.close()  # SIGTERM: each gateway flushes its queue before it exits
        stored = {v: _stored(envs[v]["SLSG_RECORDS"]) for v in VARIANTS if v != "off"}
    return _report(cfg, version, len(jpeg), per_round, cpu_ms, failures, sent, stored)


def _report(cfg: RecordsBenchConfig, version: int, jpeg_bytes: int, per_round: dict[str, list[float]],
            cpu_ms: dict[str, list[float]], failures: dict[str, int], sent: dict[str, int],
            stored: dict[str, dict[str, int]]) -> dict[str, Any]:
    median = {v: round(statistics.median(x), 3) for v, x in per_round.items()}
    cpu = {v: round(statistics.median(x), 3) if x else None for v, x in cpu_ms.items()}
    return {
        "benchmark": "records",
        "environment": environment(cfg.threads),
        "model": {"name": cfg.name, "version": version},
        "settings": {"concurrency": cfg.concurrency, "requests_per_round": cfg.requests, "rounds": cfg.rounds,
                     "frame_size": list(cfg.frame_size), "jpeg_bytes": jpeg_bytes, "threads": cfg.threads},
        "requests_per_s": {v: {"median": median[v], "rounds": per_round[v]} for v in VARIANTS},
        "ratio_vs_off": {v: ratio(median[v], median["off"]) for v in VARIANTS if v != "off"},
        "cpu_ms_per_request": {v: {"median": cpu[v], "rounds": cpu_ms[v]} for v in VARIANTS},
        # off's CPU per request over the variant's: the throughput ratio on a machine of its own
        "cpu_ratio_vs_off": {v: ratio(cpu["off"], cpu[v]) for v in VARIANTS if v != "off"},
        "failures": failures,
        "requests_sent": sent,
        "stored": stored,
        "target": "recording on keeps >= 0.95 of the throughput at concurrency 8",
    }


def records_tables(report: dict[str, Any]) -> list[Table]:
    s, m = report["settings"], report["model"]
    rows = []
    for variant, figures in report["requests_per_s"].items():
        kept = report["stored"].get(variant, {})
        rows.append([variant, figures["median"], min(figures["rounds"]), max(figures["rounds"]),
                     report["ratio_vs_off"].get(variant, 1.0), report["cpu_ms_per_request"][variant]["median"],
                     report["cpu_ratio_vs_off"].get(variant, 1.0), report["failures"][variant],
                     report["requests_sent"][variant], kept.get("records"), kept.get("with_frame")])
    return [Table(f"gateway on {m['name']} v{m['version']}, JPEG {s['frame_size'][0]}x{s['frame_size'][1]}, "
                  f"concurrency {s['concurrency']}, {s['rounds']} interleaved rounds of {s['requests_per_round']}",
                  ["records", "median req/s", "min", "max", "ratio vs off", "CPU ms/req", "CPU ratio",
                   "failures", "sent", "stored", "with frame"], rows)]
