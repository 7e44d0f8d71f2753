"""PaDiM baseline (slsg/bench/padim.py): its statistics against a direct computation, and a run on tiny
generated MVTec AD-style data through `slsg bench padim`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from support import run_slsg
from slsg_bench.padim import COVARIANCE_EPS, feature_taps, fit_gaussians, gaussian_blur, mahalanobis

SIZE = 64


def test_gaussians_and_distance_match_a_direct_computation():
    rng = np.random.default_rng(0)
    embeddings = rng.normal(size=(9, 3, 2, 2)) * np.array([1.0, 2.0, 0.5])[None, :, None, None]
    mean, inv_cov = fit_gaussians(torch.from_numpy(embeddings).float())
    test = rng.normal(size=(2, 3, 2, 2))
    got = mahalanobis(torch.from_numpy(test).float(), mean, inv_cov).numpy()
    for y in range(2):
        for x in range(2):
            samples = embeddings[:, :, y, x]
            cov = np.cov(samples, rowvar=False) + COVARIANCE_EPS * np.eye(3)
            for n in range(2):
                diff = test[n, :, y, x] - samples.mean(axis=0)
                assert got[n, y, x] == pytest.approx(np.sqrt(diff @ np.linalg.inv(cov) @ diff), rel=1e-4)


def test_fit_needs_two_images_and_taps_need_the_strides():
    with pytest.raises(ValueError, match="at least 2 training images"):
        fit_gaussians(torch.zeros(1, 3, 2, 2))
    assert feature_taps([2, 2, 4, 8, 16]) == [2, 3, 4]
    with pytest.raises(ValueError, match="strides"):
        feature_taps([2, 4, 8])


def test_blur_keeps_a_constant_map_and_spreads_a_peak():
    flat = torch.full((1, 40, 40), 3.0)
    assert torch.allclose(gaussian_blur(flat), flat, atol=1e-5)
    peak = torch.zeros(1, 40, 40)
    peak[0, 20, 20] = 1.0
    blurred = gaussian_blur(peak)[0]
    assert blurred[20, 20] == blurred.max() and 0 < blurred[20, 20] < 1 and blurred[20, 28] > 0
    assert blurred.sum() == pytest.approx(1.0, abs=1e-3)


def _part(rng: np.random.Generator, stain: bool) -> np.ndarray:
    """A grey disc on a textured background, lit a little differently each time; optionally a dark stain."""
    yy, xx = np.mgrid[:SIZE, :SIZE]
    image = 90 + 20 * np.sin(xx / 3.0)[..., None] + rng.normal(0, 4, (SIZE, SIZE, 3))
    image[(yy - 32) ** 2 + (xx - 32) ** 2 < 18 ** 2] = 170
    image *= rng.uniform(0.95, 1.05)
    if stain:
        cy, cx = rng.integers(22, 42, 2)
        image[(yy - cy) ** 2 + (xx - cx) ** 2 < 5 ** 2] = (30, 60, 20)
    return np.clip(image, 0, 255).astype(np.uint8)


def _save(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def _category(root: Path) -> None:
    """MVTec AD layout: train/good, test/good, test/stain, ground_truth/stain/NNN_mask.png."""
    rng = np.random.default_rng(1)
    cat = root / "part"
    for i in range(12):
        _save(cat / "train" / "good" / f"{i:03d}.png", _part(rng, stain=False))
    for i in range(5):
        _save(cat / "test" / "good" / f"{i:03d}.png", _part(rng, stain=False))
        stained = _part(rng, stain=True)
        _save(cat / "test" / "stain" / f"{i:03d}.png", stained)
        mask = (np.all(stained == (30, 60, 20), axis=2) * 255).astype(np.uint8)
        _save(cat / "ground_truth" / "stain" / f"{i:03d}_mask.png", mask)


def test_padim_ranks_stained_parts_above_good_ones(tmp_path):
    _category(tmp_path)
    out = run_slsg("bench", "padim", "--data", tmp_path, "--category", "part", "--image-size", str(SIZE),
                   "--features", "40", "--threads", "1", "--json")
    report = json.loads(out.stdout)
    assert report["counts"] == {"good": 5, "stain": 5}
    assert report["train_images"] == 12 and report["features"] == 40
    assert report["image_auroc"]["stain"] >= 0.9
    assert report["pixel_auroc"] >= 0.9
    top = max(report["scores"], key=lambda s: s["score"])
    assert top["image"].startswith("stain/")


def test_padim_refuses_more_channels_than_the_backbone_has(tmp_path):
    _category(tmp_path)
    out = run_slsg("bench", "padim", "--data", tmp_path, "--category", "part", "--image-size", str(SIZE),
                   "--features", "5000", check=False)
    assert out.returncode == 2
    assert "--features must be in 1..176" in out.stderr


def test_padim_on_image_labels_only_reports_pixel_metrics_as_unavailable(tmp_path):
    _category(tmp_path)
    for mask in (tmp_path / "part" / "ground_truth" / "stain").iterdir():
        mask.unlink()
    (tmp_path / "part" / "ground_truth" / "stain").rmdir()
    (tmp_path / "part" / "ground_truth").rmdir()
    out = run_slsg("bench", "padim", "--data", tmp_path, "--category", "part", "--image-size", str(SIZE),
                   "--features", "40", "--threads", "1", "--json")
    report = json.loads(out.stdout)
    assert report["pixel_auroc"] is None and "image labels only" in report["unavailable"]
    assert sorted(report["left_out"]) == [f"stain/{i:03d}" for i in range(5)]
    assert report["image_auroc"]["stain"] >= 0.9
