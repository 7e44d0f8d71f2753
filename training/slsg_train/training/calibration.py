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


def legacy_held_out_train(category) -> int:
    """What a run from before :class:`CalibrationSplit` held out of train/good: nothing when the data set
    has validation/good, else its last tenth (at least 2)."""
    return 0 if category.validation_paths else max(2, len(category.train_paths) // 10)


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
    cal = Calibration(raw_threshold=thr, score_min=float(scores.min()), score_max=1.0, target_fpr=target_fpr,
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


@torch.no_grad()
def fit_reference_checks(model, train_images: list[np.ndarray], calib_images: list[np.ndarray], top_k: int,
                         device: torch.device | str = "cpu", batch_size: int = 16, seed: int = 0,
                         progress: bool = True, train_composition: bool = True, simulation=None,
                         precision: str = "fp32") -> dict:
    """Fit the model's reference checks; call before calibrating.

    The patch memory: its coreset of the training images' patches. The composition check: its
    autoencoder trained on the training images (the only check with training steps), then its normal
    error per place on them. Both map checks' scales against the paper's local score on the
    calibration images. Then the global branch: the
    Gaussian of the training images' pooled features, its scale against the (now map-fused) local score.
    ``train_composition=False`` keeps the composition check's trained autoencoder and refits its scale.
    ``simulation`` (the run's ``SimulationConfig``; default settings when None) makes the logical anomalies
    the autoencoder learns to undo (``composition_restoration`` of the model's config). ``precision`` (a
    resolved one) is what the autoencoder's training forward passes run in; every fit and score is float32.
    """
    from slsg_train.models import image_score
    from slsg_train.models.patch_memory import resize_patches
    from slsg_train.models.composition import autoencoder_input
    from slsg_train.data.images import to_tensor

    encoder, glob, patch = model.reference_encoder, model.global_branch, model.patch_memory
    composition = model.composition_check
    if encoder is None:
        return {}
    for check in (glob, patch, composition):
        if check is not None:
            check.fitted.fill_(False)
    was_training = model.training
    model.eval()

    def reference_maps(images: list[np.ndarray]):  # (normalised batch, its reference maps)
        for i in range(0, len(images), batch_size):
            x = torch.stack([to_tensor(im) for im in images[i:i + batch_size]]).to(device)
            yield x, encoder(x)

    # one encoder pass over the training images feeds every check's fit
    patches, pooled, small, stride16 = [], [], [], []
    for x, maps in reference_maps(train_images):
        if patch is not None:
            patches.append(patch.patch_features(maps).permute(0, 2, 3, 1).flatten(0, 2).cpu())
        if glob is not None:
            pooled.append(glob.features(maps).double().cpu())
        if composition is not None:
            small.append(autoencoder_input(x))
            stride16.append(composition.features(maps))
    report: dict = {"train_images": len(train_images), "calibration_images": len(calib_images)}
    if patch is not None:
        feats = torch.cat(patches)
        kept = patch.fit_memory(feats, seed, progress)
        report["patch_memory"] = {"candidates": int(feats.shape[0]), "kept": kept, "feature_dim": patch.dim}
    if glob is not None:
        glob.fit_normal(torch.cat(pooled).numpy())
    if composition is not None:
        small, stride16 = torch.cat(small), torch.cat(stride16)
        report["composition_check"] = (
            _train_composition(model, train_images, small, stride16, simulation, seed, progress, precision)
            if train_composition else {"kept": True})
        composition.fit_normal_error(small, stride16)  # a kept autoencoder's too: older ones have none

    # and one over the calibration images gives every check's raw scores there
    size, patch_scores, composition_scores, distances = calib_images[0].shape[:2], [], [], []
    for x, maps in reference_maps(calib_images):
        if patch is not None:
            patch_scores.append(image_score(resize_patches(patch(maps), size), top_k).double().cpu())
        if composition is not None:
            composition_scores.append(image_score(resize_patches(composition(x, maps), size), top_k).double().cpu())
        if glob is not None:
            distances.append(glob(maps).double().cpu())
    # each scale against the local score it is combined with: the map checks' against the paper's,
    # the global branch's against the map-fused one (predict uses the checks fitted so far)
    if patch is not None or composition is not None:
        local = predict(model, calib_images, top_k, device).scores
    if patch is not None:
        patch.fit_scale(torch.cat(patch_scores).numpy(), local)
        report["patch_memory"].update(distance_mean=float(patch.scale[0]), distance_std=float(patch.scale[1]))
    if composition is not None:
        composition.fit_scale(torch.cat(composition_scores).numpy(), local)
        report["composition_check"].update(error_mean=float(composition.scale[0]),
                                           error_std=float(composition.scale[1]))
    if glob is not None:
        local = predict(model, calib_images, top_k, device).scores
        d = torch.cat(distances).numpy()
        glob.fit_scale(d, local)
        report["global_branch"] = {"feature_dim": glob.dim, "distance_mean": float(d.mean()),
                                   "distance_std": float(d.std())}
    model.train(was_training)
    return report


def _train_composition(model, train_images: list[np.ndarray], small: torch.Tensor, stride16: torch.Tensor,
                       simulation, seed: int, progress: bool, precision: str) -> dict:
    """Train the model's composition check on the training images (their autoencoder inputs ``small`` and
    features ``stride16``), with simulated logical anomalies to undo when its config asks for them."""
    from slsg_train.simulation.config import SimulationConfig
    from slsg_train.training.composition import restoration_inputs, train_composition_check

    share = model.config.composition_restoration
    restoration = (restoration_inputs(train_images, simulation or SimulationConfig(), seed, progress=progress)
                   if share > 0 else None)
    return train_composition_check(model.composition_check, small, stride16, model.config.composition_steps,
                                   seed=seed, progress=progress, restoration=restoration, restoration_share=share,
                                   precision=precision)
