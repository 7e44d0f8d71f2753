"""Stage 2 of ``python -m slsg_bench.gpu``: a real Triton server serving the model, driven over gRPC.

The server is ``LocalTriton`` (the ``tritonserver`` binary of nvidia-pytriton, Python backend running
ONNX Runtime with the CUDA provider where there is one, as ``slsg triton`` serves it) over a
benchmark repository holding the same ``model.onnx`` with a configuration for the GPU: dynamic
batching up to ``max_batch_size`` with preferred sizes and a short queue delay. Several client
threads, each with its own gRPC connection, send single frames as cameras do; Triton's batcher
forms the batches. Triton's own figures come from its Prometheus endpoint, read before and after
each concurrency level: requests and executions (so the batch it formed), queue and compute time.
"""

from __future__ import annotations

import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from slsg.contract import INPUT_IMAGE, MODEL_CARD_KEY, OUTPUT_ANOMALY_MAP, OUTPUT_SCORE, ModelCard, model_path

# Triton's per-model counters (cumulative; durations in microseconds, summed over requests)
TRITON_COUNTERS = ("nv_inference_request_success", "nv_inference_request_failure", "nv_inference_count",
                   "nv_inference_exec_count", "nv_inference_request_duration_us", "nv_inference_queue_duration_us",
                   "nv_inference_compute_input_duration_us", "nv_inference_compute_infer_duration_us",
                   "nv_inference_compute_output_duration_us")
GPU_GAUGES = ("nv_gpu_utilization", "nv_gpu_memory_used_bytes")


@dataclass
class TritonStageConfig:
    max_batch_size: int  # Triton's dynamic batcher limit (config.pbtxt)
    preferred_batch_sizes: tuple[int, ...]
    max_queue_delay_us: int
    instance_count: int
    clients: tuple[int, ...]  # concurrent gRPC clients, one level each
    seconds_per_level: float


def model_card(model: Path) -> ModelCard:
    """The card an export stores in the ONNX metadata (needed for the Triton configuration)."""
    import onnx

    props = {p.key: p.value for p in onnx.load(str(model), load_external_data=False).metadata_props}
    if MODEL_CARD_KEY not in props:
        raise ValueError(f"{model}: no {MODEL_CARD_KEY!r} metadata: not a model written by `slsg export`")
    return ModelCard.from_json(props[MODEL_CARD_KEY])


def write_bench_repository(model: Path, name: str, root: Path, cfg: TritonStageConfig) -> Path:
    """``root/<name>/1/model.onnx`` (a link to ``model``) with a GPU dynamic-batching configuration."""
    from slsg.triton_config import write_config

    target = model_path(root, name, 1)
    target.parent.mkdir(parents=True, exist_ok=True)
    if not target.exists():
        target.symlink_to(model.resolve())
    write_config(root, name, model_card(model), max_batch_size=cfg.max_batch_size,
                 preferred_batch_sizes=cfg.preferred_batch_sizes, max_queue_delay_us=cfg.max_queue_delay_us,
                 instance_count=cfg.instance_count, gpu=True, num_versions=1)
    return root


def parse_metrics(text: str, model: str) -> dict[str, float]:
    """Triton's counters for ``model`` (summed over versions) and the GPU gauges (summed over GPUs)."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        head, _, value = line.rpartition(" ")
        metric = head.split("{", 1)[0]
        if metric in TRITON_COUNTERS and f'model="{model}"' not in head:
            continue
        if metric in TRITON_COUNTERS or metric in GPU_GAUGES:
            out[metric] = out.get(metric, 0.0) + float(value)
    return out


def read_metrics(metrics_url: str, model: str) -> dict[str, float]:
    with urllib.request.urlopen(f"http://{metrics_url}/metrics", timeout=10) as response:
        return parse_metrics(response.read().decode("utf-8", "replace"), model)


def triton_breakdown(before: dict[str, float], after: dict[str, float]) -> dict[str, Any]:
    """What Triton did between two readings: requests, the batch it formed, per-request times in ms."""
    delta = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in TRITON_COUNTERS}
    requests, executions = delta["nv_inference_request_success"], delta["nv_inference_exec_count"]
    per_request = lambda key: round(delta[key] / requests / 1e3, 4) if requests else None  # noqa: E731
    return {
        "requests": int(requests), "images": int(delta["nv_inference_count"]),
        "failures": int(delta["nv_inference_request_failure"]),
        "executions": int(executions),
        "mean_batch": round(delta["nv_inference_count"] / executions, 3) if executions else None,
        "request_ms": per_request("nv_inference_request_duration_us"),
        "queue_ms": per_request("nv_inference_queue_duration_us"),
        "compute_input_ms": per_request("nv_inference_compute_input_duration_us"),
        "compute_infer_ms": per_request("nv_inference_compute_infer_duration_us"),
        "compute_output_ms": per_request("nv_inference_compute_output_duration_us"),
        "gpu_utilization": after.get("nv_gpu_utilization"),
        "gpu_memory_used_mb": round(after["nv_gpu_memory_used_bytes"] / 2**20, 1)
        if "nv_gpu_memory_used_bytes" in after else None,
    }


def _client_loop(grpc_url: str, name: str, frame: np.ndarray, stop_at: float, latencies: list[float],
                 errors: list[str]) -> None:
    """One camera: single frames back to back on its own gRPC connection until ``stop_at``."""
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(grpc_url)
    outputs = [grpcclient.InferRequestedOutput(OUTPUT_ANOMALY_MAP), grpcclient.InferRequestedOutput(OUTPUT_SCORE)]
    tensor = grpcclient.InferInput(INPUT_IMAGE, list(frame.shape), "UINT8")
    tensor.set_data_from_numpy(frame)
    try:
        while time.perf_counter() < stop_at:
            t0 = time.perf_counter()
            try:
                client.infer(name, [tensor], outputs=outputs, client_timeout=60)
            except Exception as exc:  # noqa: BLE001 - counted as a failure, the level goes on
                errors.append(f"{type(exc).__name__}: {str(exc)[:200]}")
                continue
            latencies.append(time.perf_counter() - t0)
    finally:
        client.close()


def drive_level(server: Any, name: str, size: tuple[int, int], clients: int, seconds: float) -> dict[str, Any]:
    """``clients`` concurrent gRPC clients for ``seconds``; client-side and Triton-side figures."""
    frame = np.random.default_rng(1).integers(0, 256, size=(1, *size, 3), dtype=np.uint8)
    before = read_metrics(server.metrics_url, name)
    latencies: list[list[float]] = [[] for _ in range(clients)]
    errors: list[str] = []
    stop_at = time.perf_counter() + seconds
    threads = [threading.Thread(target=_client_loop, args=(server.grpc_url, name, frame, stop_at, latencies[i], errors),
                                daemon=True) for i in range(clients)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(seconds + 120)
    wall = time.perf_counter() - start
    after = read_metrics(server.metrics_url, name)
    ms = np.concatenate([np.asarray(x) for x in latencies]) * 1e3 if any(latencies) else np.empty(0)
    return {"clients": clients, "seconds": round(wall, 2), "ok": int(ms.size), "failures": len(errors),
            "error_samples": sorted(set(errors))[:3], "images_per_s": round(ms.size / wall, 2),
            "latency_ms": {"p50": round(float(np.median(ms)), 3), "p99": round(float(np.percentile(ms, 99)), 3)}
            if ms.size else None,
            "triton": triton_breakdown(before, after)}


def run_triton_stage(server: Any, name: str, size: tuple[int, int], cfg: TritonStageConfig,
                     deadline: Any) -> dict[str, Any]:
    """Stage 2's report: one level per client count, until the budget runs out."""
    levels, messages = [], []
    for clients in cfg.clients:
        if deadline.remaining() < cfg.seconds_per_level + 5:
            messages.append(f"{clients} clients: skipped, over the time budget")
            continue
        print(f"gpu bench: stage 2: {clients} gRPC clients for {cfg.seconds_per_level:g} s ...", flush=True)
        levels.append(drive_level(server, name, size, clients, cfg.seconds_per_level))
    return {"max_batch_size": cfg.max_batch_size, "preferred_batch_sizes": list(cfg.preferred_batch_sizes),
            "max_queue_delay_us": cfg.max_queue_delay_us, "instance_count": cfg.instance_count,
            "backend": "python (onnxruntime)", "levels": levels, "messages": messages}
