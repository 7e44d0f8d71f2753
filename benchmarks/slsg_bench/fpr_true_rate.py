"""Is the false-alarm promise biased? Each trained run's threshold against many fresh normal images.

A run's observed rate on its own ``test/good`` mixes two kinds of noise: which normal images happened to
calibrate it (the promise accounts for that: the true rate p is Beta(k + 1, n - k) distributed) and
which few test images it met (200 or fewer: binomial noise on top). This scores every run's fixed
threshold on a large pool of fresh normal images of the same category (``validation/good`` and
``test/good`` of ``--pool-data``, a data set none of the runs trained or calibrated on), so p is read
almost without the second noise, and asks whether the p's of several runs look like draws from their
promised Beta distributions:

- ``pit``: the promised Beta's CDF at each run's true rate; a fair promise makes it uniform on [0, 1]
  over runs (mean 0.5, one run in ten above 0.9);
- ``mean_pit_z``: the z-score of the runs' mean PIT against 0.5 (sd 1 / sqrt(12 m)); well above 2
  is a bias towards more false alarms than promised, well below -2 a cautious promise.

    python -m slsg_bench.fpr_true_rate --pool-data runs/pool_cable --checkpoints runs/fpr_bench/cable_s*/checkpoint.pt
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np


def beta_cdf(x: float, a: int, b: int) -> float:
    """P(Beta(a, b) <= x) for whole a, b >= 1: the binomial tail P(Binomial(a + b - 1, x) >= a)."""
    if a < 1 or b < 1:
        raise ValueError(f"need whole a, b >= 1, got a={a}, b={b}")
    if x <= 0:
        return 0.0
    if x >= 1:
        return 1.0
    n = a + b - 1
    below = sum(math.exp(math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1)
                         + i * math.log(x) + (n - i) * math.log1p(-x)) for i in range(a))
    return min(max(1.0 - below, 0.0), 1.0)


def promise_pit(true_rate: float, exceedances: int, threshold_images: int) -> float:
    """Where ``true_rate`` falls in the promised distribution of a threshold with ``exceedances`` (k) of
    ``threshold_images`` (n) calibration images at or above it: the CDF of Beta(k + 1, n - k)."""
    if not 0 <= exceedances < threshold_images:
        raise ValueError(f"need 0 <= k < n, got k={exceedances}, n={threshold_images}")
    return beta_cdf(true_rate, exceedances + 1, threshold_images - exceedances)


def summarise(rows: list[dict]) -> dict:
    """Pooled figures over runs (each row: ``true_rate``, ``expected_fpr``, ``fpr_upper_90``, ``pit``)."""
    if not rows:
        raise ValueError("no runs to summarise")
    m = len(rows)
    pits = np.array([r["pit"] for r in rows], dtype=np.float64)
    return {"runs": m, "mean_true_rate": float(np.mean([r["true_rate"] for r in rows])),
            "mean_promised": float(np.mean([r["expected_fpr"] for r in rows])),
            "above_upper_90": int(sum(r["true_rate"] > r["fpr_upper_90"] for r in rows)),
            "mean_pit": float(pits.mean()), "mean_pit_z": float((pits.mean() - 0.5) * math.sqrt(12 * m))}


def run_row(checkpoint: Path, pool_data: Path | None, limit: int | None) -> dict:
    """One run's threshold scored on the pool, the way ``slsg evaluate`` compares (float32, at or above)."""
    from slsg.contract import calibration_exceedances
    from slsg_train.data.images import load_resized
    from slsg_train.data.loco import LocoCategory
    from slsg_train.inference import load_model, predict

    loaded = load_model(checkpoint)
    cal = loaded.calibration
    if cal is None:
        raise SystemExit(f"{checkpoint}: not calibrated")
    category = LocoCategory(pool_data or loaded.checkpoint.data_root, loaded.category)
    pool = list(category.validation_paths) + [s.path for s in category.test_samples() if s.anomaly_type == "good"]
    pool = pool[:limit]
    scores = predict(loaded.model, load_resized(pool, loaded.image_size, loaded.resize), loaded.top_k).scores
    flagged = int((scores.astype(np.float32) >= np.float32(cal.raw_threshold)).sum())
    k, n = calibration_exceedances(cal.target_fpr, cal.num_images), cal.num_images
    rate = flagged / len(pool)
    return {"checkpoint": str(checkpoint), "pool": len(pool), "flagged": flagged, "true_rate": rate,
            "threshold_images": n, "scale_images": cal.scale_images, "expected_fpr": cal.expected_fpr(),
            "fpr_upper_90": cal.fpr_upper(0.9), "pit": promise_pit(rate, k, n)}


def main() -> None:
    import torch

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoints", nargs="+", type=Path, required=True)
    p.add_argument("--pool-data", type=Path, default=None,
                   help="data set root whose validation/good and test/good are the pool (default: each run's)")
    p.add_argument("--limit", type=int, default=None, help="at most this many pool images")
    args = p.parse_args()
    torch.set_num_threads(2)
    rows = []
    print("| run | threshold + scale images | promised | 90 % bound | fresh normal images flagged | PIT |\n"
          "|---|---|---|---|---|---|", flush=True)
    for checkpoint in args.checkpoints:
        r = run_row(checkpoint, args.pool_data, args.limit)
        rows.append(r)
        print(f"| {checkpoint.parent.name} | {r['threshold_images']} + {r['scale_images']} | "
              f"{100 * r['expected_fpr']:.1f} % | {100 * r['fpr_upper_90']:.1f} % | {r['flagged']} / {r['pool']} "
              f"({100 * r['true_rate']:.1f} %) | {r['pit']:.2f} |", flush=True)
    print(json.dumps({"summary": summarise(rows), "runs": rows}, indent=2))


if __name__ == "__main__":
    main()
