"""Stage 1 of ``python -m slsg_bench.gpu``: the exported model alone in ONNX Runtime on a GPU.

Variants: the CUDA provider on the fp32 export, the CUDA provider on an fp16 copy (made here with
onnxconverter-common, the score tail kept in fp32), the TensorRT provider in FP16 and, where an
INT8 export is given, TensorRT INT8. Each variant's session creation plus its first run (TensorRT
builds its engine there) is reported as ``build_s`` and never timed; then every batch size gets
untimed warm-up runs and timed runs with the input on the host (host-device copies included, as
a server pays them), reported as p50/p99 batch latency and images/s.

Without a GPU provider the same variants run on the CPU provider (fp32 only) so the stage is
exercised end to end; the caller labels those figures as not GPU figures.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from slsg.contract import INPUT_IMAGE, OUTPUT_ANOMALY_MAP, OUTPUT_SCORE

CUDA, TENSORRT, CPU = "CUDAExecutionProvider", "TensorrtExecutionProvider", "CPUExecutionProvider"
FP16_FILENAME = "model.fp16.onnx"
FP16_MAX = 65504.0  # fp16's largest finite value: weights beyond it are clipped, not set to infinity


@dataclass(frozen=True)
class Variant:
    """One thing to time: a model file on a provider (with its options)."""

    label: str
    model: Path
    provider: str
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class ModelStageConfig:
    batch_sizes: tuple[int, ...]
    iterations: int  # timed runs per batch size at most
    warmup: int  # untimed runs per batch size
    seconds_per_batch: float  # timed runs stop early once a batch size has taken this long
    work_dir: Path  # fp16 copy, TensorRT engine cache
    int8_model: Path | None = None


def available_providers() -> list[str]:
    """ONNX Runtime's providers; the CUDA libraries of pip's nvidia-* packages are loaded first."""
    import onnxruntime as ort

    if CUDA in ort.get_available_providers() and hasattr(ort, "preload_dlls"):
        try:  # onnxruntime-gpu finds cuBLAS/cuDNN from the nvidia-* wheels only when preloaded
            ort.preload_dlls()
        except Exception as exc:  # noqa: BLE001 - reported by the session that then fails to use CUDA
            print(f"gpu bench: onnxruntime.preload_dlls() failed: {exc}", flush=True)
    return list(ort.get_available_providers())


def score_tail_nodes(model: Any) -> list[str]:
    """Names of the nodes that feed ``score`` but not ``anomaly_map``: top-k, mean, calibration.

    Kept in fp32 by the fp16 conversion: the calibration's log-odds and the top-k mean of small
    map values lose the decision threshold's precision in fp16. Unnamed nodes get a name here.
    """
    for i, node in enumerate(model.graph.node):
        if not node.name:
            node.name = f"slsg_node_{i}"
    producer = {out: node for node in model.graph.node for out in node.output}

    def ancestors(tensor: str) -> set[str]:
        seen: set[str] = set()
        stack = [tensor]
        while stack:
            node = producer.get(stack.pop())
            if node is not None and node.name not in seen:
                seen.add(node.name)
                stack.extend(node.input)
        return seen

    tail = ancestors(OUTPUT_SCORE) - ancestors(OUTPUT_ANOMALY_MAP)
    return [node.name for node in model.graph.node if node.name in tail]


def make_fp16_model(source: Path, dest: Path) -> Path:
    """An fp16 copy of ``source`` (uint8 input and fp32 outputs kept; score tail in fp32)."""
    import warnings

    import onnx
    from onnxconverter_common import float16

    model = onnx.load(str(source))
    tail = score_tail_nodes(model)
    separate_tail_initializers(model, set(tail))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # one warning per weight clipped to fp16's range: thousands of lines
        converted = float16.convert_float_to_float16(model, keep_io_types=True, node_block_list=tail,
                                                     max_finite_val=FP16_MAX)
    retarget_casts(converted)
    dest.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(converted, str(dest))
    return dest


def separate_tail_initializers(model: Any, tail: set[str]) -> int:
    """Give the score tail its own copy of every initializer it shares with the fp16 part; returns how many.

    The converter turns a shared initializer to fp16 for one consumer or keeps it fp32 for the other,
    and either way one of them gets the wrong type.
    """
    initializers = {init.name: init for init in model.graph.initializer}
    used_outside = {name for node in model.graph.node if node.name not in tail for name in node.input}
    copies: dict[str, str] = {}
    for node in model.graph.node:
        if node.name not in tail:
            continue
        for i, name in enumerate(node.input):
            if name in initializers and name in used_outside:
                if name not in copies:
                    copy = model.graph.initializer.add()
                    copy.CopyFrom(initializers[name])
                    copy.name = copies[name] = f"{name}__score_tail"
                node.input[i] = copies[name]
    return len(copies)


def retarget_casts(model: Any) -> int:
    """Casts to float whose output the conversion retyped to fp16 now cast to fp16; returns how many.

    The converter retypes a Cast's output but leaves its ``to`` attribute (the uint8 -> float cast of
    the input image, say), which ONNX Runtime then refuses as a type mismatch.
    """
    from onnx import TensorProto, helper

    fp16_values = {v.name for v in model.graph.value_info if v.type.tensor_type.elem_type == TensorProto.FLOAT16}
    changed = 0
    for node in model.graph.node:
        if node.op_type != "Cast" or node.output[0] not in fp16_values:
            continue
        for attr in node.attribute:
            if attr.name == "to" and attr.i == TensorProto.FLOAT:
                attr.CopyFrom(helper.make_attribute("to", TensorProto.FLOAT16))
                changed += 1
    return changed


def provider_options(provider: str, size: tuple[int, int], batch_sizes: tuple[int, ...], cache: Path,
                     int8: bool = False) -> dict[str, Any]:
    """TensorRT: FP16 (or INT8), one optimisation profile over the batch sizes, engines cached."""
    if provider != TENSORRT:
        return {}
    shape = lambda n: f"{INPUT_IMAGE}:{n}x{size[0]}x{size[1]}x3"  # noqa: E731
    cache.mkdir(parents=True, exist_ok=True)
    return {"trt_fp16_enable": True, "trt_int8_enable": int8, "trt_engine_cache_enable": True,
            "trt_engine_cache_path": str(cache), "trt_profile_min_shapes": shape(min(batch_sizes)),
            "trt_profile_max_shapes": shape(max(batch_sizes)), "trt_profile_opt_shapes": shape(max(batch_sizes))}


def tensorrt_missing(providers: list[str]) -> str | None:
    """Why the TensorRT provider cannot run here, or None when it can.

    onnxruntime-gpu lists the provider even where its library or TensorRT itself is absent; a session
    then quietly runs on CUDA, so both are looked for first.
    """
    import ctypes

    import onnxruntime as ort

    if TENSORRT not in providers:
        return "this onnxruntime has no TensorRT provider"
    capi = Path(ort.__file__).parent / "capi"
    if not (capi / "libonnxruntime_providers_tensorrt.so").is_file():
        return f"the TensorRT provider library is not in {capi}"
    try:
        ctypes.CDLL("libnvinfer.so.10")
    except OSError:
        return "TensorRT 10 (libnvinfer.so.10) is not installed"
    return None


def plan_variants(model: Path, providers: list[str], cfg: ModelStageConfig, size: tuple[int, int],
                  messages: list[str]) -> list[Variant]:
    """What stage 1 times on this machine; what it cannot time goes to ``messages``."""
    cache = cfg.work_dir / "trt-cache"
    device = "cuda" if CUDA in providers else "cpu"
    if device == "cpu":
        messages.append(f"no CUDA provider in this onnxruntime ({', '.join(providers)}): stage 1 times the CPU "
                        "provider instead")
    variants = [Variant(f"{device} fp32", model, CUDA if device == "cuda" else CPU)]
    try:
        fp16 = make_fp16_model(model, cfg.work_dir / FP16_FILENAME)
        variants.append(Variant(f"{device} fp16", fp16, variants[0].provider))
    except Exception as exc:  # noqa: BLE001 - onnxconverter-common missing or a graph it cannot convert
        messages.append(f"no fp16 export: {type(exc).__name__}: {exc}")
    if device == "cpu":
        return variants
    missing = tensorrt_missing(providers)
    if missing:
        messages.append(f"no TensorRT: {missing}; TensorRT FP16/INT8 not measured")
        return variants
    variants.append(Variant("tensorrt fp16", model, TENSORRT,
                            provider_options(TENSORRT, size, cfg.batch_sizes, cache / "fp16")))
    if cfg.int8_model is not None:
        variants.append(Variant("tensorrt int8", cfg.int8_model, TENSORRT,
                                provider_options(TENSORRT, size, cfg.batch_sizes, cache / "int8", int8=True)))
    else:
        messages.append("no INT8 export given (--int8-model): TensorRT INT8 not measured")
    return variants


def input_size(model: Path) -> tuple[int, int]:
    """(height, width) of the model's uint8 NHWC input, from the graph or its model card."""
    from slsg_bench.model import open_session, session_input_size

    return session_input_size(open_session(model, 1))


def open_variant(variant: Variant, threads: int) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    providers: list[Any] = [(variant.provider, variant.options) if variant.options else variant.provider]
    if variant.provider == TENSORRT:
        providers.append(CUDA)  # nodes TensorRT cannot take run on CUDA, not on the CPU
    return ort.InferenceSession(str(variant.model), options, providers=providers)


def time_batches(session: Any, size: tuple[int, int], cfg: ModelStageConfig) -> dict[str, Any]:
    """p50/p99 batch latency and images/s for every batch size (warm-up untimed)."""
    rng = np.random.default_rng(0)
    out = {}
    for batch_size in cfg.batch_sizes:
        batch = rng.integers(0, 256, size=(batch_size, *size, 3), dtype=np.uint8)
        for _ in range(cfg.warmup):
            session.run(None, {INPUT_IMAGE: batch})
        seconds: list[float] = []
        started = time.perf_counter()
        while len(seconds) < cfg.iterations and (len(seconds) < 3 or
                                                 time.perf_counter() - started < cfg.seconds_per_batch):
            t0 = time.perf_counter()
            session.run(None, {INPUT_IMAGE: batch})
            seconds.append(time.perf_counter() - t0)
        ms = np.asarray(seconds) * 1e3
        p50 = float(np.median(ms))
        out[str(batch_size)] = {"runs": len(ms), "p50_ms": round(p50, 4), "p99_ms": round(float(np.percentile(ms, 99)), 4),
                                "images_per_s": round(batch_size / p50 * 1e3, 2)}
    return out


def check_batch(size: tuple[int, int]) -> np.ndarray:
    """The fixed batch every variant's outputs are compared on (the fp32 export's are the reference)."""
    return np.random.default_rng(7).integers(0, 256, size=(2, *size, 3), dtype=np.uint8)


def agreement(reference: dict[str, np.ndarray], outputs: dict[str, np.ndarray]) -> dict[str, float]:
    """How far a variant's anomaly map and score are from the fp32 export's on the check batch."""
    ref_map, out_map = reference[OUTPUT_ANOMALY_MAP], outputs[OUTPUT_ANOMALY_MAP]
    diff = np.abs(out_map.astype(np.float64) - ref_map)
    return {"map_max_abs": round(float(diff.max()), 6), "map_mean_abs": round(float(diff.mean()), 6),
            "score_max_abs": round(float(np.abs(outputs[OUTPUT_SCORE] - reference[OUTPUT_SCORE]).max()), 6)}


def bench_variant(variant: Variant, size: tuple[int, int], cfg: ModelStageConfig,
                  threads: int) -> tuple[dict[str, Any], dict[str, np.ndarray] | None]:
    """Build (untimed, reported apart), then time every batch size; an error is reported, not raised.

    Returns the report entry and the variant's outputs on :func:`check_batch` (None on error).
    """
    result: dict[str, Any] = {"variant": variant.label, "provider": variant.provider, "model": str(variant.model)}
    start = time.perf_counter()
    try:
        session = open_variant(variant, threads)
        result["session_providers"] = session.get_providers()
        first = np.zeros((cfg.batch_sizes[0], *size, 3), np.uint8)
        session.run(None, {INPUT_IMAGE: first})  # TensorRT builds (or loads) its engine here
        result["build_s"] = round(time.perf_counter() - start, 2)
        if result["session_providers"][0] != variant.provider:  # ORT quietly runs on what is left
            result["warning"] = f"{variant.provider} did not take the model; it ran on {result['session_providers']}"
        names = [OUTPUT_ANOMALY_MAP, OUTPUT_SCORE]
        outputs = dict(zip(names, session.run(names, {INPUT_IMAGE: check_batch(size)})))
        result["by_batch"] = time_batches(session, size, cfg)
    except Exception as exc:  # noqa: BLE001 - one variant failing must not lose the others' figures
        result["error"] = f"{type(exc).__name__}: {str(exc)[:500]}"
        return result, None
    return result, outputs


def run_model_stage(model: Path, cfg: ModelStageConfig, threads: int, deadline: Any) -> dict[str, Any]:
    """Stage 1's report: the variants timed, and why the others were not."""
    messages: list[str] = []
    providers = available_providers()
    size = input_size(model)
    results = []
    reference = None  # the first variant (the fp32 export) is what the others are compared with
    for variant in plan_variants(model, providers, cfg, size, messages):
        if deadline.expired():
            messages.append(f"{variant.label}: skipped, over the time budget")
            continue
        print(f"gpu bench: stage 1: {variant.label} ...", flush=True)
        result, outputs = bench_variant(variant, size, cfg, threads)
        if reference is None:
            reference = outputs
        elif outputs is not None:
            result["vs_fp32"] = agreement(reference, outputs)
        results.append(result)
    return {"input_size": list(size), "providers_available": providers, "batch_sizes": list(cfg.batch_sizes),
            "results": results, "messages": messages}
