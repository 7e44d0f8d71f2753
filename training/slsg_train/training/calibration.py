"""Calibration: the image-score threshold for a target false-positive rate on normal images."""

from __future__ import annotations

import numpy as np
import torch

from slsg.contract import Calibration, calibration_exceedances, images_for_fpr
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
    """The threshold for a target false-positive rate: just above the (k + 1)-th highest normal score,
    k = :func:`calibration_exceedances` (the target met on average over new normal images; with too
    few scores for that, just above the highest)."""
    scores = np.sort(np.asarray(normal_scores, dtype=np.float64))[::-1]
    if scores.size == 0:
        raise ValueError("calibration needs at least one normal image")
    allowed = calibration_exceedances(target_fpr, scores.size)
    return float(np.nextafter(np.float32(scores[allowed]), np.float32(np.inf)))


def small_calibration_warning(cal: Calibration) -> str | None:
    """What to tell the user when the calibration images were too few to meet the target rate."""
    expected = cal.expected_fpr()
    if expected is None or cal.target_fpr <= 0 or expected <= cal.target_fpr + 1e-12:
        return None
    return (f"{cal.num_images} normal calibration images cannot pin a {cal.target_fpr:.2%} false-positive rate: "
            f"the threshold is above all of them, and a new normal image still reaches it {expected:.2%} of the "
            f"time on average. Give at least {images_for_fpr(cal.target_fpr)} normal images in validation/good "
            f"(without that split, train/good's last tenth is used), or accept the higher rate.")


def calibration_from_scores(normal_scores: np.ndarray, target_fpr: float) -> tuple[Calibration, dict]:
    scores = np.asarray(normal_scores, dtype=np.float64)
    thr = threshold_for_fpr(scores, target_fpr)
    cal = Calibration(raw_threshold=thr, score_min=float(scores.min()), score_max=1.0, target_fpr=target_fpr,
                      pixel_threshold=thr, num_images=int(scores.size), score_median=float(np.median(scores)))
    stats = {"num_images": int(scores.size), "min": float(scores.min()), "max": float(scores.max()),
             "mean": float(scores.mean()), "std": float(scores.std()), "expected_fpr": cal.expected_fpr(),
             "fpr_upper_90": cal.fpr_upper(0.9),
             "at_or_above_threshold": int((scores.astype(np.float32) >= np.float32(thr)).sum())}
    return cal, stats


@torch.no_grad()
def calibrate_threshold(model, images: list[np.ndarray], top_k: int, target_fpr: float,
                        device: torch.device | str = "cpu") -> tuple[Calibration, dict]:
    scores = predict(model, images, top_k, device).scores
    return calibration_from_scores(scores, target_fpr)


@torch.no_grad()
def fit_checks(model, train_images: list[np.ndarray], calib_images: list[np.ndarray], top_k: int,
               device: torch.device | str = "cpu", batch_size: int = 16, seed: int = 0, progress: bool = True,
               keep_trained: bool = False, simulation=None, precision: str = "fp32") -> dict:
    """Fit the model's reference checks (``model.checks``); call before calibrating.

    One reference-encoder pass over the training images collects what every check needs, and each
    check fits itself from that (the patch memory its coreset, the global branch its Gaussian, the
    composition check trains its autoencoder: the only one with training steps). One pass over the
    calibration images gives their raw image scores, and each check's scale is fitted against the
    local score it is combined with: map checks against the paper's, image checks against the
    map-fused one. ``keep_trained`` keeps a trained check's learnt weights (the composition check's
    autoencoder) and refits the rest. ``simulation`` (the run's ``SimulationConfig``; default settings
    when None) makes the logical anomalies the composition check learns to undo; ``precision`` (a
    resolved one) is what its training forward passes run in; every fit and score is float32.
    """
    from slsg_train.models.reference import IMAGE, MAP, FitContext
    from slsg_train.training.dataset import to_tensor

    encoder, checks = model.reference_encoder, model.checks
    if encoder is None or not checks:
        return {}
    for check in checks:
        check.fitted.fill_(False)
    was_training = model.training
    model.eval()

    def reference_maps(images: list[np.ndarray]):  # (normalised batch, its reference maps)
        for i in range(0, len(images), batch_size):
            x = torch.stack([to_tensor(im) for im in images[i:i + batch_size]]).to(device)
            yield x, encoder(x)

    collected: dict[str, list] = {check.name: [] for check in checks}
    for x, maps in reference_maps(train_images):
        for check in checks:
            collected[check.name].append(check.collect(x, maps))
    context = FitContext(train_images, seed, progress, simulation, precision, keep_trained)
    report: dict = {"train_images": len(train_images), "calibration_images": len(calib_images)}
    for check in checks:
        report[check.name] = check.fit(collected.pop(check.name), context)

    size, raw = calib_images[0].shape[:2], {check.name: [] for check in checks}
    for x, maps in reference_maps(calib_images):
        for check in checks:
            raw[check.name].append(check.image_raw(check(x, maps), size, top_k).double().cpu())
    # predict fuses the checks fitted so far: none for the map checks, the map checks for image checks
    for kind in (MAP, IMAGE):
        of_kind = [check for check in checks if check.kind == kind]
        if of_kind:
            local = predict(model, calib_images, top_k, device).scores
        for check in of_kind:
            check.fit_scale(torch.cat(raw[check.name]).numpy(), local)
            report[check.name].update(check.scale_report())
    model.train(was_training)
    return report
