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
    # Peaks and sizes with numpy: ndimage.maximum / sum_labels cost ~1 ms per frame, this ~0.1.
    flat = labels.ravel()
    inside = flat > 0
    peaks = np.zeros(count + 1, np.float32)
    np.maximum.at(peaks, flat[inside], anomaly_map.ravel()[inside])
    sizes = np.bincount(flat[inside], minlength=count + 1)
    order = np.argsort(-peaks[1:], kind="stable")[:max_regions] + 1  # highest peak first, ties in label order
    slices = ndimage.find_objects(labels)
    h, w = anomaly_map.shape
    sx, sy = image_size[0] / w, image_size[1] / h
    regions = []
    for label in order:
        ys, xs = slices[label - 1]
        regions.append(AnomalyRegion(
            x0=int(math.floor(xs.start * sx)), y0=int(math.floor(ys.start * sy)),
            x1=min(image_size[0], int(math.ceil(xs.stop * sx))), y1=min(image_size[1], int(math.ceil(ys.stop * sy))),
            peak=float(peaks[label]), area=int(round(sizes[label] * sx * sy))))
    return regions
