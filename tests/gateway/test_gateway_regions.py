"""Anomalous regions from a map: checked against scipy.ndimage's own per-label statistics."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import ndimage

from slsg_gateway.regions import find_regions


def reference_regions(amap: np.ndarray, threshold: float, size: tuple[int, int]) -> list[tuple]:
    """The straightforward version: ndimage.maximum / sum_labels per label, sorted by peak."""
    labels, count = ndimage.label(amap > threshold, structure=np.ones((3, 3), bool))
    index = np.arange(1, count + 1)
    peaks, sizes = ndimage.maximum(amap, labels, index), ndimage.sum_labels(amap > threshold, labels, index)
    sx, sy = size[0] / amap.shape[1], size[1] / amap.shape[0]
    out = [(math.floor(xs.start * sx), math.floor(ys.start * sy), min(size[0], math.ceil(xs.stop * sx)),
            min(size[1], math.ceil(ys.stop * sy)), float(p), round(n * sx * sy))
           for (ys, xs), p, n in zip(ndimage.find_objects(labels), peaks, sizes)]
    return sorted(out, key=lambda r: -r[4])


@pytest.mark.parametrize("seed, threshold", [(0, 0.95), (1, 0.8), (2, 0.5)])
def test_regions_equal_the_reference_on_random_maps(seed, threshold):
    amap = np.random.default_rng(seed).random((48, 64)).astype(np.float32)
    got = find_regions(amap, threshold, (640, 480), max_regions=10_000)
    want = reference_regions(amap, threshold, (640, 480))
    assert len(got) == len(want) > 0
    assert [(r.x0, r.y0, r.x1, r.y1, r.area) for r in got] == [w[:4] + w[5:] for w in want]
    np.testing.assert_allclose([r.peak for r in got], [w[4] for w in want])


def test_regions_are_capped_highest_peak_first_and_empty_below_threshold():
    amap = np.zeros((32, 32), np.float32)
    for i, (y, x) in enumerate([(2, 2), (2, 20), (20, 2), (20, 20)]):
        amap[y:y + 4, x:x + 4] = 0.5 + 0.1 * i
    regions = find_regions(amap, 0.4, (320, 320), max_regions=2)
    assert [round(r.peak, 3) for r in regions] == [0.8, 0.7]
    assert (regions[0].x0, regions[0].y0, regions[0].x1, regions[0].y1, regions[0].area) == (200, 200, 240, 240, 1600)
    assert find_regions(amap, 0.9, (320, 320)) == []
