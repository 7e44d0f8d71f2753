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

    python -m slsg_bench.fpr_diagnosis --checkpoint RUN/checkpoint.pt --pool-data POOL --sizes 20,60
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch


def component_scores(loaded, images: list[np.ndarray], batch_size: int = 16) -> dict:
    """Per image, everything the fused score is built from, before any scale is applied: SLSG's
    log-odds map, each map check's raw map at image size, each image check's raw score."""
    from slsg_train.models import image_score
    from slsg_train.models.patch_memory import resize_patches
    from slsg_train.models.reference import MAP
    from slsg_train.models.slsg import anomaly_log_odds
    from slsg_train.data.images import to_tensor

    model, k = loaded.model, loaded.top_k
    local: list[torch.Tensor] = []
    raw: dict[str, list[torch.Tensor]] = {check.name: [] for check in model.checks}
    with torch.no_grad():
        for i in range(0, len(images), batch_size):
            output = model(torch.stack([to_tensor(im) for im in images[i:i + batch_size]]))
            local.append(anomaly_log_odds(output.logits).float())
            size = tuple(local[-1].shape[-2:])
            for check in model.checks:
                r = output.checks[check.name]
                raw[check.name].append(resize_patches(r, size, check.centred_last).float() if check.kind == MAP
                                       else r.float())
    local_map = torch.cat(local)
    raws = {name: torch.cat(v) for name, v in raw.items()}
    return {"local_map": local_map, "local_score": image_score(torch.sigmoid(local_map), k), "raw": raws,
            "image_raw": {check.name: image_score(raws[check.name], k) if check.kind == MAP else raws[check.name]
                          for check in model.checks}}


def fused_log_odds(c: dict, checks: list, scale_idx: np.ndarray, top_k: int) -> torch.Tensor:
    """Every image's score log-odds with the checks' scales fitted on the images ``scale_idx``, as
    calibration fits them: map checks against SLSG's score, image checks against the map-fused one."""
    from slsg_train.models import image_score
    from slsg_train.models.reference import MAP, fitted_scale, local_log_odds
    from slsg_train.models.slsg import image_score_log_odds

    fused = c["local_map"]
    local = c["local_score"][scale_idx].numpy()
    for check in (ch for ch in checks if ch.kind == MAP):
        scale = fitted_scale(c["image_raw"][check.name][scale_idx].numpy(), local)
        fused = torch.maximum(fused, local_log_odds(c["raw"][check.name], scale.float(), check.weight))
    score = image_score_log_odds(fused, top_k)
    map_fused = image_score(torch.sigmoid(fused[scale_idx]), top_k).numpy()
    for check in (ch for ch in checks if ch.kind != MAP):
        scale = fitted_scale(c["raw"][check.name][scale_idx].numpy(), map_fused)
        score = torch.maximum(score, local_log_odds(c["raw"][check.name], scale.float(), check.weight))
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
    from slsg_train.data.images import load_resized
    from slsg_train.training.calibration import split_for_calibration

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
    data = args.data or loaded.checkpoint.data_root
    pool_category = LocoCategory(args.pool_data or data, loaded.category)
    pool_paths = list(pool_category.validation_paths)
    test_good = [s.path for s in pool_category.test_samples() if s.anomaly_type == "good"]
    pool_paths, test_good = pool_paths[:args.limit], test_good[:args.limit]
    category = LocoCategory(data, loaded.category)
    train_paths = split_for_calibration(  # the images it trained on
        category, held_out_train=loaded.checkpoint.held_out_train(category)).train
    size = loaded.image_size
    checks = loaded.model.checks
    images = load_resized(pool_paths + test_good + train_paths, size)
    comps = component_scores(loaded, images)
    n_pool, n_test = len(pool_paths), len(test_good)
    pool = np.arange(n_pool)
    test_idx = np.arange(n_pool, n_pool + n_test)
    train_idx = np.arange(n_pool + n_test, len(images))
    rng = np.random.default_rng(args.seed)
    report = {"checkpoint": args.checkpoint, "pool": n_pool, "test_good": n_test, "train": len(train_idx),
              "checks": [check.name for check in checks], "sizes": {}}
    for n in (int(v) for v in args.sizes.split(",")):
        promised, upper = 1 / (n + 1), beta_quantile(1, n, 0.9)
        rates: dict[str, list[float]] = {"same": [], "apart": [], "train": [], "same_on_test_good": [],
                                         "apart_on_test_good": [], "fixed_scale": []}
        fixed = fused_log_odds(comps, checks, pool, loaded.top_k)  # one scale for all: what apart tends to
        for _ in range(args.resamples):
            perm = rng.permutation(pool)
            cal, other, rest = perm[:n], perm[n:2 * n], perm[2 * n:]
            same = fused_log_odds(comps, checks, cal, loaded.top_k)
            apart = fused_log_odds(comps, checks, other, loaded.top_k)
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
