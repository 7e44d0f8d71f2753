"""Are a run's threshold images drawn like its good test images? The promise assumes they are.

For each run (a directory with checkpoint.pt and the ``eval/scores.json`` of ``slsg evaluate``), the
threshold images of its calibration split are scored again and each is placed among the good test
images' scores (its percentile). Under exchangeability the percentiles are uniform: their mean is 0.5
(sd 1 / sqrt(12 n)), for the validation images and the held-out training images alike. Also printed:
how the rescored threshold images compare with the scores calibration logged (the threshold and
``slsg evaluate`` must score an image identically), and the highest threshold image's percentile
(the threshold sits just above it) and how many lie at or above the good test images' 90th
and 95th percentiles (a tenth and a twentieth of them if the upper tails match, which the promise
depends on).

    python -m slsg_bench.fpr_exchangeability runs/fpr_bench/cable_s3:runs/fpr_bench/data_s3 ...
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np


def percentiles(scores: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Each score's percentile among ``reference``: the share of reference scores strictly below it."""
    ref = np.sort(np.asarray(reference, dtype=np.float64))
    if ref.size == 0:
        raise ValueError("no reference scores")
    return np.searchsorted(ref, np.asarray(scores, dtype=np.float64), side="left") / ref.size


def run_report(run_dir: Path, data: Path) -> dict:
    """The threshold images' percentiles among the run's good test images."""
    from slsg_train.data.images import load_resized
    from slsg_train.data.loco import GOOD, LocoCategory
    from slsg_train.inference import load_model, predict
    from slsg_train.training.calibration import split_for_calibration

    loaded = load_model(run_dir / "checkpoint.pt")
    record = loaded.checkpoint.calibration_split
    if record is None:
        raise SystemExit(f"{run_dir}: no calibration split recorded (a run from before the split)")
    split = split_for_calibration(LocoCategory(data, loaded.category), held_out_train=record["held_out_train"])
    scores = predict(loaded.model, load_resized(split.threshold, loaded.image_size, loaded.resize), loaded.top_k).scores
    good = [d["score"] for d in json.loads((run_dir / "eval" / "scores.json").read_text()) if d["type"] == GOOD]
    pct = percentiles(scores, np.asarray(good))
    from_validation = np.array(["validation" in p.parts for p in split.threshold])
    logged = loaded.checkpoint.calibration_stats
    return {"run": run_dir.name, "threshold_images": int(pct.size), "good_test": len(good),
            "mean_percentile": float(pct.mean()), "sd_if_exchangeable": 1 / math.sqrt(12 * pct.size),
            "validation_mean": float(pct[from_validation].mean()) if from_validation.any() else None,
            "held_out_train_mean": float(pct[~from_validation].mean()) if (~from_validation).any() else None,
            "max_percentile": float(pct.max()), "above_90th": int((pct >= 0.9).sum()),
            "above_95th": int((pct >= 0.95).sum()),
            "rescored_max_minus_logged": float(scores.max()) - logged["max"] if "max" in logged else None}


def main() -> None:
    import torch

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", help="RUN_DIR:DATA_ROOT pairs")
    args = p.parse_args()
    torch.set_num_threads(2)
    for item in args.runs:
        run_dir, _, data = item.partition(":")
        if not data:
            raise SystemExit(f"{item}: expected RUN_DIR:DATA_ROOT")
        print(json.dumps(run_report(Path(run_dir), Path(data))), flush=True)


if __name__ == "__main__":
    main()
