"""Why the false-alarm promise broke: resample calibrations of one trained checkpoint on a large pool
of held-out normal images and measure each one's true false-positive rate on the rest of the pool.

The pool is ``validation/good`` of ``--pool-data`` (default: the run's data set), none of it trained on:
either a run trained with a large validation split, or a second synthetic data set of the same
category (another seed: other images of the same kind). Its ``test/good`` is scored too, and the
run's own training images. Each component of the score (SLSG's map, the patch memory's distances, the
composition check's errors, the global distance) is computed once per image; the reference checks'
scales and the threshold are then refitted per resample exactly as calibration fits them, on:

- ``same``: the checks' scales and the threshold on the same n images (calibration before the fix);
- ``apart``: the scales on n other held-out images, the threshold on n (cross-fitted);
- ``train``: the scales apart, the threshold on n *training* images (scored by a model fitted on them).

For each it prints the mean observed rate against the promised (k + 1) / (n + 1), and the share of
resamples whose rate exceeds the promised 90 % bound (nominally 10 %). Also the rate on ``test/good``
for thresholds set on validation images, to see whether the two splits differ.

    python benchmarks/fpr_diagnosis.py --checkpoint RUN/checkpoint.pt --pool-data POOL --sizes 20,60
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch


def component_scores(loaded, images: list[np.ndarray], batch_size: int = 16) -> dict[str, torch.Tensor]:
    """Per image, everything the fused score is built from, before any scale is applied."""
    from slsg_train.models import image_score
    from slsg_train.models.patch_memory import resize_patches
    from slsg_train.models.slsg import anomaly_log_odds
    from slsg_train.training.dataset import to_tensor

    model, k = loaded.model, loaded.top_k
    out: dict[str, list[torch.Tensor]] = {"local_map": [], "patch_map": [], "comp_map": [], "global": []}
    with torch.no_grad():
        for i in range(0, len(images), batch_size):
            x = torch.stack([to_tensor(im) for im in images[i:i + batch_size]])
            o = model(x)
            local = anomaly_log_odds(o.logits).float()
            size = tuple(local.shape[-2:])
            out["local_map"].append(local)
            if o.patch_distance is not None:
                out["patch_map"].append(resize_patches(o.patch_distance, size).float())
            if o.composition_error is not None:
                out["comp_map"].append(resize_patches(o.composition_error, size).float())
            if o.global_distance is not None:
                out["global"].append(o.global_distance.float())
    result = {name: torch.cat(v) for name, v in out.items() if v}
    result["local_score"] = image_score(torch.sigmoid(result["local_map"]), k)
    for name in ("patch", "comp"):
        if f"{name}_map" in result:
            result[f"{name}_score"] = image_score(result[f"{name}_map"], k)
    return result


def fused_log_odds(c: dict[str, torch.Tensor], scale_idx: np.ndarray, top_k: int, weights: dict) -> torch.Tensor:
    """Every image's score log-odds with the checks' scales fitted on the images ``scale_idx``."""
    from slsg_train.models import image_score
    from slsg_train.models.reference import fitted_scale, local_log_odds
    from slsg_train.models.slsg import image_score_log_odds

    fused = c["local_map"]
    local = c["local_score"][scale_idx].numpy()
    for name in ("patch", "comp"):
        if f"{name}_map" in c:
            scale = fitted_scale(c[f"{name}_score"][scale_idx].numpy(), local)
            fused = torch.maximum(fused, local_log_odds(c[f"{name}_map"], scale.float(), weights[name]))
    score = image_score_log_odds(fused, top_k)
    if "global" in c:
        map_fused = image_score(torch.sigmoid(fused[scale_idx]), top_k).numpy()
        scale = fitted_scale(c["global"][scale_idx].numpy(), map_fused)
        score = torch.maximum(score, local_log_odds(c["global"], scale.float(), weights["global"]))
    return score.double()


def rate_above(scores: torch.Tensor, threshold_idx: np.ndarray, test_idx: np.ndarray) -> float:
    """The share of ``test_idx`` at or above a threshold just above the highest of ``threshold_idx``
    (k = 0: what calibration does below 99 images at a 1 % target)."""
    threshold = scores[threshold_idx].max()
    return float((scores[test_idx] > threshold).double().mean())


def main() -> None:
    from slsg.contract import beta_quantile
    from slsg_train.data.loco import LocoCategory
    from slsg_train.inference import load_model
    from slsg_train.training.calibration import legacy_held_out_train, split_for_calibration
    from slsg_train.training.dataset import load_resized

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--data", default=None, help="the run's data set (default: the checkpoint's)")
    p.add_argument("--pool-data", default=None, help="data set whose validation/good is the pool (default: --data)")
    p.add_argument("--sizes", default="20,60", help="calibration set sizes n")
    p.add_argument("--resamples", type=int, default=300)
    p.add_argument("--limit", type=int, default=None, help="at most this many pool (and test/good) images")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    torch.set_num_threads(2)
    loaded = load_model(args.checkpoint)
    data = args.data or loaded.payload["data_root"]
    pool_category = LocoCategory(args.pool_data or data, loaded.category)
    pool_paths = list(pool_category.validation_paths)
    test_good = [s.path for s in pool_category.test_samples() if s.anomaly_type == "good"]
    pool_paths, test_good = pool_paths[:args.limit], test_good[:args.limit]
    record = loaded.payload.get("calibration_split")
    category = LocoCategory(data, loaded.category)
    train_paths = split_for_calibration(category, held_out_train=record["held_out_train"] if record else
                                        legacy_held_out_train(category)).train  # the images it trained on
    size = loaded.image_size
    m = loaded.model
    weights = {"patch": getattr(m.patch_memory, "weight", 1.0), "comp": getattr(m.composition_check, "weight", 1.0),
               "global": getattr(m.global_branch, "weight", 1.0)}
    images = load_resized(pool_paths + test_good + train_paths, size)
    comps = component_scores(loaded, images)
    n_pool, n_test = len(pool_paths), len(test_good)
    pool = np.arange(n_pool)
    test_idx = np.arange(n_pool, n_pool + n_test)
    train_idx = np.arange(n_pool + n_test, len(images))
    rng = np.random.default_rng(args.seed)
    report = {"checkpoint": args.checkpoint, "pool": n_pool, "test_good": n_test, "train": len(train_idx),
              "checks": sorted(k for k in comps if k.endswith("_map") or k == "global"), "sizes": {}}
    for n in (int(v) for v in args.sizes.split(",")):
        promised, upper = 1 / (n + 1), beta_quantile(1, n, 0.9)
        rates: dict[str, list[float]] = {"same": [], "apart": [], "train": [], "same_on_test_good": [],
                                         "apart_on_test_good": [], "fixed_scale": []}
        fixed = fused_log_odds(comps, pool, loaded.top_k, weights)  # one scale for all: what apart tends to
        for _ in range(args.resamples):
            perm = rng.permutation(pool)
            cal, other, rest = perm[:n], perm[n:2 * n], perm[2 * n:]
            same = fused_log_odds(comps, cal, loaded.top_k, weights)
            apart = fused_log_odds(comps, other, loaded.top_k, weights)
            rates["same"].append(rate_above(same, cal, rest))
            rates["apart"].append(rate_above(apart, cal, rest))
            rates["fixed_scale"].append(rate_above(fixed, cal, rest))
            rates["same_on_test_good"].append(rate_above(same, cal, test_idx))
            rates["apart_on_test_good"].append(rate_above(apart, cal, test_idx))
            if len(train_idx) >= n:
                rates["train"].append(rate_above(apart, rng.choice(train_idx, n, replace=False), rest))
        report["sizes"][n] = {"promised": promised, "upper_90": upper, **{
            name: {"mean_rate": float(np.mean(v)), "share_above_upper_90": float(np.mean(np.asarray(v) > upper))}
            for name, v in rates.items() if v}}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
