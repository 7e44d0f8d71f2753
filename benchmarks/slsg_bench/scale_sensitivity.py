"""How much a trained run's image AUROC depends on the normal images its reference checks' scales were
fitted on. Every component of the fused score (SLSG's map, each check's raw score) is computed once per
image; the checks' scales are then refitted, as calibration fits them, on different sets of normal
images never trained on, and the test set's image AUROC is recomputed for each:

- ``held_out``: all of the run's held-out normal images (its scale and threshold images together);
- ``scale_part``: the run's scale images alone (what calibration uses today);
- ``subsets of m``: random m of the held-out images, ``--resamples`` times (the spread of AUROC that
  the choice of m images alone makes);
- ``with_test_good``: the held-out images and the test set's good images (an upper bound of what more
  normal images could do: it peeks at the test set, so it is no calibration anyone could ship).

Also each component scored alone (``alone``: SLSG's own map, each check's raw image score), which needs
no scale. A map check can also be left out of the fusion (``--without``), as ``slsg checks`` would switch
it off.

    python -m slsg_bench.scale_sensitivity --checkpoint runs/bottle128/checkpoint.pt --data /work/data
"""

from __future__ import annotations

import argparse
import json

import numpy as np


def auroc_with_scales(comps: dict, checks: list, scale_idx: np.ndarray, test_idx: np.ndarray,
                      types: list[str], top_k: int) -> dict[str, float]:
    """Image AUROC by type on ``test_idx`` with the checks' scales fitted on ``scale_idx``."""
    from slsg_bench.fpr_diagnosis import fused_log_odds
    from slsg_train.metrics.roc import image_auroc_by_type

    scores = fused_log_odds(comps, checks, scale_idx, top_k).numpy()[test_idx]
    return {key: round(value, 4) for key, value in image_auroc_by_type(scores, types).items()}


def subset_spread(results: list[dict[str, float]], key: str | None = None) -> dict[str, float]:
    """Mean, min and the share at 1.0 of one AUROC key over resampled scale sets (default: ``all`` for
    MVTec AD types, ``mean`` for LOCO's logical/structural)."""
    key = key or ("all" if all("all" in r for r in results) else "mean")
    values = np.array([r[key] for r in results], dtype=np.float64)
    if values.size == 0:
        raise ValueError("no resamples")
    return {"mean": float(values.mean()), "min": float(values.min()), "share_perfect": float((values >= 1.0).mean())}


def main() -> None:
    import torch

    from slsg_bench.fpr_diagnosis import component_scores
    from slsg_train.data.images import load_resized
    from slsg_train.data.loco import GOOD, LocoCategory
    from slsg_train.inference import load_model
    from slsg_train.training.calibration import split_for_calibration

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--data", default=None, help="the run's data set root (default: the checkpoint's)")
    p.add_argument("--sizes", default="7,14,20", help="scale set sizes m to resample")
    p.add_argument("--resamples", type=int, default=200)
    p.add_argument("--without", default="", help="comma-separated checks to leave out of the fusion")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    torch.set_num_threads(2)
    loaded = load_model(args.checkpoint)
    category = LocoCategory(args.data or loaded.checkpoint.data_root, loaded.category)
    split = split_for_calibration(category, held_out_train=loaded.checkpoint.held_out_train(category))
    samples = category.test_samples()
    held = split.scale + split.threshold
    paths = held + [s.path for s in samples]
    comps = component_scores(loaded, load_resized(paths, loaded.image_size, loaded.resize))
    left_out = {name for name in args.without.split(",") if name}
    checks = [check for check in loaded.model.checks if check.name not in left_out]
    n_held = len(held)
    held_idx, test_idx = np.arange(n_held), np.arange(n_held, len(paths))
    types = [s.anomaly_type for s in samples]
    good_idx = test_idx[[t == GOOD for t in types]]
    scale_part = np.arange(len(split.scale))  # held lists the scale images first
    report: dict = {"checkpoint": args.checkpoint, "held_out": n_held, "scale_images": len(split.scale),
                    "checks": [c.name for c in checks], "left_out": sorted(left_out),
                    "held_out_all": auroc_with_scales(comps, checks, held_idx, test_idx, types, loaded.top_k),
                    "scale_part": auroc_with_scales(comps, checks, scale_part, test_idx, types, loaded.top_k),
                    "with_test_good": auroc_with_scales(comps, checks, np.concatenate([held_idx, good_idx]),
                                                        test_idx, types, loaded.top_k), "subsets": {}}
    from slsg_train.metrics.roc import image_auroc_by_type

    alone = {"slsg": comps["local_score"], **comps["image_raw"]}
    report["alone"] = {name: {key: round(value, 4) for key, value in
                              image_auroc_by_type(score.double().numpy()[test_idx], types).items()}
                       for name, score in alone.items()}
    rng = np.random.default_rng(args.seed)
    for m in (int(v) for v in args.sizes.split(",") if v):
        if m > n_held:
            continue
        runs = [auroc_with_scales(comps, checks, rng.choice(held_idx, m, replace=False), test_idx, types,
                                  loaded.top_k) for _ in range(args.resamples)]
        report["subsets"][m] = subset_spread(runs)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
