"""``slsg bench triton``: Triton (gRPC, Python backend running ONNX Runtime) vs in-process ONNX Runtime.

Starts ``LocalTriton`` (the real ``tritonserver`` binary on CPU) on free loopback ports over the
production repository, then times batch 1 and batch 8 requests through the gRPC client and the
same batches through an in-process ORT session with the same intra-op thread count, alternating
call by call. The difference is Triton's serving cost on CPU: gRPC (de)serialisation, the Python
backend's shared-memory hand-over, and the dynamic batcher's queue delay.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from slsg_bench.model import Engine, open_session, ort_engine, resolve_model, session_input_size, time_interleaved
from slsg_bench.report import Table, environment, percentile_timing, ratio
from slsg.contract import INPUT_IMAGE, OUTPUT_ANOMALY_MAP, OUTPUT_SCORE


@dataclass
class TritonBenchConfig:
    repository: Path
    name: str
    threads: int = 1
    iterations: int = 20
    warmup: int = 3
    batch_sizes: tuple[int, ...] = (1, 8)
    startup_timeout_s: float = 120.0


def triton_engine(grpc_url: str, name: str) -> Engine:
    """Synchronous gRPC inference of one uint8 NHWC batch on the newest version Triton serves."""
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(grpc_url)
    outputs = [grpcclient.InferRequestedOutput(OUTPUT_ANOMALY_MAP), grpcclient.InferRequestedOutput(OUTPUT_SCORE)]

    def run(batch: np.ndarray) -> Any:
        tensor = grpcclient.InferInput(INPUT_IMAGE, list(batch.shape), "UINT8")
        tensor.set_data_from_numpy(batch)
        return client.infer(name, [tensor], outputs=outputs)

    return Engine("triton_grpc", run)


def run_triton_bench(cfg: TritonBenchConfig) -> dict[str, Any]:
    """Start Triton, measure both paths, stop Triton; return the JSON-ready report."""
    from slsg.triton_config import load_config
    from slsg_gateway.server import free_port
    from slsg_triton.local import LocalTriton

    env = environment(cfg.threads)
    version, path = resolve_model(cfg.repository, cfg.name, None)
    config = load_config(Path(cfg.repository) / cfg.name / "config.pbtxt")
    max_batch = int(config.max_batch_size)
    queue_delay_us = int(config.dynamic_batching.max_queue_delay_microseconds)
    too_big = [b for b in cfg.batch_sizes if b > max_batch]
    if too_big:
        raise ValueError(f"batch sizes {too_big} exceed max_batch_size {max_batch} in "
                         f"{Path(cfg.repository) / cfg.name / 'config.pbtxt'}")
    session = open_session(path, cfg.threads)
    input_size = session_input_size(session)
    server = LocalTriton(cfg.repository, free_port(), free_port(), free_port(), model_control_mode="explicit",
                         load_models=[cfg.name], intra_op_threads=cfg.threads, startup_timeout=cfg.startup_timeout_s)
    start = time.perf_counter()
    with server:
        startup_s = time.perf_counter() - start
        engines = [triton_engine(server.grpc_url, cfg.name), ort_engine(session)]
        time_interleaved(engines, cfg.batch_sizes, input_size, cfg.iterations, cfg.warmup, desc="bench triton")
    results = {e.name: _throughputs(e) for e in engines}
    return {
        "benchmark": "triton",
        "environment": env,
        "model": {"name": cfg.name, "version": version, "input_size": list(input_size), "max_batch_size": max_batch,
                  "dynamic_batching_queue_delay_us": queue_delay_us},
        "settings": {"threads": cfg.threads, "iterations": cfg.iterations, "warmup": cfg.warmup,
                     "batch_sizes": list(cfg.batch_sizes), "protocol": "grpc", "backend": "python (onnxruntime)"},
        "triton_startup_s": round(startup_s, 2),
        "results": results,
        "notes": [f"Triton's dynamic batcher holds a request up to {queue_delay_us} us waiting for more "
                  "(config.pbtxt max_queue_delay_microseconds); one client at a time pays it on batches below "
                  "the preferred sizes"] if queue_delay_us else [],
        "ratios": {f"triton_over_ort_throughput_batch{b}": ratio(results["triton_grpc"][str(b)]["images_per_s"],
                                                                 results["onnxruntime"][str(b)]["images_per_s"])
                   for b in cfg.batch_sizes},
    }


def _throughputs(engine: Engine) -> dict[str, Any]:
    out = {}
    for batch_size, seconds in engine.seconds.items():
        timing = percentile_timing(seconds)
        out[str(batch_size)] = {"batch_ms": timing.to_dict(),
                                "images_per_s": round(batch_size / (timing.median_ms / 1e3), 3)}
    return out


def triton_tables(report: dict[str, Any]) -> list[Table]:
    m, s = report["model"], report["settings"]
    rows = [[engine, int(b), r["batch_ms"]["median_ms"], r["batch_ms"]["p95_ms"], r["images_per_s"]]
            for engine, by_batch in report["results"].items() for b, r in by_batch.items()]
    main = Table(f"Triton vs in-process ORT on {m['name']} v{m['version']} {m['input_size'][0]}x{m['input_size'][1]}, "
                 f"{s['threads']} ORT threads (Triton started in {report['triton_startup_s']} s)",
                 ["engine", "batch", "median ms", "p95 ms", "images/s"], rows)
    ratios = Table("ratios", ["measure", "value"], [[k, v] for k, v in report["ratios"].items()])
    return [main, ratios]
