"""Pixel AUROC over all test pixels (commonly reported on MVTec AD/LOCO; not an official LOCO metric).

Streaming: each map is reduced to per-bucket counts of normal and defect pixels (see
``buckets``), so ~1e9 pixels fit in a few hundred MB. The result is the exact AUROC of the
bucketed scores (ties within a bucket count 1/2); ``PixelROC.error_bound`` bounds the
difference to the AUROC of the raw float32 scores.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from tqdm import tqdm

from slsg_train.metrics.buckets import DEFAULT_DROPPED_BITS, BucketHistogram, bucket_counts, score_buckets
from slsg_train.metrics.roc import auroc_from_counts
from slsg_train.metrics.spro import ImageMaps

_NORMAL, _DEFECT = 0, 1


class PixelROC:
    """Streaming accumulator of pixel-level ROC counts."""

    def __init__(self, dropped_bits: int = DEFAULT_DROPPED_BITS) -> None:
        self.dropped_bits = dropped_bits
        self._hist = BucketHistogram(columns=2)

    def add(self, anomaly_map: np.ndarray, defect_mask: np.ndarray | None = None, name: str = "") -> None:
        """Add one map [H, W]; ``defect_mask`` [H, W] (non-zero = defect) or None for a good image."""
        amap = np.asarray(anomaly_map)
        where = f"image {name!r}" if name else "image"
        if amap.ndim != 2 or amap.size == 0:
            raise ValueError(f"{where}: anomaly map must be a non-empty 2-D array, got shape {amap.shape}")
        buckets = score_buckets(amap, self.dropped_bits)
        if defect_mask is None:
            self._hist.add(_NORMAL, *bucket_counts(buckets))
            return
        mask = np.asarray(defect_mask)
        if mask.shape != amap.shape:
            raise ValueError(f"{where}: mask shape {mask.shape} differs from anomaly map shape {amap.shape}")
        mask = mask != 0
        self._hist.add(_NORMAL, *bucket_counts(buckets[~mask]))
        self._hist.add(_DEFECT, *bucket_counts(buckets[mask]))

    def add_image(self, image: ImageMaps) -> None:
        """Add an ``ImageMaps``; its defect masks are joined (a pixel in any mask is a defect pixel)."""
        masks = [np.asarray(mask) != 0 for mask, _ in image.defects]
        self.add(image.anomaly_map, np.logical_or.reduce(masks) if masks else None, image.name)

    def auroc(self) -> float:
        _, counts = self._hist.occupied()
        return auroc_from_counts(counts[:, _NORMAL], counts[:, _DEFECT])

    def error_bound(self) -> float:
        """Largest |AUROC(bucketed) - AUROC(raw scores)|: half the normal/defect pairs sharing a bucket."""
        _, counts = self._hist.occupied()
        n_normal, n_defect = counts[:, _NORMAL].sum(), counts[:, _DEFECT].sum()
        return float(0.5 * np.sum(counts[:, _NORMAL] * counts[:, _DEFECT]) / (n_normal * n_defect))


def pixel_auroc(maps: Iterable[np.ndarray], gts: Iterable[np.ndarray | None],
                dropped_bits: int = DEFAULT_DROPPED_BITS, progress: bool = True) -> float:
    """AUROC over all pixels of all maps; ``gts`` are defect masks (None for good images), same order."""
    roc = PixelROC(dropped_bits)
    pairs = zip(maps, gts, strict=True)  # a length mismatch raises ValueError
    for anomaly_map, gt in tqdm(pairs, desc="pixel AUROC", unit="image", disable=not progress, leave=False):
        roc.add(anomaly_map, gt)
    return roc.auroc()
