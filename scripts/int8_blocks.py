"""Which blocks of an exported SLSG graph survive INT8: quantize one block at a time (the rest float32)
and compare the image scores' log-odds with the float32 graph on normal images.

    python scripts/int8_blocks.py MODEL.onnx DATA_ROOT CATEGORY [--blocks encoder,decoder] [--ops Conv+MatMul+Relu]

Activation ranges come from the first 16 training images, the comparison from the last 20 (training
images: the float32 graph's own spread of normal scores is the yardstick). Prints per block the mean and
largest |log-odds difference|, the rank correlation of the scores, and the float32 spread.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np

from slsg_train.data.images import load_resized
from slsg_train.data.loco import LocoCategory
from slsg_train.export.int8 import BLOCKS, QUANTIZED_OPS, SCORE_TAIL, Int8Options, quantize_graph
from slsg_train.onnx_inference import OnnxModel


def _ranks(x: np.ndarray) -> np.ndarray:
    return np.argsort(np.argsort(x)).astype(np.float64)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model")
    p.add_argument("data")
    p.add_argument("category")
    p.add_argument("--blocks", default=",".join(BLOCKS), help="comma-separated blocks to try, one at a time")
    p.add_argument("--ops", default="+".join(QUANTIZED_OPS), help="operator types quantized, '+'-separated")
    args = p.parse_args()
    fp32 = OnnxModel(args.model)
    category = LocoCategory(args.data, args.category)
    train = load_resized(category.train_paths[:16], fp32.image_size, fp32.card.resize)
    normal = load_resized(category.train_paths[-20:], fp32.image_size, fp32.card.resize)
    reference = fp32.predict(normal).log_odds
    every = [*BLOCKS, SCORE_TAIL]
    with tempfile.TemporaryDirectory() as tmp:
        ranges = Path(tmp) / "ranges"  # the same activation ranges for every block
        for block in args.blocks.split(","):
            # the block alone: no partly quantized encoder, every MatMul output quantized as the block's is
            options = Int8Options(float_blocks=tuple(b for b in every if b != block), op_types=tuple(args.ops.split("+")),
                                  partial_blocks=(), float_output_ops=())
            out = Path(tmp) / f"{block}.onnx"
            count = quantize_graph(Path(args.model), out, train, options, ranges)
            quantized = OnnxModel(out).predict(normal).log_odds
            diff = np.abs(quantized - reference)
            rank = np.corrcoef(_ranks(reference), _ranks(quantized))[0, 1]
            print(f"{block:18s} nodes {count:3d}  |d log-odds| mean {diff.mean():.3f} max {diff.max():.3f}  "
                  f"rank corr {rank:.3f}  (float32 spread {reference.std():.3f})", flush=True)


if __name__ == "__main__":
    main()
