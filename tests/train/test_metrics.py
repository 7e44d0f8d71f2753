"""LOCO metrics on hand-computed cases and against straightforward per-threshold references."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from slsg_train.metrics import (
    AU_SPRO_LIMITS, ImageMaps, PixelROC, SPROCurve, au_spro, au_spro_by_type, au_spro_error_bound, auroc,
    image_auroc_by_defect, image_auroc_by_type, pixel_auroc, roc_curve, saturation_area, spro_curve,
)
from slsg_train.metrics.buckets import bucket_floor, float32_keys, score_buckets

LOCO_TYPES = ("good", "logical_anomalies", "structural_anomalies")


# ---------------------------------------------------------------- references (deliberately naive)

def mann_whitney_auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Pairwise count over all (positive, negative) pairs, ties 1/2."""
    pos, neg = scores[labels == 1], scores[labels == 0]
    wins = sum((p > n) + 0.5 * (p == n) for p, n in itertools.product(pos, neg))
    return wins / (len(pos) * len(neg))


def reference_spro_curve(images: list[ImageMaps]) -> tuple[list[float], list[float]]:
    """One point per distinct score (plus above the maximum), positives = map > t, counted directly."""
    values = np.unique(np.concatenate([np.asarray(i.anomaly_map, np.float32).ravel() for i in images]))
    thresholds = [values[-1] + 1.0, *values[::-1][1:], values[0] - 1.0]
    free = [np.logical_not(np.logical_or.reduce([m for m, _ in i.defects])) if i.defects
            else np.ones(i.anomaly_map.shape, bool) for i in images]
    total_free = sum(f.sum() for f in free)
    fpr, spro = [], []
    for t in thresholds:
        positive = [np.asarray(i.anomaly_map, np.float32) > t for i in images]
        fpr.append(sum((p & f).sum() for p, f in zip(positive, free)) / total_free)
        per_defect = [min((p & m).sum() / sat, 1.0) for p, i in zip(positive, images) for m, sat in i.defects]
        spro.append(float(np.mean(per_defect)))
    return fpr, spro


def reference_au_spro(fpr: list[float], spro: list[float], limit: float) -> float:
    """Trapezoid segment by segment up to the limit, interpolating the crossing segment."""
    area = 0.0
    for x0, x1, y0, y1 in zip(fpr, fpr[1:], spro, spro[1:]):
        if x1 <= limit:
            area += (x1 - x0) * (y0 + y1) / 2
        elif x0 < limit:
            y_limit = y0 + (y1 - y0) * (limit - x0) / (x1 - x0)
            area += (limit - x0) * (y0 + y_limit) / 2
    return area / limit


def random_images(rng: np.random.Generator, levels: int | None, n: int = 6, shape=(24, 20),
                  types=LOCO_TYPES) -> list[ImageMaps]:
    """Maps on `levels` distinct values (None: continuous); 1-3 random rectangular defects, overlaps included."""
    images = []
    for index in range(n):
        anomaly_type = types[index % len(types)]
        raw = rng.random(shape)
        amap = (np.floor(raw * levels) / levels if levels else raw).astype(np.float32)
        defects = []
        for _ in range(0 if anomaly_type == "good" else int(rng.integers(1, 4))):
            mask = np.zeros(shape, bool)
            top, left = rng.integers(0, shape[0] - 4), rng.integers(0, shape[1] - 4)
            mask[top:top + int(rng.integers(2, 8)), left:left + int(rng.integers(2, 8))] = True
            amap[mask] = np.minimum(amap[mask] + np.float32(0.3), 1.0)  # defects score higher on average
            area = int(mask.sum())
            relative = bool(rng.integers(0, 2))
            threshold = float(rng.choice([0.3, 0.5, 1.0])) if relative else int(rng.integers(1, 2 * area))
            defects.append((mask, saturation_area(area, threshold, relative)))
        images.append(ImageMaps(amap, defects, anomaly_type, name=f"{anomaly_type}/{index:03d}"))
    return images


# ---------------------------------------------------------------- ROC / AUROC

def test_auroc_hand_case_and_curve_points():
    fpr, tpr, thresholds = roc_curve([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1])
    np.testing.assert_allclose(fpr, [0, 0, 0.5, 0.5, 1])
    np.testing.assert_allclose(tpr, [0, 0.5, 0.5, 1, 1])
    np.testing.assert_allclose(thresholds, [np.inf, 0.8, 0.4, 0.35, 0.1])
    assert auroc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx(0.75)


def test_auroc_ties_enter_together():
    # Score 0.5 holds one negative and one positive: one diagonal step, worth 1/2 a pair.
    fpr, tpr, _ = roc_curve([0.2, 0.5, 0.5, 0.9], [0, 0, 1, 1])
    np.testing.assert_allclose(fpr, [0, 0, 0.5, 1])
    np.testing.assert_allclose(tpr, [0, 0.5, 1, 1])
    assert auroc([0.2, 0.5, 0.5, 0.9], [0, 0, 1, 1]) == pytest.approx(0.875)
    assert auroc(np.full(7, 3.0), [0, 1, 0, 1, 1, 0, 0]) == pytest.approx(0.5)


def test_auroc_equals_mann_whitney_with_many_ties():
    rng = np.random.default_rng(1)
    for _ in range(5):
        scores = rng.integers(0, 6, 40).astype(float)
        labels = rng.integers(0, 2, 40)
        assert auroc(scores, labels) == pytest.approx(mann_whitney_auroc(scores, labels), abs=1e-12)


@pytest.mark.parametrize("labels, missing", [([0, 0, 0], "no positive"), ([1, 1, 1], "no negative")])
def test_auroc_one_class_names_the_missing_class(labels, missing):
    with pytest.raises(ValueError, match=missing):
        auroc([0.1, 0.2, 0.3], labels)


def test_auroc_rejects_bad_input():
    with pytest.raises(ValueError, match="differ in length"):
        auroc([0.1, 0.2], [0, 1, 1])
    with pytest.raises(ValueError, match="NaN"):
        auroc([0.1, np.nan], [0, 1])
    with pytest.raises(ValueError, match="0 \\(normal\\) or 1"):
        auroc([0.1, 0.2], [0, 2])


def test_image_auroc_by_type_loco():
    scores = [0.1, 0.2, 0.3, 0.9, 0.15, 0.25, 0.8]
    types = ["good", "good", "good", "logical_anomalies", "logical_anomalies",
             "structural_anomalies", "structural_anomalies"]
    result = image_auroc_by_type(scores, types)
    # logical: 0.9 beats 3 goods, 0.15 beats 1 -> 4/6; structural: 0.25 beats 2, 0.8 beats 3 -> 5/6
    assert result == pytest.approx({"logical": 4 / 6, "structural": 5 / 6, "mean": 0.75})


def test_image_auroc_by_type_absent_type_and_mvtec_ad_types():
    only_logical = image_auroc_by_type([0.1, 0.2, 0.9], ["good", "good", "logical_anomalies"])
    assert only_logical == pytest.approx({"logical": 1.0, "mean": 1.0})
    mvtec = image_auroc_by_type([0.1, 0.3, 0.2, 0.9], ["good", "good", "crack", "scratch"])
    assert mvtec == pytest.approx({"crack": 0.5, "scratch": 1.0, "mean": 0.75, "all": 0.75})
    with pytest.raises(ValueError, match="'good'"):
        image_auroc_by_type([0.1, 0.2], ["crack", "scratch"])


def test_image_auroc_by_defect_counts_two_defect_images_for_both():
    scores = [0.1, 0.2, 0.3, 0.9, 0.15, 0.25]
    defects = [[], [], [], ["missing_part"], ["missing_part", "scratch"], ["scratch"]]
    result = image_auroc_by_defect(scores, defects)
    # missing_part: 0.9 beats 3 goods, 0.15 beats 1 -> 4/6; scratch: 0.15 beats 1, 0.25 beats 2 -> 3/6
    assert result == {"missing_part": {"auroc": pytest.approx(4 / 6), "count": 2},
                      "scratch": {"auroc": pytest.approx(3 / 6), "count": 2}}
    with pytest.raises(ValueError, match="good test images"):
        image_auroc_by_defect([0.1, 0.2], [["a"], ["b"]])
    with pytest.raises(ValueError, match="differ in length"):
        image_auroc_by_defect([0.1], [[], ["a"]])


# ---------------------------------------------------------------- buckets

def test_float32_keys_order_like_the_numbers():
    values = np.array([-np.inf, -1e30, -2.5, -1e-40, -0.0, 0.0, 1e-45, 1e-10, 0.5, 1.0, 3e38, np.inf], np.float32)
    keys = float32_keys(values).astype(np.int64)
    assert np.all(np.diff(keys[[0, 1, 2, 3, 5, 6, 7, 8, 9, 10, 11]]) > 0)
    assert keys[4] == keys[5]  # -0.0 == +0.0
    floors = bucket_floor(score_buckets(values))
    assert np.all(floors <= values) and floors[0] == -np.inf and floors[-1] == np.inf
    with pytest.raises(ValueError, match="NaN"):
        float32_keys(np.array([0.1, np.nan]))


# ---------------------------------------------------------------- sPRO

def test_saturation_area_relative_floors_and_absolute_caps():
    assert saturation_area(5, 0.5, relative=True) == 2  # int(2.5), as the official script
    assert saturation_area(8, 1.0, relative=True) == 8
    assert saturation_area(3, 0.1, relative=True) == 1  # int(0.3) = 0 would divide by zero
    assert saturation_area(5, 3, relative=False) == 3
    assert saturation_area(5, 7, relative=False) == 5  # capped at the defect area
    with pytest.raises(ValueError, match="relative"):
        saturation_area(5, 1.5, relative=True)


def hand_case() -> list[ImageMaps]:
    """Anomalous image with two defects (relative and capped absolute saturation) and a good image."""
    amap = np.array([[0.9, 0.8, 0.1, 0.0],
                     [0.7, 0.1, 0.1, 0.6]], np.float32)
    square = np.zeros((2, 4), bool)
    square[:, :2] = True            # area 4, relative 0.5 -> saturated at 2 TP pixels
    column = np.zeros((2, 4), bool)
    column[:, 3] = True             # area 2, absolute 5 -> capped at 2
    good = np.full((2, 4), 0.1, np.float32)
    good[0, 0] = 0.8                # one false positive from 0.8 down
    return [ImageMaps(amap, [(square, saturation_area(4, 0.5, True)), (column, saturation_area(2, 5, False))],
                      "structural_anomalies"),
            ImageMaps(good, [], "good")]


def test_spro_curve_hand_case():
    fpr, spro, thresholds = spro_curve(hand_case(), progress=False)
    # Defect-free pixels: 2 in the anomalous image (both 0.1) + 8 in the good one = 10.
    # >=0.9: square 1/2 -> mean 0.25; >=0.8: square full, good FP 1 -> (0.1, 0.5);
    # >=0.7: nothing changes (no point); >=0.6: column 1/2 -> 0.75; >=0.1: every defect-free pixel -> (1, 0.75);
    # >=0.0: the column's last pixel -> (1, 1).
    np.testing.assert_allclose(fpr, [0, 0, 0.1, 0.1, 1, 1])
    np.testing.assert_allclose(spro, [0, 0.25, 0.5, 0.75, 0.75, 1])
    expected_thresholds = np.array([0.9, 0.8, 0.6, 0.1, 0.0], np.float32)
    assert thresholds[0] == np.inf
    assert np.all(thresholds[1:] <= expected_thresholds) and np.all(thresholds[1:] > expected_thresholds - 1e-4)
    expected = {0.05: 0.05 * (0.25 + 0.375) / 2 / 0.05,  # interpolated at the limit: 0.375
                0.1: 0.1 * (0.25 + 0.5) / 2 / 0.1,
                0.3: (0.1 * (0.25 + 0.5) / 2 + 0.2 * 0.75) / 0.3,
                1.0: 0.1 * (0.25 + 0.5) / 2 + 0.9 * 0.75}
    for limit, value in expected.items():
        assert au_spro(fpr, spro, limit) == pytest.approx(value, abs=1e-12)


def test_spro_fp_only_outside_all_masks():
    # The pixel scoring 0.9 is in the second mask only: it must not count as a false positive.
    amap = np.array([[0.9, 0.2], [0.2, 0.2]], np.float32)
    first, second = np.zeros((2, 2), bool), np.zeros((2, 2), bool)
    first[1, 1], second[0, 0] = True, True
    fpr, spro, _ = spro_curve([ImageMaps(amap, [(first, 1.0), (second, 1.0)])], progress=False)
    np.testing.assert_allclose(fpr, [0, 0, 1])
    np.testing.assert_allclose(spro, [0, 0.5, 1])


def test_spro_constant_maps_are_the_diagonal():
    images = [ImageMaps(np.full((8, 8), 0.5, np.float32), [], "good")]
    mask = np.zeros((8, 8), bool)
    mask[2:5, 2:5] = True
    images.append(ImageMaps(np.full((8, 8), 0.5, np.float32), [(mask, 9.0)], "logical_anomalies"))
    fpr, spro, _ = spro_curve(images, progress=False)
    np.testing.assert_allclose(fpr, [0, 1])
    np.testing.assert_allclose(spro, [0, 1])
    for limit in AU_SPRO_LIMITS:
        assert au_spro(fpr, spro, limit) == pytest.approx(limit / 2)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_au_spro_matches_per_threshold_reference(seed):
    images = random_images(np.random.default_rng(seed), levels=9, n=7)
    fpr, spro, _ = spro_curve(images, progress=False)
    ref_fpr, ref_spro = reference_spro_curve(images)
    for limit in AU_SPRO_LIMITS:
        assert au_spro(fpr, spro, limit) == pytest.approx(reference_au_spro(ref_fpr, ref_spro, limit), abs=1e-6)


def test_au_spro_by_type_uses_good_images_with_each_type():
    images = random_images(np.random.default_rng(3), levels=7, n=9)
    result = au_spro_by_type(images, progress=False)
    assert set(result) == {"0.05", "0.1", "0.3", "1.0"}
    good = [i for i in images if i.anomaly_type == "good"]
    for limit in AU_SPRO_LIMITS:
        expected = {}
        for key, folder in (("logical", "logical_anomalies"), ("structural", "structural_anomalies")):
            subset = good + [i for i in images if i.anomaly_type == folder]
            expected[key] = reference_au_spro(*reference_spro_curve(subset), limit)
        expected["mean"] = (expected["logical"] + expected["structural"]) / 2
        assert result[str(limit)] == pytest.approx(expected, abs=1e-6)
        # ...and differs from pooling all images, so the split is really applied
    pooled = reference_au_spro(*reference_spro_curve(images), 0.3)
    assert abs(result["0.3"]["logical"] - pooled) > 1e-6 or abs(result["0.3"]["structural"] - pooled) > 1e-6


@pytest.mark.parametrize("dropped_bits", [8, 17])
def test_bucketing_error_is_within_bound_on_continuous_maps(dropped_bits):
    images = random_images(np.random.default_rng(4), levels=None, n=6, shape=(16, 16))
    curve = SPROCurve(dropped_bits)
    for image in images:
        curve.add(image)
    fpr, spro, _ = curve.curve()
    ref_fpr, ref_spro = reference_spro_curve(images)
    errors = []
    for limit in AU_SPRO_LIMITS:
        error = abs(au_spro(fpr, spro, limit) - reference_au_spro(ref_fpr, ref_spro, limit))
        bound = au_spro_error_bound(fpr, spro, limit)
        assert error <= bound + 1e-12
        errors.append(error)
    if dropped_bits == 8:  # default: 2^15 buckets per octave separate these ~1500 scores
        assert len(fpr) > 0.9 * len(ref_fpr) and max(errors) < 1e-3
    else:  # 2^6 buckets per octave: scores share buckets, the error is real and still bounded
        assert len(fpr) < 0.5 * len(ref_fpr) and max(errors) > 1e-6


def test_spro_rejects_bad_input():
    amap = np.zeros((4, 4), np.float32)
    mask = np.zeros((4, 4), bool)
    mask[0, 0] = True
    with pytest.raises(ValueError, match="'bad/000'.*mask shape"):
        spro_curve([ImageMaps(amap, [(np.ones((3, 4), bool), 1.0)], name="bad/000")], progress=False)
    with pytest.raises(ValueError, match="mask is empty"):
        spro_curve([ImageMaps(amap, [(np.zeros((4, 4), bool), 1.0)])], progress=False)
    with pytest.raises(ValueError, match="saturation area 2.0"):
        spro_curve([ImageMaps(amap, [(mask, 2.0)])], progress=False)
    with pytest.raises(ValueError, match="NaN"):
        spro_curve([ImageMaps(np.full((4, 4), np.nan), [(mask, 1.0)])], progress=False)
    with pytest.raises(ValueError, match="at least one defect"):
        spro_curve([ImageMaps(amap, [])], progress=False)
    with pytest.raises(ValueError, match="no defect-free pixel"):
        spro_curve([ImageMaps(amap, [(np.ones((4, 4), bool), 1.0)])], progress=False)
    with pytest.raises(ValueError, match="cannot have defect masks"):
        spro_curve([ImageMaps(amap, [(mask, 1.0)], "good")], progress=False)
    with pytest.raises(ValueError, match="FPR limit"):
        au_spro(np.array([0.0, 1.0]), np.array([0.0, 1.0]), 0.0)


# ---------------------------------------------------------------- pixel AUROC

def test_pixel_auroc_matches_exact_auroc_on_few_levels():
    images = random_images(np.random.default_rng(5), levels=11, n=6)
    masks = [np.logical_or.reduce([m for m, _ in i.defects]) if i.defects else None for i in images]
    scores = np.concatenate([i.anomaly_map.ravel() for i in images])
    labels = np.concatenate([(m if m is not None else np.zeros(i.anomaly_map.shape, bool)).ravel()
                             for i, m in zip(images, masks)])
    result = pixel_auroc([i.anomaly_map for i in images], masks, progress=False)
    assert result == pytest.approx(auroc(scores, labels.astype(int)), abs=1e-12)
    roc = PixelROC()
    for image in images:
        roc.add_image(image)
    assert roc.auroc() == pytest.approx(result, abs=1e-12)


def test_pixel_auroc_hand_case_constant_and_errors():
    amap = np.array([[0.9, 0.1], [0.5, 0.5]], np.float32)
    mask = np.array([[1, 0], [1, 0]], np.uint8)  # mask PNG values: non-zero is a defect
    # defects {0.9, 0.5} vs normals {0.1, 0.5}: pairs 1 + 1 + 1 + 0.5 of 4
    assert pixel_auroc([amap], [mask], progress=False) == pytest.approx(3.5 / 4)
    assert pixel_auroc([np.ones((3, 3))], [np.eye(3)], progress=False) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="no positive"):
        pixel_auroc([amap], [None], progress=False)
    with pytest.raises(ValueError, match="mask shape"):
        pixel_auroc([amap], [np.ones((3, 3))], progress=False)


def test_pixel_auroc_bucketing_error_within_bound():
    rng = np.random.default_rng(6)
    maps = [rng.random((20, 20)).astype(np.float32) for _ in range(3)]
    masks = [rng.random((20, 20)) < 0.2 for _ in range(3)]
    for m, g in zip(maps, masks):
        m[g] += 0.2
    exact = auroc(np.concatenate([m.ravel() for m in maps]), np.concatenate([g.ravel() for g in masks]).astype(int))
    roc = PixelROC(dropped_bits=18)
    for m, g in zip(maps, masks):
        roc.add(m, g)
    assert 0 < abs(roc.auroc() - exact) <= roc.error_bound()
