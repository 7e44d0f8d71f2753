"""The GPU microservice, measured: one script for a lent GPU machine, with a time budget.

    python -m slsg_bench.gpu --repository R --name N --out REPORT_DIR --budget-s 360

Three stages on the newest version of model N (docs/gpu.md says how to run it on a lent machine):

1. the model alone in ONNX Runtime: CUDA fp32 and fp16, TensorRT FP16 (and INT8 with --int8-model),
   p50/p99 latency and images/s by batch size, engine build time apart (``slsg_bench.gpu_model``);
2. a real Triton server (nvidia-pytriton's ``tritonserver``, dynamic batching) driven by concurrent
   gRPC clients: throughput, the batch its batcher forms, its queue and compute times
   (``slsg_bench.gpu_triton``);
3. the whole service: gateway processes in front of that Triton, fed camera JPEGs at rising
   concurrency; where the time goes; how many gateway processes one GPU needs
   (``slsg_bench.gpu_service``).

It writes ``gpu_report.json`` and ``gpu_report.md`` to --out, prints progress, and skips what
would overrun --budget-s with a message. Without ONNX Runtime's CUDA provider it runs the same
stages on the CPU provider at tiny sizes and says so: those figures are not GPU figures.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from slsg_bench.gpu_model import CUDA, ModelStageConfig, available_providers, run_model_stage
from slsg_bench.gpu_service import ServiceStageConfig, run_service_stage
from slsg_bench.gpu_triton import TritonStageConfig, run_triton_stage
from slsg_bench.report import Table, environment

FALLBACK_MESSAGE = "no CUDA provider: CPU fallback, figures are not GPU figures"
REPORT_JSON, REPORT_MD = "gpu_report.json", "gpu_report.md"
STAGE1_SHARE = 0.35  # of the budget; TensorRT's engine builds take most of it


@dataclass
class Plan:
    """Everything the three stages are told; ``tiny()`` is the CPU fallback's version of it."""

    model: ModelStageConfig
    triton: TritonStageConfig
    service: ServiceStageConfig

    def tiny(self) -> "Plan":
        """Same stages, sizes a CPU gets through in seconds."""
        model = replace(self.model, batch_sizes=(1, 2), iterations=3, warmup=1, seconds_per_batch=1.0)
        triton = replace(self.triton, max_batch_size=4, preferred_batch_sizes=(2, 4), instance_count=1,
                         clients=(2,), seconds_per_level=min(self.triton.seconds_per_level, 2.0))
        service = replace(self.service, gateway_counts=(1,), start_concurrency_per_gateway=1, max_concurrency=2,
                          seconds_per_level=min(self.service.seconds_per_level, 2.0), load_processes=1,
                          gateway_max_batch=4)
        return Plan(model, triton, service)


class Deadline:
    """The total time budget; stages ask it before every step."""

    def __init__(self, budget_s: float) -> None:
        self.start = time.monotonic()
        self.stop_at = self.start + budget_s

    def remaining(self) -> float:
        return self.stop_at - time.monotonic()

    def expired(self) -> bool:
        return self.remaining() <= 0

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def share(self, fraction: float) -> "Deadline":
        """A deadline for one stage: ``fraction`` of what is left now."""
        part = Deadline(0.0)
        part.start, part.stop_at = self.start, min(self.stop_at, time.monotonic() + fraction * self.remaining())
        return part


# ---------------------------------------------------------------------------------------------
# Arguments


def _ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated integers, e.g. 1,8,32") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected integers >= 1")
    return values


def _frame_size(text: str) -> tuple[int, int]:
    from slsg_bench.frames import parse_size

    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m slsg_bench.gpu", description=__doc__.splitlines()[0])
    p.add_argument("--repository", type=Path, required=True, help="model repository (NAME/VERSION/model.onnx)")
    p.add_argument("--name", required=True, help="model name; its newest version is measured")
    p.add_argument("--out", type=Path, required=True, help="report folder (gpu_report.json, gpu_report.md, logs)")
    p.add_argument("--budget-s", type=float, default=360.0, help="total time budget; later steps are skipped past it")
    p.add_argument("--stages", type=_ints, default=(1, 2, 3), help="which stages (default 1,2,3)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="ONNX Runtime CPU threads")
    g = p.add_argument_group("stage 1: the model alone")
    g.add_argument("--batch-sizes", type=_ints, default=(1, 8, 32, 64))
    g.add_argument("--iterations", type=int, default=200, help="timed runs per batch size at most")
    g.add_argument("--warmup", type=int, default=10, help="untimed runs per batch size")
    g.add_argument("--seconds-per-batch", type=float, default=3.0, help="stop timing a batch size after this")
    g.add_argument("--int8-model", type=Path, default=None, help="an INT8 export, timed with TensorRT INT8")
    g = p.add_argument_group("stage 2: Triton")
    g.add_argument("--triton-clients", type=_ints, default=(8, 32, 64), help="concurrent gRPC clients per level")
    g.add_argument("--triton-seconds", type=float, default=8.0, help="seconds per level")
    g.add_argument("--triton-max-batch", type=int, default=64, help="dynamic batcher max_batch_size")
    g.add_argument("--queue-delay-us", type=int, default=1000, help="dynamic batcher max_queue_delay_microseconds")
    g.add_argument("--instances", type=int, default=2, help="model instances in Triton")
    g.add_argument("--stub-environment", type=Path, default=None,
                   help="virtual environment for Triton's Python backend stub (numpy<2 where this Python has numpy 2)")
    g = p.add_argument_group("stage 3: the whole service")
    g.add_argument("--gateways", type=_ints, default=(1, 2, 4, 8), help="gateway process counts, tried in order")
    g.add_argument("--frame-size", type=_frame_size, default=(1600, 1280), help="JPEG WIDTHxHEIGHT")
    g.add_argument("--level-seconds", type=float, default=6.0, help="seconds per concurrency level")
    g.add_argument("--start-concurrency", type=int, default=4, help="first level's cameras per gateway")
    g.add_argument("--max-concurrency", type=int, default=256, help="highest camera count")
    g.add_argument("--load-processes", type=int, default=4, help="load-generator processes")
    g.add_argument("--gateway-max-batch", type=int, default=8, help="the gateways' micro-batch limit")
    return p.parse_args(argv)


def plan_from_args(args: argparse.Namespace, work: Path) -> Plan:
    preferred = tuple(b for b in (8, 16, 32, 64) if b <= args.triton_max_batch) or (args.triton_max_batch,)
    return Plan(
        ModelStageConfig(args.batch_sizes, args.iterations, args.warmup, args.seconds_per_batch, work,
                         args.int8_model),
        TritonStageConfig(args.triton_max_batch, preferred, args.queue_delay_us, args.instances,
                          args.triton_clients, args.triton_seconds),
        ServiceStageConfig(args.gateways, args.start_concurrency, args.max_concurrency, args.level_seconds,
                           args.load_processes, args.frame_size, args.gateway_max_batch),
    )


# ---------------------------------------------------------------------------------------------
# Running


def log(deadline: Deadline, message: str) -> None:
    print(f"gpu bench [{deadline.elapsed():6.1f} s]: {message}", flush=True)


def onnxruntime_version() -> str:
    """The imported onnxruntime's own version: a carried onnxruntime-gpu can shadow another's metadata."""
    import onnxruntime as ort

    return ort.__version__


def gpu_devices() -> list[dict[str, str]]:
    """The GPUs nvidia-smi lists (name, driver, memory); empty without nvidia-smi or a GPU."""
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        text = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    rows = [[v.strip() for v in line.split(",")] for line in text.splitlines() if line.strip()]
    return [{"name": r[0], "driver": r[1], "memory": r[2]} for r in rows if len(r) == 3]


def backend_devices(log_path: Path | None) -> list[str]:
    """What each Triton model instance said it runs on (onnx_model.py logs its ONNX Runtime providers)."""
    if log_path is None or not log_path.is_file():
        return []
    lines = log_path.read_text(encoding="utf-8", errors="replace").splitlines()
    return [line.split("slsg onnx_model: ", 1)[1] for line in lines if "slsg onnx_model: " in line]


def run_triton_stages(model: Path, args: argparse.Namespace, plan: Plan, size: tuple[int, int], work: Path,
                      deadline: Deadline) -> dict[str, Any]:
    """Stages 2 and 3 share one Triton server; a server that will not start fails both, with its log."""
    from slsg_bench.gpu_triton import write_bench_repository
    from slsg_gateway.server import free_port
    from slsg_triton.local import LocalTriton

    out: dict[str, Any] = {}
    repository = write_bench_repository(model, args.name, work / "triton-repository", plan.triton)
    server = LocalTriton(repository, free_port(), free_port(), free_port(), model_control_mode="explicit",
                         load_models=[args.name], work_dir=work / "triton", log_path=args.out / "tritonserver.log",
                         intra_op_threads=1 if CUDA in available_providers() else args.threads,
                         stub_environment=args.stub_environment)
    log(deadline, "starting Triton ...")
    started = time.monotonic()
    try:
        server.start()
    except Exception as exc:  # noqa: BLE001 - reported; stage 1's figures are still written
        error = f"Triton did not start: {type(exc).__name__}: {str(exc)[-1500:]}"
        return {"triton": {"error": error}, "service": {"error": error}}
    try:
        startup_s = round(time.monotonic() - started, 2)
        if 2 in args.stages:
            out["triton"] = run_triton_stage(server, args.name, size, plan.triton, deadline)
            out["triton"].update(startup_s=startup_s, backend_devices=backend_devices(server.log_path))
        if 3 in args.stages:
            if deadline.remaining() < 30:
                out["service"] = {"skipped": "over the time budget before stage 3"}
            else:
                out["service"] = run_service_stage(server, args.name, plan.service, work / "service", deadline)
    finally:
        server.stop()
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    from slsg_bench.gpu_model import input_size
    from slsg_bench.model import resolve_model

    deadline = Deadline(args.budget_s)
    version, model = resolve_model(args.repository, args.name, None)
    args.out.mkdir(parents=True, exist_ok=True)
    work = args.out / "work"
    providers = available_providers()
    fallback = CUDA not in providers
    plan = plan_from_args(args, work)
    if fallback:
        print(f"gpu bench: {FALLBACK_MESSAGE}", flush=True)
        plan = plan.tiny()
    devices = gpu_devices()
    log(deadline, f"{args.name} v{version} ({model}); GPU: {', '.join(d['name'] for d in devices) or 'none'}; "
                  f"ONNX Runtime providers: {', '.join(providers)}")
    size = input_size(model)
    report: dict[str, Any] = {
        "benchmark": "gpu", "fallback": fallback, "fallback_message": FALLBACK_MESSAGE if fallback else None,
        "devices": devices, "onnxruntime": onnxruntime_version(), "onnxruntime_providers": providers,
        "environment": environment(args.threads),
        "model": {"name": args.name, "version": version, "path": str(model), "input_size": list(size)},
        "budget_s": args.budget_s, "plan": json.loads(json.dumps(asdict(plan), default=str)), "stages": {},
    }
    if 1 in args.stages:
        log(deadline, "stage 1: the model alone in ONNX Runtime")
        report["stages"]["model"] = run_model_stage(model, plan.model, args.threads,
                                                     deadline.share(STAGE1_SHARE if {2, 3} & set(args.stages) else 1.0))
    if {2, 3} & set(args.stages):
        if deadline.remaining() < 30:
            report["stages"]["triton"] = {"skipped": "over the time budget before stage 2"}
        else:
            log(deadline, "stages 2 and 3: Triton, then gateways in front of it")
            report["stages"].update(run_triton_stages(model, args, plan, size, work, deadline))
    report["elapsed_s"] = round(deadline.elapsed(), 1)
    return report


# ---------------------------------------------------------------------------------------------
# The report


def model_table(stage: dict[str, Any]) -> Table:
    rows = []
    for result in stage["results"]:
        if "error" in result:
            rows.append([result["variant"], None, None, None, None, result.get("build_s"), result["error"][:80]])
            continue
        vs = result.get("vs_fp32")
        note = (f"vs fp32: map max {vs['map_max_abs']:.3g}, mean {vs['map_mean_abs']:.3g}; score max "
                f"{vs['score_max_abs']:.3g}") if vs else ""
        for batch, r in result["by_batch"].items():
            rows.append([result["variant"], int(batch), r["p50_ms"], r["p99_ms"], r["images_per_s"],
                         result["build_s"], " ".join(filter(None, [result.get("warning"), note]))])
    return Table(f"1. the model alone, {stage['input_size'][0]}x{stage['input_size'][1]} (build = session + first "
                 "run, untimed; |difference| from the fp32 export on a fixed batch)",
                 ["variant", "batch", "p50 ms", "p99 ms", "images/s", "build s", "note"], rows)


def triton_table(stage: dict[str, Any]) -> Table:
    rows = []
    for level in stage["levels"]:
        t, lat = level["triton"], level["latency_ms"] or {}
        rows.append([level["clients"], level["images_per_s"], lat.get("p50"), lat.get("p99"), t["mean_batch"],
                     t["queue_ms"], t["compute_infer_ms"], t["request_ms"], level["failures"]])
    devices = "; ".join(sorted(set(stage.get("backend_devices", [])))) or "not logged"
    return Table(f"2. Triton, dynamic batching (max batch {stage['max_batch_size']}, queue delay "
                 f"{stage['max_queue_delay_us']} us, {stage['instance_count']} instance(s)), gRPC clients sending "
                 f"single frames; the Python backend's ONNX Runtime: {devices}",
                 ["clients", "images/s", "p50 ms", "p99 ms", "batch formed", "queue ms", "compute ms", "request ms",
                  "failures"], rows)


def service_table(stage: dict[str, Any]) -> Table:
    rows = []
    for run_ in stage["runs"]:
        for level in run_["levels"]:
            s, lat, t = level["server_median_ms"], level["latency_ms"] or {}, level["triton"]
            rows.append([run_["gateways"], level["concurrency"], level["images_per_s"], lat.get("p50"), lat.get("p99"),
                         s["decode"], s["preprocess"], s["infer"], t["queue_ms"], t["compute_infer_ms"],
                         s["postprocess"], level["http_overhead_ms"], level["gateway_mean_batch"], t["mean_batch"],
                         level["failures"]])
    w, h = stage["frame_size"]
    return Table(f"3. the whole service, {w}x{h} JPEG in, JSON out (median ms per frame; infer = gateway batch wait "
                 f"+ Triton call); gateway processes needed: {stage['gateways_needed']}",
                 ["gateways", "cameras", "images/s", "p50 ms", "p99 ms", "decode", "preproc", "infer",
                  "triton queue", "triton compute", "postproc", "http", "gw batch", "triton batch", "failures"], rows)


def markdown_table(table: Table) -> str:
    from slsg_bench.report import format_cell

    lines = [f"**{table.title}**", "", "| " + " | ".join(table.headers) + " |",
             "|" + "|".join("---" for _ in table.headers) + "|"]
    lines += ["| " + " | ".join(format_cell(c) for c in row) + " |" for row in table.rows]
    return "\n".join(lines)


def report_tables(report: dict[str, Any]) -> list[Table]:
    builders = {"model": model_table, "triton": triton_table, "service": service_table}
    return [builders[k](v) for k, v in report["stages"].items() if k in builders and "error" not in v
            and "skipped" not in v]


def report_markdown(report: dict[str, Any]) -> str:
    devices = ", ".join(f"{d['name']} ({d['memory']}, driver {d['driver']})" for d in report["devices"]) or "none"
    env = report["environment"]
    lines = [f"# GPU serving benchmark: {report['model']['name']} v{report['model']['version']}", ""]
    if report["fallback"]:
        lines += [f"**{FALLBACK_MESSAGE}**", ""]
    lines += [f"- GPU: {devices}", f"- ONNX Runtime {report['onnxruntime']}, providers: "
              f"{', '.join(report['onnxruntime_providers'])}",
              f"- CPU: {env['processor']}, {env['cpu_count']} cores; started {env['started']}; "
              f"{report['elapsed_s']} s of a {report['budget_s']:g} s budget", ""]
    lines += [markdown_table(t) + "\n" for t in report_tables(report)]
    notes = [f"- {name}: {stage.get('error') or stage.get('skipped')}" for name, stage in report["stages"].items()
             if "error" in stage or "skipped" in stage]
    notes += [f"- {name}: {m}" for name, stage in report["stages"].items() for m in stage.get("messages", [])]
    if notes:
        lines += ["Notes:", "", *notes, ""]
    return "\n".join(lines)


def write_report(report: dict[str, Any], out: Path) -> tuple[Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    (out / REPORT_JSON).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    (out / REPORT_MD).write_text(report_markdown(report), encoding="utf-8")
    return out / REPORT_JSON, out / REPORT_MD


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        report = run(args)
    except (FileNotFoundError, ValueError) as exc:
        print(f"gpu bench: {exc}", file=sys.stderr)
        return 2
    paths = write_report(report, args.out)
    print(report_markdown(report))
    print(f"gpu bench: wrote {paths[0]} and {paths[1]}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
