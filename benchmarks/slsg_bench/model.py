"""``slsg bench model``: PyTorch eager vs in-process ONNX Runtime on one exported model.

Per-image latency (batch 1) and throughput by batch size for both engines, measured
interleaved (one PyTorch call, then one ONNX Runtime call, ...) so background load hits both
alike; the model's GFLOP per image (from the checkpoint with ``count_flops``, else from the
ONNX graph's Conv/ConvTranspose/MatMul/Gemm shapes); and the achieved GFLOP/s against this
machine's float32 matrix-multiply peak (the better of numpy's BLAS and ONNX Runtime's MatMul,
see ``slsg_bench.peak``) measured with the same thread count.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from collections.abc import Callable

import numpy as np

from slsg_bench.peak import BACKENDS, measure_peak
from slsg_bench.report import Table, environment, percentile_timing, ratio
from slsg.contract import INPUT_IMAGE, MODEL_CARD_KEY, OUTPUT_ANOMALY_MAP, OUTPUT_SCORE, list_versions, model_path


@dataclass
class ModelBenchConfig:
    repository: Path
    name: str
    version: int | None = None  # None: the newest servable version
    checkpoint: Path | None = None  # RUN/checkpoint.pt: adds PyTorch eager and count_flops
    threads: int = 1
    iterations: int = 20
    warmup: int = 3
    batch_sizes: tuple[int, ...] = (1, 8)
    peak_size: int = 2048  # matmul side for the machine's peak
    against: str | None = None  # "NAME[:VERSION]": a second exported model timed in the same rounds
    thread_counts: tuple[int, ...] = ()  # with ``against``: only the side-by-side comparison, at each count


def resolve_model(repository: Path, name: str, version: int | None) -> tuple[int, Path]:
    """(version, path of model.onnx); a clear error naming the folder when there is none."""
    versions = list_versions(repository, name)
    if not versions:
        raise FileNotFoundError(f"no servable version of model {name!r} under {Path(repository) / name} "
                                f"(expected {name}/<version>/model.onnx)")
    chosen = versions[-1] if version is None else version
    if chosen not in versions:
        raise FileNotFoundError(f"model {name!r} has no version {chosen} under {repository} (has {versions})")
    return chosen, model_path(repository, name, chosen)


def open_session(path: Path, threads: int) -> Any:
    """A CPU ONNX Runtime session with ``threads`` intra-op threads (inter-op 1, as in the gateway)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3  # errors only: no initializer-clean-up chatter in the tables
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def session_input_size(session: Any) -> tuple[int, int]:
    """(height, width) of the contract input ``image`` [N, H, W, 3], from the shape or the model card."""
    import json

    shape = {i.name: i.shape for i in session.get_inputs()}.get(INPUT_IMAGE)
    if shape is None:
        raise ValueError(f"model has no input {INPUT_IMAGE!r}: not an SLSG contract model")
    if isinstance(shape[1], int) and isinstance(shape[2], int):
        return shape[1], shape[2]
    card = json.loads(session.get_modelmeta().custom_metadata_map[MODEL_CARD_KEY])
    return int(card["input_height"]), int(card["input_width"])


def onnx_gflops(path: Path) -> float:
    """GFLOP per image of the graph's Conv, ConvTranspose, MatMul and Gemm nodes (a multiply-add = 2 FLOP),
    from ONNX shape inference with the batch fixed to 1; the convention of ``count_flops``."""
    import onnx
    from onnx import shape_inference

    model = onnx.load(str(path), load_external_data=False)
    for graph_input in model.graph.input:
        dims = graph_input.type.tensor_type.shape.dim
        if dims and not dims[0].HasField("dim_value"):
            dims[0].dim_value = 1
    model = shape_inference.infer_shapes(model, data_prop=True)
    shapes = {v.name: _dims(v) for v in [*model.graph.input, *model.graph.value_info, *model.graph.output]}
    shapes.update({t.name: list(t.dims) for t in model.graph.initializer})
    total = 0.0
    for node in model.graph.node:
        counter = _NODE_FLOPS.get(node.op_type)
        if counter is None:
            continue
        operands = [shapes.get(n) for n in node.input[:2]] + [shapes.get(node.output[0])]
        if any(s is None or None in s for s in operands):
            raise ValueError(f"{path}: shape inference left {node.op_type} node {node.name!r} without static shapes")
        total += counter(node, *operands)
    return total / 1e9


def _dims(value_info: Any) -> list[int | None]:
    return [d.dim_value if d.HasField("dim_value") else None for d in value_info.type.tensor_type.shape.dim]


def _attr(node: Any, name: str, default: int) -> int:
    from onnx import helper

    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _conv_flops(node: Any, x: list[int], w: list[int], y: list[int]) -> float:
    # weight [Cout, Cin/group, k...]: each output element takes Cin/group * prod(k) multiply-adds
    return 2.0 * float(np.prod(y)) * float(np.prod(w[1:]))


def _conv_transpose_flops(node: Any, x: list[int], w: list[int], y: list[int]) -> float:
    # weight [Cin, Cout/group, k...]: each input element scatters into Cout/group * prod(k) outputs
    return 2.0 * float(np.prod(x)) * float(np.prod(w[1:]))


def _matmul_flops(node: Any, a: list[int], b: list[int], y: list[int]) -> float:
    return 2.0 * float(np.prod(y)) * (a[-1] if len(a) > 1 else a[0])


def _gemm_flops(node: Any, a: list[int], b: list[int], y: list[int]) -> float:
    inner = a[0] if _attr(node, "transA", 0) else a[1]
    return 2.0 * float(np.prod(y)) * inner


_NODE_FLOPS: dict[str, Callable[..., float]] = {
    "Conv": _conv_flops, "ConvTranspose": _conv_transpose_flops, "MatMul": _matmul_flops, "Gemm": _gemm_flops,
}


@dataclass
class Engine:
    """A named callable running one uint8 NHWC batch."""

    name: str
    run: Callable[[np.ndarray], Any]
    seconds: dict[int, list[float]] = field(default_factory=dict)


def ort_engine(session: Any) -> Engine:
    return Engine("onnxruntime", lambda batch: session.run([OUTPUT_ANOMALY_MAP, OUTPUT_SCORE], {INPUT_IMAGE: batch}))


def torch_engine(checkpoint: Path, input_size: tuple[int, int], threads: int) -> tuple[Engine, float]:
    """PyTorch eager on the checkpoint's InferenceGraph (what the export traced), and its GFLOP/image."""
    import torch

    from slsg.contract import Calibration
    from slsg_train.export.onnx_export import InferenceGraph
    from slsg_train.inference import load_model
    from slsg_train.models import count_flops

    torch.set_num_threads(threads)
    loaded = load_model(checkpoint)
    if tuple(loaded.image_size) != tuple(input_size):
        raise ValueError(f"checkpoint {checkpoint} is for {loaded.image_size} images but the ONNX model takes "
                         f"{input_size}: not the same model")
    gflop = count_flops(loaded.model, *input_size)
    graph = InferenceGraph(loaded.model, loaded.top_k, loaded.calibration or Calibration()).eval()

    def run(batch: np.ndarray) -> Any:
        with torch.inference_mode():
            return graph(torch.from_numpy(batch))

    return Engine("pytorch_eager", run), gflop


def time_interleaved(engines: list[Engine], batch_sizes: tuple[int, ...], input_size: tuple[int, int],
                     iterations: int, warmup: int, desc: str = "bench model") -> None:
    """Fill ``engine.seconds[batch]``: per batch size, warm-up then alternate the engines call by call."""
    from tqdm import tqdm

    rng = np.random.default_rng(0)
    steps = len(batch_sizes) * (warmup + iterations)
    with tqdm(total=steps, desc=desc, unit="round", leave=False) as bar:
        for batch_size in batch_sizes:
            batch = rng.integers(0, 256, size=(batch_size, *input_size, 3), dtype=np.uint8)
            for engine in engines:
                engine.seconds[batch_size] = []
            for i in range(warmup + iterations):
                for engine in engines:
                    start = time.perf_counter()
                    engine.run(batch)
                    if i >= warmup:
                        engine.seconds[batch_size].append(time.perf_counter() - start)
                bar.update()


def _engine_results(engine: Engine, gflop: float | None) -> dict[str, Any]:
    by_batch = {}
    for batch_size, seconds in engine.seconds.items():
        timing = percentile_timing(seconds)
        images_per_s = batch_size / (timing.median_ms / 1e3)
        by_batch[str(batch_size)] = {
            "batch_ms": timing.to_dict(),
            "per_image_median_ms": round(timing.median_ms / batch_size, 4),
            "images_per_s": round(images_per_s, 3),
            "gflops_achieved": round(images_per_s * gflop, 3) if gflop else None,
        }
    best = max(by_batch.values(), key=lambda r: r["images_per_s"])
    return {"by_batch": by_batch, "best_images_per_s": best["images_per_s"],
            "best_gflops_achieved": best["gflops_achieved"]}


def run_model_bench(cfg: ModelBenchConfig) -> dict[str, Any]:
    """Measure everything and return the JSON-ready report."""
    if cfg.threads < 1 or cfg.iterations < 1 or not cfg.batch_sizes or min(cfg.batch_sizes) < 1:
        raise ValueError("threads, iterations and every batch size must be >= 1")
    if cfg.thread_counts:
        return run_side_by_side(cfg)
    env = environment(cfg.threads)
    version, path = resolve_model(cfg.repository, cfg.name, cfg.version)
    session = open_session(path, cfg.threads)
    input_size = session_input_size(session)
    engines = [ort_engine(session)]
    graph_gflop = onnx_gflops(path)
    gflop, flop_source, torch_note = graph_gflop, "onnx_graph", None
    if cfg.checkpoint is not None:
        try:
            engine, gflop = torch_engine(Path(cfg.checkpoint), input_size, cfg.threads)
            engines.insert(0, engine)
            flop_source = "checkpoint_count_flops"
        except ImportError as exc:  # the serve-only install has no torch: ORT figures still stand
            torch_note = f"PyTorch eager skipped: {exc}"
    against = _against_engine(cfg, input_size) if cfg.against else None
    if against is not None:
        engines.append(against[0])
    time_interleaved(engines, cfg.batch_sizes, input_size, cfg.iterations, cfg.warmup)
    peaks = {backend: measure_peak(cfg.threads, cfg.peak_size, backend=backend) for backend in BACKENDS}
    peak = max(peaks.values(), key=lambda p: p.gflops)
    results = {e.name: _engine_results(e, against[1] if against and e is against[0] else gflop) for e in engines}
    ort = results["onnxruntime"]
    other = results.get(AGAINST)
    eager = results.get("pytorch_eager")
    return {
        "benchmark": "model",
        "environment": env,
        "model": {"name": cfg.name, "version": version, "path": str(path), "input_size": list(input_size),
                  "gflop_per_image": round(gflop, 4), "gflop_source": flop_source,
                  "onnx_graph_gflop_per_image": round(graph_gflop, 4)},
        "settings": {"threads": cfg.threads, "iterations": cfg.iterations, "warmup": cfg.warmup,
                     "batch_sizes": list(cfg.batch_sizes)},
        "matmul_peak": {"gflops": peak.gflops, "backend": peak.backend, "size": peak.size, "threads": peak.threads,
                        "by_backend": {b: {"gflops": p.gflops, "median_gflops": p.median_gflops}
                                       for b, p in peaks.items()}},
        "results": results,
        "ratios": {
            "ort_speedup_latency_batch1": ratio(_latency(eager), _latency(ort)) if eager else None,
            "ort_speedup_best_throughput":
                ratio(ort["best_images_per_s"], eager["best_images_per_s"]) if eager else None,
            "ort_fraction_of_matmul_peak": ratio(ort["best_gflops_achieved"], peak.gflops),
            "eager_fraction_of_matmul_peak": ratio(eager["best_gflops_achieved"], peak.gflops) if eager else None,
            "latency_vs_against_batch1": ratio(_latency(ort), _latency(other)) if other else None,
        },
        "against": {"model": cfg.against, "path": str(against[2]), "gflop_per_image": round(against[1], 4)}
        if against else None,
        "notes": [n for n in (torch_note,) if n],
    }


AGAINST = "onnxruntime_against"  # the result key of the --against model


def _against_engine(cfg: ModelBenchConfig, input_size: tuple[int, int]) -> tuple[Engine, float, Path]:
    """(engine, GFLOP/image from its graph, path) of the ``--against`` model; same input size required."""
    name, _, version = cfg.against.partition(":")
    if version and not version.isdigit():
        raise ValueError(f"--against takes NAME or NAME:VERSION, got {cfg.against!r}")
    _, path = resolve_model(cfg.repository, name, int(version) if version else None)
    session = open_session(path, cfg.threads)
    size = session_input_size(session)
    if size != tuple(input_size):
        raise ValueError(f"--against {cfg.against} takes {size} images, {cfg.name} takes {tuple(input_size)}: "
                         "not comparable")
    return Engine(AGAINST, ort_engine(session).run), onnx_gflops(path), path


# x86 instruction sets that decide INT8 and BF16 speed, as /proc/cpuinfo names them
INSTRUCTION_SETS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile", "amx_int8", "amx_bf16")


def cpu_instruction_sets(cpuinfo: str | None = None) -> dict[str, bool]:
    """Which of :data:`INSTRUCTION_SETS` the CPU has (the first ``flags`` line of /proc/cpuinfo; all False
    where there is none, e.g. not Linux)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(encoding="utf-8")
        except OSError:
            cpuinfo = ""
    line = next((ln for ln in cpuinfo.splitlines() if ln.startswith(("flags", "Features"))), "")
    flags = set(line.partition(":")[2].split())
    return {name: name in flags for name in INSTRUCTION_SETS}


def _contract_session(repository: Path, spec: str, threads: int) -> tuple[Any, int, Path, dict[str, Any]]:
    """(session, version, path, card as a dict) of ``NAME`` or ``NAME:VERSION``."""
    import json

    name, _, version = spec.partition(":")
    if version and not version.isdigit():
        raise ValueError(f"a model is NAME or NAME:VERSION, got {spec!r}")
    chosen, path = resolve_model(repository, name, int(version) if version else None)
    session = open_session(path, threads)
    meta = session.get_modelmeta().custom_metadata_map
    card = json.loads(meta[MODEL_CARD_KEY]) if MODEL_CARD_KEY in meta else {}
    return session, chosen, path, card


def run_side_by_side(cfg: ModelBenchConfig) -> dict[str, Any]:
    """Two versions (e.g. INT8 against float32) in the same interleaved rounds, at each thread count and
    batch size: throughput of each and their ratio, with the CPU's instruction sets."""
    if not cfg.against:
        raise ValueError("--thread-counts compares two models: give --against NAME[:VERSION]")
    if min(cfg.thread_counts) < 1:
        raise ValueError(f"every thread count must be >= 1, got {list(cfg.thread_counts)}")
    main_spec = cfg.name if cfg.version is None else f"{cfg.name}:{cfg.version}"
    rows, models = [], {}
    for threads in cfg.thread_counts:
        a, b = (_contract_session(cfg.repository, spec, threads) for spec in (main_spec, cfg.against))
        size = session_input_size(a[0])
        if session_input_size(b[0]) != size:
            raise ValueError(f"--against {cfg.against} takes {session_input_size(b[0])} images, {main_spec} takes "
                             f"{size}: not comparable")
        engines = [Engine("model", ort_engine(a[0]).run), Engine("against", ort_engine(b[0]).run)]
        time_interleaved(engines, cfg.batch_sizes, size, cfg.iterations, cfg.warmup, f"{threads} thread(s)")
        for batch in cfg.batch_sizes:
            ta, tb = (percentile_timing(e.seconds[batch]) for e in engines)
            rows.append({"threads": threads, "batch": batch, "model_images_per_s": round(batch / ta.median_ms * 1e3, 3),
                         "against_images_per_s": round(batch / tb.median_ms * 1e3, 3),
                         "speedup": ratio(tb.median_ms, ta.median_ms), "model_batch_ms": ta.to_dict(),
                         "against_batch_ms": tb.to_dict()})
        models = {"model": _described(main_spec, a), "against": _described(cfg.against, b)}
    return {"benchmark": "model_side_by_side", "environment": {**environment(max(cfg.thread_counts)),
                                                                "instruction_sets": cpu_instruction_sets()},
            "models": models, "input_size": list(size),
            "settings": {"thread_counts": list(cfg.thread_counts), "iterations": cfg.iterations, "warmup": cfg.warmup,
                         "batch_sizes": list(cfg.batch_sizes)},
            "results": rows}


def _described(spec: str, opened: tuple[Any, int, Path, dict[str, Any]]) -> dict[str, Any]:
    _, version, path, card = opened
    return {"model": spec, "version": version, "path": str(path), "precision": card.get("precision", "fp32")}


def side_by_side_tables(report: dict[str, Any]) -> list[Table]:
    a, b = report["models"]["model"], report["models"]["against"]
    sets = report["environment"]["instruction_sets"]
    title = (f"{a['model']} ({a['precision']}) against {b['model']} ({b['precision']}), "
             f"{report['input_size'][0]}x{report['input_size'][1]}, interleaved rounds; CPU: "
             f"{report['environment']['processor']}; instruction sets: "
             f"{', '.join(k for k, v in sets.items() if v) or 'none of ' + ', '.join(sets)}")
    rows = [[r["threads"], r["batch"], r["model_images_per_s"], r["against_images_per_s"], r["speedup"],
             r["model_batch_ms"]["p95_ms"], r["against_batch_ms"]["p95_ms"]] for r in report["results"]]
    return [Table(title, ["threads", "batch", f"{a['precision']} images/s", f"{b['precision']} images/s",
                          "speed-up", f"{a['precision']} p95 ms", f"{b['precision']} p95 ms"], rows)]


def _latency(result: dict[str, Any] | None) -> float | None:
    """Per-image median latency at batch 1 (None when batch 1 was not measured)."""
    return result["by_batch"]["1"]["batch_ms"]["median_ms"] if result and "1" in result["by_batch"] else None


def model_tables(report: dict[str, Any]) -> list[Table]:
    m, peak, ratios = report["model"], report["matmul_peak"], report["ratios"]
    rows = []
    for engine, result in report["results"].items():
        for batch_size, r in result["by_batch"].items():
            t = r["batch_ms"]
            rows.append([engine, int(batch_size), t["median_ms"], t["p95_ms"], r["per_image_median_ms"],
                         r["images_per_s"], r["gflops_achieved"]])
    timing = Table(f"model {m['name']} v{m['version']} {m['input_size'][0]}x{m['input_size'][1]}, "
                   f"{m['gflop_per_image']} GFLOP/image ({m['gflop_source']}), "
                   f"{report['settings']['threads']} threads",
                   ["engine", "batch", "median ms", "p95 ms", "ms/image", "images/s", "GFLOP/s"], rows)
    summary = Table("ratios", ["measure", "value"], [
        *[[f"float32 {peak['size']}^2 matmul GFLOP/s, {b} (best)", p["gflops"]]
          for b, p in peak["by_backend"].items()],
        ["ORT speed-up over eager, batch-1 latency", ratios["ort_speedup_latency_batch1"]],
        ["ORT speed-up over eager, best throughput", ratios["ort_speedup_best_throughput"]],
        [f"ORT fraction of matmul peak ({peak['backend']})", ratios["ort_fraction_of_matmul_peak"]],
        [f"eager fraction of matmul peak ({peak['backend']})", ratios["eager_fraction_of_matmul_peak"]],
        *([[f"ORT batch-1 latency / --against {report['against']['model']}", ratios["latency_vs_against_batch1"]]]
          if report.get("against") else []),
    ])
    return [timing, summary]
