"""Anomalous regions: connected components of the thresholded anomaly map, in original pixels."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage


@dataclass(frozen=True)
class AnomalyRegion:
    """Box (x0, y0, x1, y1), exclusive end, in original-image pixels; area in original pixels."""

    x0: int
    y0: int
    x1: int
    y1: int
    peak: float
    area: int


def find_regions(anomaly_map: np.ndarray, pixel_threshold: float, image_size: tuple[int, int],
                 max_regions: int = 32) -> list[AnomalyRegion]:
    """Regions of ``anomaly_map`` [h, w] above ``pixel_threshold``, scaled to ``image_size`` = (W, H).

    8-connected components; sorted by peak value, highest first, at most ``max_regions``.
    """
    mask = anomaly_map > pixel_threshold
    if not mask.any():
        return []
    labels, count = ndimage.label(mask, structure=np.ones((3, 3), bool))
    index = np.arange(1, count + 1)
    peaks = ndimage.maximum(anomaly_map, labels, index)
    sizes = ndimage.sum_labels(mask, labels, index)
    h, w = anomaly_map.shape
    sx, sy = image_size[0] / w, image_size[1] / h
    regions = []
    for slc, peak, size in zip(ndimage.find_objects(labels), peaks, sizes):
        ys, xs = slc
        regions.append(AnomalyRegion(
            x0=int(math.floor(xs.start * sx)), y0=int(math.floor(ys.start * sy)),
            x1=min(image_size[0], int(math.ceil(xs.stop * sx))), y1=min(image_size[1], int(math.ceil(ys.stop * sy))),
            peak=float(peak), area=int(round(size * sx * sy))))
    regions.sort(key=lambda r: r.peak, reverse=True)
    return regions[:max_regions]
