"""Compare INT8 quantization variants of an exported SLSG graph with its float32 graph: score changes on
normal images, test-set AUROC and decisions, and throughput, side by side.

    python scripts/int8_variants.py MODEL.onnx DATA_ROOT CATEGORY [--variants default,v2] [--threads 1]
    python scripts/int8_variants.py MODEL.onnx - - --time A.onnx,B.onnx [--rounds 8]

Each variant is the export's INT8 settings (:class:`Int8Options`), now or before the encoders and the patch
memory were quantized ("v2"), with one thing changed (see VARIANTS).
Activation ranges come from the first 16 training images; the yardstick is the last 20 training images
(mean and largest |log-odds change|, rank correlation with float32, against the float32 spread) and the
test set (image AUROC, and decisions changed when each graph's threshold is set at the same quantile of
the 20 normal images' scores). Throughput: the float32 graph and every variant, interleaved rounds of one
batch, median images/s and images per CPU-second, and their ratios to float32. Variant graphs are left in
--keep when given.
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from slsg_train.data.images import load_resized
from slsg_train.data.loco import LocoCategory
from slsg_train.export.int8 import FLOAT_BLOCKS, PARTIAL_FLOAT, Int8Options, quantize_graph
from slsg_train.onnx_inference import OnnxModel

ENCODERS = ("encoder", "reference_encoder")
_DEFAULT = Int8Options()
# the earlier default: both encoders and the patch memory float32
_V2 = Int8Options(float_blocks=(*FLOAT_BLOCKS, "patch_memory"), partial_blocks=(), float_output_ops=())
_NO_MEMORY = FLOAT_BLOCKS
_NO_CLIP = ("Conv", "MatMul", "Relu")  # ReLU6 not quantized: not folded into the convolution before it
_PW = {"partial_depthwise": False}  # point-wise convolutions alone
# name -> the Int8Options of that variant
VARIANTS: dict[str, Int8Options] = {
    "default": _DEFAULT,
    "v2": _V2,
    "pw-encoder-noclip": dataclasses.replace(_V2, partial_blocks=("encoder",), op_types=_NO_CLIP, **_PW),
    "pw-reference-noclip": dataclasses.replace(_V2, partial_blocks=("reference_encoder",), op_types=_NO_CLIP, **_PW),
    "pw-both-noclip": dataclasses.replace(_V2, partial_blocks=ENCODERS, op_types=_NO_CLIP, **_PW),
    "pw-both": dataclasses.replace(_V2, partial_blocks=ENCODERS, **_PW),
    "expand-both": dataclasses.replace(_V2, partial_blocks=ENCODERS, partial_float=(*PARTIAL_FLOAT, "_project_conv"),
                                       **_PW),
    "blocks-both": dataclasses.replace(_V2, partial_blocks=ENCODERS),
    "blocks-reference": dataclasses.replace(_V2, partial_blocks=("reference_encoder",)),
    "blocks-encoder": dataclasses.replace(_V2, partial_blocks=("encoder",)),
    "blocks-reference-tensor": dataclasses.replace(_V2, partial_blocks=("reference_encoder",), per_channel=False),
    "blocks-encoder-percentile": dataclasses.replace(_V2, partial_blocks=("encoder",), calibration="percentile"),
    "memory": dataclasses.replace(_V2, float_blocks=_NO_MEMORY),
    "memory-float-out": dataclasses.replace(_V2, float_blocks=_NO_MEMORY, float_output_ops=("MatMul",)),
    "encoders": dataclasses.replace(_V2, float_blocks=tuple(b for b in _V2.float_blocks if b not in ENCODERS)),
    "default+encoder": dataclasses.replace(_DEFAULT, partial_blocks=ENCODERS),
    "default-entropy": dataclasses.replace(_DEFAULT, calibration="entropy"),
    "default-percentile": dataclasses.replace(_DEFAULT, calibration="percentile"),
}


def _ranks(x: np.ndarray) -> np.ndarray:
    return np.argsort(np.argsort(x)).astype(np.float64)


def auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Image AUROC (ties count half)."""
    pos, neg = scores[labels], scores[~labels]
    if not len(pos) or not len(neg):
        return float("nan")
    greater = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return float(greater / (len(pos) * len(neg)))


def quality(log_odds: np.ndarray, reference: np.ndarray, test: np.ndarray, test_ref: np.ndarray,
            labels: np.ndarray, quantile: float) -> str:
    """One line: normal-image score changes and rank correlation; test AUROC and decisions changed."""
    diff = np.abs(log_odds - reference)
    rank = np.corrcoef(_ranks(reference), _ranks(log_odds))[0, 1]
    changed = ((test >= np.quantile(log_odds, quantile)) != (test_ref >= np.quantile(reference, quantile))).sum()
    return (f"|d log-odds| mean {diff.mean():.3f} max {diff.max():.3f}  rank corr {rank:.3f}  "
            f"test AUROC {auroc(test, labels):.4f}  decisions changed {changed}/{len(test)}")


def throughput(paths: dict[str, Path], size: tuple[int, int], threads: int, batch: int, rounds: int
               ) -> dict[str, tuple[float, float]]:
    """{graph: (images/s, images per CPU-second)}: medians over interleaved rounds of one batch (random
    frames). CPU time (the process's) is what a graph costs even on a machine other jobs share."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3  # the optimiser's notes on initializers the folded activations left unused
    sessions = {name: ort.InferenceSession(str(p), options, providers=["CPUExecutionProvider"])
                for name, p in paths.items()}
    frames = np.random.default_rng(0).integers(0, 256, (batch, *size, 3), dtype=np.uint8)
    wall: dict[str, list[float]] = {name: [] for name in sessions}
    cpu: dict[str, list[float]] = {name: [] for name in sessions}
    for session in sessions.values():
        session.run(None, {"image": frames})
    for _ in range(rounds):
        for name, session in sessions.items():
            start, start_cpu = time.perf_counter(), time.process_time()
            session.run(None, {"image": frames})
            wall[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)
    return {name: (batch / float(np.median(wall[name])), batch / float(np.median(cpu[name]))) for name in sessions}


def report_speed(speed: dict[str, tuple[float, float]], threads: int, batch: int) -> None:
    base, base_cpu = speed["fp32"]
    for name, (rate, per_cpu) in speed.items():
        print(f"{name:28s} {rate:6.2f} images/s  x{rate / base:.2f} float32; {per_cpu:6.2f} images/CPU-s "
              f"x{per_cpu / base_cpu:.2f} ({threads} thread(s), batch {batch})", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model")
    p.add_argument("data")
    p.add_argument("category")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {', '.join(VARIANTS)}")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--rounds", type=int, default=5, help="timed rounds (0: no timing)")
    p.add_argument("--quantile", type=float, default=0.9, help="where on the normal scores each threshold is set")
    p.add_argument("--keep", default=None, help="folder to keep the variant graphs in")
    p.add_argument("--time", default=None, metavar="GRAPHS",
                   help="comma-separated ONNX files: only time these against MODEL (no quantizing, no data read)")
    args = p.parse_args()
    if args.time:
        paths = {"fp32": Path(args.model), **{Path(g).stem if Path(g).stem != "model" else str(g): Path(g)
                                               for g in args.time.split(",")}}
        report_speed(throughput(paths, OnnxModel(args.model).image_size, args.threads, args.batch, args.rounds),
                     args.threads, args.batch)
        return
    names = args.variants.split(",")
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        p.error(f"unknown variant(s) {unknown}: {', '.join(VARIANTS)}")
    fp32 = OnnxModel(args.model)
    category = LocoCategory(args.data, args.category)
    size, resize = fp32.image_size, fp32.card.resize
    train = load_resized(category.train_paths[:16], size, resize)
    normal = load_resized(category.train_paths[-20:], size, resize)
    samples = category.test_samples()
    labels = np.array([s.is_anomalous for s in samples])
    test_frames = load_resized([s.path for s in samples], size, resize)
    reference, test_ref = fp32.predict(normal).log_odds, fp32.predict(test_frames).log_odds
    print(f"float32: normal spread (std of log-odds) {reference.std():.3f}, test AUROC {auroc(test_ref, labels):.4f}",
          flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        out_dir = Path(args.keep) if args.keep else Path(tmp)
        out_dir.mkdir(parents=True, exist_ok=True)
        paths = {"fp32": Path(args.model)}
        for name in names:
            options = VARIANTS[name]
            out = out_dir / f"{name}.onnx"
            # the same ranges for every variant of a method and operator set
            ranges = Path(tmp) / f"ranges-{options.calibration}-{'+'.join(options.op_types or ('all',))}"
            count = quantize_graph(Path(args.model), out, train, options, ranges)
            model = OnnxModel(out)
            line = quality(model.predict(normal).log_odds, reference, model.predict(test_frames).log_odds, test_ref,
                           labels, args.quantile)
            print(f"{name:20s} nodes {count:3d}  {line}", flush=True)
            paths[name] = out
        if args.rounds:
            report_speed(throughput(paths, size, args.threads, args.batch, args.rounds), args.threads, args.batch)


if __name__ == "__main__":
    main()
