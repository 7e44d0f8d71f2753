"""`slsg bench`: measured figures for the model, the gateway, Triton, a locust load test, the training
pipeline, the two presets' cost and quality side by side, and a PaDiM baseline.

Each sub-command prints tables, or with ``--json`` one JSON document on stdout (tables on stderr).
Only the standard library is imported here; the benchmark modules load inside ``run``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from pathlib import Path


def _ints(text: str, minimum: int) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated integers, e.g. 1,8") from None
    if not values or min(values) < minimum:
        raise argparse.ArgumentTypeError(f"{text!r}: expected integers >= {minimum}")
    return values


def _int_list(text: str) -> tuple[int, ...]:
    return _ints(text, 1)


def _seed_list(text: str) -> tuple[int, ...]:
    seeds = _ints(text, 0)
    if len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"{text!r}: each seed once")
    return seeds


def _frame_size(text: str) -> tuple[int, int]:
    from slsg_bench.frames import parse_size

    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _duration(text: str) -> int:
    from slsg_bench.load import parse_duration

    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _fps(text: str) -> tuple[float, float]:
    try:
        low, high = (float(v) for v in text.split("-"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected MIN-MAX frames per second, e.g. 1-3") from None
    if not 0 < low <= high:
        raise argparse.ArgumentTypeError(f"{text!r}: need 0 < MIN <= MAX")
    return low, high


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--repository", type=Path, default=Path("model_repository"), help="Triton model repository root")
    p.add_argument("--name", required=True, help="model name in the repository")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                   help="ONNX Runtime / PyTorch / BLAS threads, the same for every measurement (default: all cores)")
    p.add_argument("--json", action="store_true", help="print one JSON document on stdout (tables go to stderr)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="bench", metavar="BENCHMARK", required=True)
    model = sub.add_parser("model", help="PyTorch eager vs ONNX Runtime, GFLOP/s vs the matmul peak")
    _common(model)
    model.add_argument("--version", type=int, default=None, help="model version (default: newest)")
    model.add_argument("--checkpoint", type=Path, default=None,
                       help="RUN/checkpoint.pt of the exported model: adds PyTorch eager and count_flops")
    model.add_argument("--iterations", type=int, default=20, help="timed calls per engine and batch size")
    model.add_argument("--warmup", type=int, default=3, help="untimed calls first")
    model.add_argument("--batch-sizes", type=_int_list, default=(1, 8), help="comma-separated (default 1,8)")
    model.add_argument("--peak-size", type=int, default=2048, help="matrix side of the float32 matmul peak")
    model.add_argument("--against", default=None, metavar="NAME[:VERSION]",
                       help="a second model of the repository timed in the same interleaved rounds, e.g. the same "
                            "checkpoint exported without the patch memory; reports the latency ratio")
    model.add_argument("--thread-counts", type=_int_list, default=(), metavar="N,N",
                       help="with --against: only the side-by-side throughput of the two (e.g. INT8 against its "
                            "float32 version) at each of these thread counts and every batch size, and the CPU's "
                            "instruction sets (avx2 / avx512 / VNNI / BF16 / AMX)")

    gateway = sub.add_parser("gateway", help="gateway end to end vs the bare model; decode; memory growth")
    _common(gateway)
    gateway.add_argument("--frame-size", type=_frame_size, default=(1600, 1280), help="JPEG WIDTHxHEIGHT")
    gateway.add_argument("--concurrency", type=_int_list, default=(1, 8), help="client levels (default 1,8)")
    gateway.add_argument("--requests", type=int, default=40, help="timed requests per concurrency level")
    gateway.add_argument("--memory-requests", type=int, default=200,
                         help="requests between the two memory readings (the target is set for 10,000)")
    gateway.add_argument("--iterations", type=int, default=20, help="timed calls of the bare model and the decode")
    gateway.add_argument("--in-process", action="store_true",
                         help="run the gateway in this process (default: its own `slsg serve` process, as deployed)")

    records = sub.add_parser("records", help="gateway throughput with inspection records off / on / on with "
                                             "every frame kept, interleaved rounds")
    _common(records)
    records.add_argument("--frame-size", type=_frame_size, default=(1600, 1280), help="JPEG WIDTHxHEIGHT")
    records.add_argument("--concurrency", type=int, default=8, help="client threads (default 8)")
    records.add_argument("--requests", type=int, default=80, help="timed requests per variant and round")
    records.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default 5)")

    triton = sub.add_parser("triton", help="local Triton (gRPC, Python backend) vs in-process ONNX Runtime")
    _common(triton)
    triton.add_argument("--iterations", type=int, default=20)
    triton.add_argument("--warmup", type=int, default=3)
    triton.add_argument("--batch-sizes", type=_int_list, default=(1, 8))

    load = sub.add_parser("load", help="locust camera-mix load test against a gateway started for the run")
    _common(load)
    load.add_argument("--users", type=int, default=8, help="simulated cameras")
    load.add_argument("--duration", type=_duration, default=20, help="run time, e.g. 20s or 2m")
    load.add_argument("--lines", type=int, default=3, help="production lines the cameras are spread over")
    load.add_argument("--cameras-per-line", type=int, default=4)
    load.add_argument("--fps", type=_fps, default=(1.0, 3.0), help="per-camera frame rate range, MIN-MAX")
    load.add_argument("--frame-size", type=_frame_size, default=(1600, 1280), help="JPEG WIDTHxHEIGHT")
    load.add_argument("--locustfile", type=Path, default=None, help="default: benchmarks/slsg_bench/locustfile.py")

    pipeline = sub.add_parser("pipeline", help="training step time: simulation in workers vs pre-generated batches")
    pipeline.add_argument("--data", type=Path, required=True, help="data set root (MVTec LOCO AD layout)")
    pipeline.add_argument("--category", required=True)
    pipeline.add_argument("--image-size", default="256", help="'256' or 'WxH'")
    pipeline.add_argument("--steps", type=int, default=20, help="timed steps per variant")
    pipeline.add_argument("--warmup", type=int, default=3)
    pipeline.add_argument("--batch-size", type=int, default=4)
    pipeline.add_argument("--workers", type=int, default=2)
    from slsg_train.training.config import PRECISIONS  # standard library only, like this module

    pipeline.add_argument("--precision", choices=PRECISIONS, default="auto",
                          help="training's forward passes, as `slsg train --precision` (default auto)")
    pipeline.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto, as `slsg train --device` "
                          "(default cpu)")
    pipeline.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads")
    pipeline.add_argument("--json", action="store_true", help="print one JSON document on stdout (tables go to stderr)")

    padim = sub.add_parser("padim", help="PaDiM (Defard et al. 2020) with one of our ImageNet backbones, scored with "
                           "our metrics: a baseline beside `slsg evaluate`")
    padim.add_argument("--data", type=Path, required=True, help="data set root (MVTec AD or LOCO AD layout)")
    padim.add_argument("--category", required=True)
    padim.add_argument("--image-size", default="256", help="model input, '256' or 'WxH' (default 256, as `slsg train`)")
    padim.add_argument("--backbone", default="efficientnet_lite0", help="a registered backbone (default: the default "
                       "preset's efficientnet_lite0)")
    padim.add_argument("--backbone-weights", default="imagenet", help="'imagenet' or a state-dict file")
    padim.add_argument("--features", type=int, default=100, help="channels kept at random (paper: 100 for ResNet-18)")
    padim.add_argument("--seed", type=int, default=0, help="seed of the channel subset")
    padim.add_argument("--batch-size", type=int, default=8)
    padim.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads")
    padim.add_argument("--json", action="store_true", help="print one JSON document on stdout (tables go to stderr)")

    presets = sub.add_parser("presets", help="the default and paper presets trained and evaluated side by side: "
                             "GFLOP, training time, image AUROC, AU-sPRO")
    presets.add_argument("--data", type=Path, required=True, help="data set root (MVTec LOCO AD layout)")
    presets.add_argument("--category", required=True)
    presets.add_argument("--out", type=Path, required=True,
                         help="comparison folder: one run directory per preset and seed, comparison.json, "
                              "roc_presets.png; finished runs with the same settings are reused")
    presets.add_argument("--paper-weights", default="imagenet",
                         help="the paper preset's ResNet-18 ImageNet weights: torchvision's resnet18-f37072fd.pth "
                              "(default 'imagenet': torch.hub's cache, or the download with --allow-download); "
                              "not read once every paper run is finished")
    presets.add_argument("--allow-download", action="store_true", help="let the paper preset fetch its weights")
    presets.add_argument("--eval-data", type=Path, default=None,
                         help="data set root to evaluate on (default --data), e.g. a larger test set")
    presets.add_argument("--image-size", default="256", help="'256' or 'WxH'")
    presets.add_argument("--steps", type=int, default=900, help="detector training steps of each run")
    presets.add_argument("--pretrain-steps", type=int, default=200, help="generative pre-training steps of each run")
    presets.add_argument("--batch-size", type=int, default=4)
    presets.add_argument("--seeds", type=_seed_list, default=(0,), help="comma-separated (default 0)")
    presets.add_argument("--composition-steps", type=int, default=None,
                         help="the default preset's composition-check steps (default: the preset's)")
    presets.add_argument("--global-branch", action="store_true",
                         help="add the global check to the default preset (the paper preset stays the authors' model)")
    presets.add_argument("--workers", type=int, default=2)
    presets.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    presets.add_argument("--precision", choices=PRECISIONS, default="auto")
    presets.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads")
    presets.add_argument("--json", action="store_true", help="print one JSON document on stdout (tables go to stderr)")


def _model(args: argparse.Namespace):
    from slsg_bench.model import ModelBenchConfig, model_tables, run_model_bench, side_by_side_tables

    cfg = ModelBenchConfig(args.repository, args.name, args.version, args.checkpoint, args.threads, args.iterations,
                           args.warmup, args.batch_sizes, args.peak_size, args.against, args.thread_counts)
    return run_model_bench(cfg), side_by_side_tables if args.thread_counts else model_tables


def _gateway(args: argparse.Namespace):
    from slsg_bench.gateway import GatewayBenchConfig, gateway_tables, run_gateway_bench

    cfg = GatewayBenchConfig(args.repository, args.name, args.frame_size, args.concurrency, args.requests,
                             memory_requests=args.memory_requests, threads=args.threads, iterations=args.iterations,
                             separate_process=not args.in_process)
    return run_gateway_bench(cfg), gateway_tables


def _records(args: argparse.Namespace):
    from slsg_bench.records import RecordsBenchConfig, records_tables, run_records_bench

    cfg = RecordsBenchConfig(args.repository, args.name, args.frame_size, args.concurrency, args.requests,
                             args.rounds, threads=args.threads)
    return run_records_bench(cfg), records_tables


def _triton(args: argparse.Namespace):
    from slsg_bench.triton import TritonBenchConfig, run_triton_bench, triton_tables

    cfg = TritonBenchConfig(args.repository, args.name, args.threads, args.iterations, args.warmup, args.batch_sizes)
    return run_triton_bench(cfg), triton_tables


def _load(args: argparse.Namespace):
    from slsg_bench.load import LoadBenchConfig, load_tables, run_load_bench

    cfg = LoadBenchConfig(args.repository, args.name, args.users, args.duration, lines=args.lines,
                          cameras_per_line=args.cameras_per_line, fps=args.fps, frame_size=args.frame_size,
                          threads=args.threads, locustfile=args.locustfile)
    return run_load_bench(cfg), load_tables


def _pipeline(args: argparse.Namespace):
    import torch

    from slsg_bench.report import Table, environment
    from slsg_train.training.config import parse_image_size
    from slsg_bench.pipeline import benchmark_pipeline

    torch.set_num_threads(args.threads)
    result = benchmark_pipeline(args.data, args.category, parse_image_size(args.image_size), args.steps, args.warmup,
                                args.batch_size, args.workers, precision=args.precision,
                                device_name=args.device)
    report = {"benchmark": "pipeline", "environment": environment(args.threads), **result}

    def tables(r: dict) -> list[Table]:
        return [Table(f"training step on {r['device']}, {r['batch']} images at {r['image_size']} in {r['precision']}, "
                      f"{r['workers']} workers",
                      ["variant", "median step s", "ratio"],
                      [["pre-generated batches", r["step_s_pregenerated"], 1.0],
                       ["simulation in workers", r["step_s_live_simulation"], r["ratio"]]])]
    return report, tables


def _presets(args: argparse.Namespace):
    import torch

    from slsg_bench.report import environment
    from slsg_bench.presets import PresetComparison, compare_presets
    from slsg_train.training.config import parse_image_size

    if args.steps < 1 or args.pretrain_steps < 0 or args.batch_size < 1:
        raise ValueError("--steps and --batch-size must be >= 1 and --pretrain-steps >= 0")
    torch.set_num_threads(args.threads)
    default_model = {"global_branch": True} if args.global_branch else {}
    if args.composition_steps is not None:
        default_model["composition_steps"] = args.composition_steps
    spec = PresetComparison(args.data, args.category, args.out, paper_weights=args.paper_weights,
                            allow_download=args.allow_download, eval_data=args.eval_data,
                            image_size=parse_image_size(args.image_size), steps=args.steps,
                            pretrain_steps=args.pretrain_steps, batch_size=args.batch_size, seeds=args.seeds,
                            workers=args.workers, device=args.device, precision=args.precision,
                            default_model=default_model)
    with contextlib.redirect_stdout(sys.stderr):  # training's messages; stdout is the report's
        report = {"environment": environment(args.threads), **compare_presets(spec)}
    return report, _preset_tables


def _padim(args: argparse.Namespace):
    from slsg_bench.padim import PadimConfig, padim_tables, run_padim_bench
    from slsg_train.training.config import parse_image_size

    if args.batch_size < 1:
        raise ValueError("--batch-size must be >= 1")
    cfg = PadimConfig(args.data, args.category, parse_image_size(args.image_size), args.backbone,
                      args.backbone_weights, args.features, args.seed, args.batch_size, args.threads)
    return run_padim_bench(cfg), padim_tables


def _preset_tables(r: dict) -> list:
    from slsg_bench.report import Table

    runs = Table(f"{r['category']} at {r['image_size'][1]}x{r['image_size'][0]}, {r['pretrain_steps']} + "
                 f"{r['steps']} steps, evaluated on {r['eval_data']}",
                 ["preset", "seed", "backbone", "GFLOP/image", "train min", "AUROC logical", "AUROC structural",
                  "AU-sPRO@0.05 mean", "run"],
                 [[x["preset"], x["seed"], x["backbone"], x["gflop_per_image"], x["train_minutes"],
                   x["image_auroc"].get("logical"), x["image_auroc"].get("structural"), x["au_spro_0.05"].get("mean"),
                   x["training"]] for x in r["runs"]])
    tables = [runs]
    versus = r.get("default_vs_paper")
    if versus:
        gap, good = versus["image_auroc_default_minus_paper"], versus["at_least_as_good"]
        ci = versus.get("image_auroc_gap_ci95", {})
        tables.append(Table(f"default against paper (means over seeds; figure: {r['roc_figure']})",
                            ["measure", "value", "95% interval (test images)", "target met"],
                            [["GFLOP paper / default", versus["gflop_ratio_paper_over_default"], None,
                              versus["at_least_4x_cheaper"]],
                             *([f"AUROC {k}: default - paper", gap[k],
                                None if ci.get(k) is None else f"{ci[k][0]:+.3f} .. {ci[k][1]:+.3f}", good[k]]
                               for k in gap)]))
    return tables


BENCHMARKS = {"model": _model, "gateway": _gateway, "records": _records, "triton": _triton, "load": _load,
              "pipeline": _pipeline, "presets": _presets, "padim": _padim}


def run(args: argparse.Namespace) -> int:
    if args.threads < 1:
        print(f"slsg bench {args.bench}: --threads must be >= 1", file=sys.stderr)
        return 2
    try:
        report, tables = BENCHMARKS[args.bench](args)
    except ModuleNotFoundError as exc:
        print(f"slsg bench {args.bench}: cannot import {exc.name!r}; install the 'serve' (and for PyTorch eager "
              f"the 'train') extra", file=sys.stderr)
        return 2
    except (FileNotFoundError, ValueError, RuntimeError) as exc:
        print(f"slsg bench {args.bench}: {exc}", file=sys.stderr)
        return 2
    from slsg_bench.report import emit

    emit(report, tables(report), args.json)
    return 0
