"""Calibration: the image-score threshold for a target false-positive rate on normal images."""

from __future__ import annotations

import numpy as np
import torch

from slsg.contract import Calibration
from slsg_train.inference import predict


def split_for_calibration(category) -> tuple[list, list]:
    """(training images, calibration images) of a LocoCategory: validation/good when the data set has
    it, else the last tenth of train/good (at least 2), which training then never sees."""
    train, calib = list(category.train_paths), list(category.validation_paths)
    if not calib:
        n_hold = max(2, len(train) // 10)
        train, calib = train[:-n_hold], train[-n_hold:]
    return train, calib


def threshold_for_fpr(normal_scores: np.ndarray, target_fpr: float) -> float:
    """Smallest threshold t with (#normal scores >= t) / n <= target_fpr.

    With n scores at most floor(target_fpr * n) may reach the threshold, so t is just
    above the (floor(target_fpr * n) + 1)-th highest score.
    """
    if not 0 <= target_fpr < 1:
        raise ValueError(f"target false-positive rate {target_fpr} must be in [0, 1)")
    scores = np.sort(np.asarray(normal_scores, dtype=np.float64))[::-1]
    if scores.size == 0:
        raise ValueError("calibration needs at least one normal image")
    allowed = int(np.floor(target_fpr * scores.size))
    return float(np.nextafter(np.float32(scores[allowed]), np.float32(np.inf)))


def calibration_from_scores(normal_scores: np.ndarray, target_fpr: float) -> tuple[Calibration, dict]:
    scores = np.asarray(normal_scores, dtype=np.float64)
    thr = threshold_for_fpr(scores, target_fpr)
    stats = {"num_images": int(scores.size), "min": float(scores.min()), "max": float(scores.max()),
             "mean": float(scores.mean()), "std": float(scores.std())}
    cal = Calibration(raw_threshold=thr, score_min=float(scores.min()), score_max=1.0, target_fpr=target_fpr,
                      pixel_threshold=thr, num_images=int(scores.size))
    return cal, stats


@torch.no_grad()
def calibrate_threshold(model, images: list[np.ndarray], top_k: int, target_fpr: float,
                        device: torch.device | str = "cpu") -> tuple[Calibration, dict]:
    _, scores = predict(model, images, top_k, device)
    return calibration_from_scores(scores, target_fpr)


@torch.no_grad()
def fit_global_branch(model, train_images: list[np.ndarray], calib_images: list[np.ndarray], top_k: int,
                      device: torch.device | str = "cpu", batch_size: int = 16) -> dict:
    """Fit the model's global branch in closed form: the Gaussian of the training images' pooled
    features, then both scores' scales on the calibration images. Call before calibrating."""
    from slsg_train.training.dataset import to_tensor

    branch = model.global_branch
    branch.fitted.fill_(False)
    _, local = predict(model, calib_images, top_k, device)  # unfitted: the paper's local scores

    def batches(images: list[np.ndarray]):
        for i in range(0, len(images), batch_size):
            yield torch.stack([to_tensor(im) for im in images[i:i + batch_size]]).to(device)

    branch.fit_normal(torch.cat([branch.features(x) for x in batches(train_images)]).double().cpu().numpy())
    distances = torch.cat([branch(x) for x in batches(calib_images)]).double().cpu().numpy()
    branch.fit_scale(distances, local)
    return {"feature_dim": branch.dim, "train_images": len(train_images), "calibration_images": len(calib_images),
            "distance_mean": float(distances.mean()), "distance_std": float(distances.std())}
