#!/usr/bin/env python
"""GPU throughput of an exported SLSG model: ONNX Runtime's CUDA provider and TensorRT provider (FP16).

Self-contained (numpy and onnxruntime-gpu only), so it can be copied to a GPU machine with just the
model file::

    python benchmarks/slsg_bench/gpu.py model_repository/tray/1/model.onnx --batch-sizes 1,8,32 --json

For each provider it builds a session (TensorRT: FP16, an optimisation profile covering the batch
sizes, engine cache in --trt-cache), warms up (TensorRT builds its engine then: reported as
``build_s``, never timed), and times ``--iterations`` runs per batch size with the input already on
the host, reporting median/p95 batch latency and images/s. The whole run takes a few minutes at
most (mostly the TensorRT engine build).

Where a provider is missing (CPU-only onnxruntime, no CUDA/TensorRT libraries) it says so and,
unless --no-cpu-fallback, measures the CPU provider instead so the script still produces a report.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

INPUT_NAME = "image"  # the model-repository contract: uint8 NHWC RGB
CUDA, TENSORRT, CPU = "CUDAExecutionProvider", "TensorrtExecutionProvider", "CPUExecutionProvider"
CPU_FALLBACK_ITERATIONS = 5  # a 256x256 model at batch 32 takes seconds per run on a CPU


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", type=Path, help="model.onnx exported by `slsg export`")
    p.add_argument("--batch-sizes", default="1,8,32", help="comma-separated (default 1,8,32)")
    p.add_argument("--iterations", type=int, default=50, help="timed runs per batch size")
    p.add_argument("--warmup", type=int, default=5, help="untimed runs per batch size (after the engine build)")
    p.add_argument("--providers", default="cuda,tensorrt", help="any of cuda, tensorrt, cpu")
    p.add_argument("--trt-cache", type=Path, default=Path("/tmp/slsg-trt-cache"), help="TensorRT engine cache")
    p.add_argument("--no-cpu-fallback", action="store_true", help="fail instead of measuring the CPU provider")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    return p.parse_args(argv)


def input_size(session: Any) -> tuple[int, int]:
    """(height, width) of the contract input; exported models have static H and W."""
    shape = {i.name: i.shape for i in session.get_inputs()}.get(INPUT_NAME)
    if shape is None or not all(isinstance(v, int) for v in shape[1:3]):
        raise SystemExit(f"model has no static-size uint8 input {INPUT_NAME!r} [N, H, W, 3]: not an SLSG export")
    return shape[1], shape[2]


def provider_config(name: str, size: tuple[int, int], batch_sizes: list[int], cache: Path) -> list[Any]:
    """The provider list for a session: TensorRT falls back to CUDA for nodes it cannot take."""
    if name == TENSORRT:
        shape = lambda n: f"{INPUT_NAME}:{n}x{size[0]}x{size[1]}x3"  # noqa: E731
        cache.mkdir(parents=True, exist_ok=True)
        options = {"trt_fp16_enable": True, "trt_engine_cache_enable": True, "trt_engine_cache_path": str(cache),
                   "trt_profile_min_shapes": shape(min(batch_sizes)), "trt_profile_max_shapes": shape(max(batch_sizes)),
                   "trt_profile_opt_shapes": shape(max(batch_sizes))}
        return [(TENSORRT, options), CUDA]
    if name == CUDA:
        return [CUDA]
    return [CPU]


def bench_provider(ort: Any, model: Path, name: str, batch_sizes: list[int], args: argparse.Namespace) -> dict:
    start = time.perf_counter()
    probe = ort.InferenceSession(str(model), providers=[CPU])
    size = input_size(probe)
    session = ort.InferenceSession(str(model), providers=provider_config(name, size, batch_sizes, args.trt_cache))
    used = session.get_providers()
    if used[0] != name:  # e.g. CUDA libraries missing at run time: ORT quietly runs on what is left
        print(f"gpu_bench: {name} did not take the model (session runs on {used}); figures are not {name}'s",
              file=sys.stderr)
    rng = np.random.default_rng(0)
    first = rng.integers(0, 256, size=(batch_sizes[0], *size, 3), dtype=np.uint8)
    session.run(None, {INPUT_NAME: first})  # TensorRT builds (or loads) its engine here
    result = {"provider": name, "session_providers": used, "build_s": round(time.perf_counter() - start, 2),
              "input_size": list(size), "by_batch": {}}
    for batch_size in batch_sizes:
        batch = rng.integers(0, 256, size=(batch_size, *size, 3), dtype=np.uint8)
        for _ in range(args.warmup):
            session.run(None, {INPUT_NAME: batch})
        seconds = []
        for _ in range(args.iterations):
            t0 = time.perf_counter()
            session.run(None, {INPUT_NAME: batch})
            seconds.append(time.perf_counter() - t0)
        ms = np.asarray(seconds) * 1e3
        median = float(np.median(ms))
        result["by_batch"][str(batch_size)] = {"median_ms": round(median, 4),
                                               "p95_ms": round(float(np.percentile(ms, 95)), 4),
                                               "images_per_s": round(batch_size / median * 1e3, 2)}
    return result


def choose_providers(requested: list[str], available: list[str], allow_cpu: bool) -> tuple[list[str], list[str]]:
    """(providers to measure, messages): missing GPU providers are skipped; CPU stands in if none is left."""
    names = {"cuda": CUDA, "tensorrt": TENSORRT, "cpu": CPU}
    unknown = [r for r in requested if r not in names]
    if unknown:
        raise SystemExit(f"unknown provider(s) {unknown}; choose from {sorted(names)}")
    chosen, messages = [], []
    for r in requested:
        if names[r] in available:
            chosen.append(names[r])
        else:
            messages.append(f"{names[r]} is not available in this onnxruntime (available: {', '.join(available)}); "
                            "install onnxruntime-gpu with CUDA 12 / TensorRT 10 libraries to measure it")
    if not chosen:
        if not allow_cpu:
            raise SystemExit("no requested provider is available:\n" + "\n".join(messages))
        messages.append("falling back to CPUExecutionProvider so the script still reports something "
                        f"(not GPU figures; at most {CPU_FALLBACK_ITERATIONS} iterations)")
        chosen = [CPU]
    return chosen, messages


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.model.is_file():
        raise SystemExit(f"model file {args.model} not found")
    import onnxruntime as ort

    batch_sizes = sorted({int(b) for b in args.batch_sizes.split(",")})
    requested = [p.strip().lower() for p in args.providers.split(",") if p.strip()]
    chosen, messages = choose_providers(requested, ort.get_available_providers(), not args.no_cpu_fallback)
    for message in messages:
        print(f"gpu_bench: {message}", file=sys.stderr)
    fallback = chosen == [CPU] and "cpu" not in requested
    if fallback:
        args.iterations = min(args.iterations, CPU_FALLBACK_ITERATIONS)
        args.warmup = min(args.warmup, 1)
    report = {"model": str(args.model), "onnxruntime": ort.__version__, "device": ort.get_device(),
              "iterations": args.iterations, "fallback": fallback,
              "messages": messages, "results": [bench_provider(ort, args.model, p, batch_sizes, args) for p in chosen]}
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(f"{args.model} on {report['device']} (onnxruntime {report['onnxruntime']})")
        print(f"{'provider':<28}{'batch':>6}{'median ms':>12}{'p95 ms':>10}{'images/s':>12}")
        for result in report["results"]:
            for b, r in result["by_batch"].items():
                print(f"{result['provider']:<28}{b:>6}{r['median_ms']:>12.3f}{r['p95_ms']:>10.3f}"
                      f"{r['images_per_s']:>12.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
