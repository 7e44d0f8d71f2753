"""Calibration: the image-score threshold for a target false-positive rate on normal images.

The threshold is split-conformal: a new normal image's score ranks anywhere among the calibration
images' scores with equal chance, so the rate it promises holds only if those images are scored
exactly as new ones are. Two things broke that, and the split below keeps them apart:

- every model fitted on the training images scores them low (SLSG, the patch memory's coreset, the
  composition check's autoencoder), so calibration images are held out of training;
- the reference checks' scales are fitted on held-out normal images as well; fitted on the threshold's
  own images, they make those images look more alike than new ones (each check's spread is measured
  on them), and new images pass the threshold more often than promised. So the held-out images are
  cross-fitted: a third set the checks' scales, the rest the threshold.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from slsg.contract import Calibration, calibration_exceedances, images_for_fpr
from slsg_train.inference import predict
from slsg_train.training.config import CALIBRATION_HOLDOUT

SCALE_SHARE = 1 / 3  # of the held-out normal images, the part that fits the reference checks' scales
MIN_SCALE_IMAGES = 2  # a mean and a standard deviation


@dataclass(frozen=True)
class CalibrationSplit:
    """Which normal images fit what: ``train`` SLSG and the checks' models, ``scale`` the reference
    checks' scales, ``threshold`` the threshold alone. ``scale`` and ``threshold`` are disjoint and
    never trained on; they are validation/good followed by the last ``held_out_train`` images of
    train/good, interleaved so both parts draw on both sources."""

    train: list[Path]
    scale: list[Path]
    threshold: list[Path]
    held_out_train: int

    def summary(self) -> dict[str, int]:
        return {"train_images": len(self.train), "scale_images": len(self.scale),
                "threshold_images": len(self.threshold), "held_out_train": self.held_out_train}


def holdout_for_calibration(num_train: int, num_validation: int, target_fpr: float, has_checks: bool,
                            max_share: float = CALIBRATION_HOLDOUT) -> int:
    """How many train/good images to hold out: as many as the threshold needs to meet ``target_fpr``
    (:func:`images_for_fpr` threshold images, plus the scale images), beyond what validation/good has,
    at most ``max_share`` of train/good; and in any case enough for one threshold image (and two scale
    images with reference checks)."""
    if not 0 <= max_share < 1:
        raise ValueError(f"the share of train/good held out for calibration must be in [0, 1), got {max_share}")
    wanted = images_for_fpr(target_fpr) if target_fpr > 0 else 1
    if has_checks:
        wanted = math.ceil(wanted / (1 - SCALE_SHARE))
    minimum = (MIN_SCALE_IMAGES + 1) if has_checks else 1
    held = min(max(wanted - num_validation, 0), math.floor(max_share * num_train))
    held = max(held, minimum - num_validation, 0)
    if num_train - held < 1:
        raise ValueError(f"{num_train} training and {num_validation} validation images are too few: calibration "
                         f"needs {minimum} normal images held out of training and training at least one")
    return held


def split_for_calibration(category, target_fpr: float = 0.01, has_checks: bool = True,
                          max_share: float = CALIBRATION_HOLDOUT, held_out_train: int | None = None
                          ) -> CalibrationSplit:
    """The :class:`CalibrationSplit` of a LocoCategory. ``held_out_train`` (a trained run's, when
    recalibrating it) overrides :func:`holdout_for_calibration`: images a model was trained on must
    never calibrate it."""
    train, validation = list(category.train_paths), list(category.validation_paths)
    held = (holdout_for_calibration(len(train), len(validation), target_fpr, has_checks, max_share)
            if held_out_train is None else held_out_train)
    if not 0 <= held < len(train):
        raise ValueError(f"cannot hold out {held} of {len(train)} training images for calibration")
    pool = validation + train[len(train) - held:]
    n_scale = max(MIN_SCALE_IMAGES, round(SCALE_SHARE * len(pool))) if has_checks else 0
    if len(pool) - n_scale < 1:
        raise ValueError(f"{len(pool)} held-out normal images are too few to calibrate: the reference checks' "
                         f"scales need {n_scale} and the threshold at least one more")
    # spread the scale images evenly over the pool: both parts draw on validation and training alike
    is_scale = [math.floor((i + 1) * n_scale / len(pool)) > math.floor(i * n_scale / len(pool))
                for i in range(len(pool))]
    return CalibrationSplit(train=train[:len(train) - held], scale=[p for p, s in zip(pool, is_scale) if s],
                            threshold=[p for p, s in zip(pool, is_scale) if not s], held_out_train=held)


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
    scale = f" (and {cal.scale_images} more set the reference checks' scales)" if cal.scale_images else ""
    return (f"{cal.num_images} normal threshold images{scale} cannot pin a {cal.target_fpr:.2%} false-positive "
            f"rate: the threshold is above all of them, and a new normal image still reaches it {expected:.2%} of "
            f"the time on average (under {cal.fpr_upper(0.9):.2%} for nine calibration sets in ten). The threshold "
            f"needs at least {images_for_fpr(cal.target_fpr)} normal images never trained on: add them to "
            f"validation/good, or let training hold out more of train/good (--calibration-holdout), or accept the "
            f"higher rate.")


def calibration_from_scores(normal_scores: np.ndarray, target_fpr: float,
                            scale_images: int | None = None) -> tuple[Calibration, dict]:
    """The calibration whose threshold is set on ``normal_scores`` (normal images never trained on, and
    with reference checks never used for their scales, whose number is ``scale_images``: 0 without
    checks; None: unknown, as on cards from before the split)."""
    scores = np.asarray(normal_scores, dtype=np.float64)
    thr = threshold_for_fpr(scores, target_fpr)
    cal = Calibration(raw_threshold=thr, score_min=float(scores.min()), target_fpr=target_fpr,
                      pixel_threshold=thr, num_images=int(scores.size), score_median=float(np.median(scores)),
                      scale_images=scale_images)
    stats = {"num_images": int(scores.size), "scale_images": scale_images, "min": float(scores.min()),
             "max": float(scores.max()), "mean": float(scores.mean()), "std": float(scores.std()),
             "expected_fpr": cal.expected_fpr(), "fpr_upper_90": cal.fpr_upper(0.9),
             "at_or_above_threshold": int((scores.astype(np.float32) >= np.float32(thr)).sum())}
    return cal, stats


@torch.no_grad()
def calibrate_threshold(model, images: list[np.ndarray], top_k: int, target_fpr: float,
                        device: torch.device | str = "cpu", scale_images: int | None = None
                        ) -> tuple[Calibration, dict]:
    """The threshold on ``images`` (normal, held out of training and of the checks' scales)."""
    scores = predict(model, images, top_k, device).scores
    return calibration_from_scores(scores, target_fpr, scale_images)


def leave_out_checks(model, names) -> list:
    """Remove the checks ``names`` from the model and its configuration (the checkpoint then records
    them off); returns the checks that remain. Without any, the reference encoder goes too."""
    remaining = {check.name: check for check in model.checks if check.name not in names}
    model.set_checks(model.reference_encoder if remaining else None, remaining)
    model.config = dataclasses.replace(model.config, **{name: False for name in names})
    return list(remaining.values())


def left_out_messages(report: dict) -> list[str]:
    """One line per check :func:`fit_checks` left out, saying why (for training output and `slsg checks`)."""
    return [f"{name.replace('_', ' ')} left out: {reason}" for name, reason in report.get("left_out", {}).items()]


@torch.no_grad()
def fit_checks(model, train_images: list[np.ndarray], scale_images: list[np.ndarray], top_k: int,
               device: torch.device | str = "cpu", batch_size: int = 16, seed: int = 0, progress: bool = True,
               keep_trained: bool = False, simulation=None, precision: str = "fp32", select: bool = False) -> dict:
    """Fit the model's reference checks (``model.checks``); call before calibrating.

    One reference-encoder pass over the training images collects what every check needs, and each
    check fits itself from that (the patch memory its coreset, the global branch its Gaussian, the
    composition check trains its autoencoder: the only one with training steps). One pass over
    ``scale_images`` (normal images never trained on, and never the threshold's: see the module
    docstring) gives their raw image scores, and each check's scale is fitted against the
    local score it is combined with: map checks against the paper's, image checks against the
    map-fused one. A check that finds nothing to model in the normal images (``CheckNotApplicable``) is
    left out of the model and its configuration, and the report's ``left_out`` says why. ``keep_trained``
    keeps a trained check's learnt weights (the composition check's autoencoder) and refits the rest.
    ``simulation`` (the run's ``SimulationConfig``; default settings when None) makes the logical
    anomalies the composition check learns to undo; ``precision`` (a resolved one) is what its training
    forward passes run in; every fit and score is float32. ``select``: then leave the parts that do not
    separate anomalies simulated from the scale images out of the fusion (training/fusion.py; the
    report's ``fusion``).
    """
    from slsg_train.data.images import to_tensor
    from slsg_train.models.reference import IMAGE, MAP, CheckNotApplicable, FitContext

    encoder, checks = model.reference_encoder, model.checks
    if encoder is None or not checks:
        return {}
    for check in checks:
        check.fitted.fill_(False)
    if select:  # every part fused while the scales are fitted; the selection below decides again
        model.config = dataclasses.replace(model.config, fuse_slsg_map=True)
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
    context = FitContext(train_images, seed, progress, simulation, precision, keep_trained, top_k)
    report: dict = {"train_images": len(train_images), "scale_images": len(scale_images)}
    left_out: dict[str, str] = {}
    for check in checks:
        try:
            report[check.name] = check.fit(collected.pop(check.name), context)
        except CheckNotApplicable as exc:
            left_out[check.name] = str(exc)
    if left_out:
        report["left_out"] = left_out
        checks = leave_out_checks(model, left_out)
        if not checks:
            model.train(was_training)
            return report

    size, raw = scale_images[0].shape[:2], {check.name: [] for check in checks}
    for x, maps in reference_maps(scale_images):
        for check in checks:
            raw[check.name].append(check.image_raw(check(x, maps), size, top_k).double().cpu())
    # predict fuses the checks fitted so far: none for the map checks, the map checks for image checks
    for kind in (MAP, IMAGE):
        of_kind = [check for check in checks if check.kind == kind]
        if of_kind:
            local = predict(model, scale_images, top_k, device).scores
        for check in of_kind:
            check.fit_scale(torch.cat(raw[check.name]).numpy(), local)
            report[check.name].update(check.scale_report())
    if select:
        from slsg_train.training.fusion import select_fusion

        report["fusion"] = select_fusion(model, scale_images, top_k, simulation, seed, device)
    model.train(was_training)
    return report
