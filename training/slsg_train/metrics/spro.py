"""sPRO curve and AU-sPRO of MVTec LOCO AD (Bergmann et al., IJCV 2022), streaming.

Definitions follow the official evaluation script:

- a pixel is positive at threshold t when ``map > t``; maps are compared at full resolution;
- sPRO of one defect (one mask) = min(TP area / saturation area, 1); the saturation area is
  ``int(threshold * area)`` for relative saturation, ``min(threshold, area)`` for absolute;
- a false positive is a positive pixel that is defect-free in *all* masks of its image; the
  FPR denominator is every defect-free pixel of every test image, good images included;
- the curve is mean sPRO over all defects versus FPR, from (0, 0) to (1, 1); AU-sPRO is its
  trapezoid area up to an FPR limit (interpolating the point at the limit) divided by the limit;
- per anomaly type: the curve of the good images plus that type's images; "mean" is the
  mean of the types.

Implementation: each image is reduced to per-bucket counts of defect-free pixels and
per-bucket rises of its defects' sPRO (see ``buckets``), so memory does not grow with the
number of images and no pass per threshold is made. The curve has one point per occupied
score bucket, and every point is exact (the official curve's point at that threshold). It is
the exact curve at all distinct thresholds whenever distinct scores fall in distinct buckets;
otherwise points inside a bucket are skipped and ``au_spro_error_bound`` bounds the effect.
The official script samples its thresholds adaptively (curve_max_distance, default 0.01)
and so resolves the curve more coarsely than this.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
from tqdm import tqdm

from slsg_train.metrics.buckets import (
    DEFAULT_DROPPED_BITS, BucketHistogram, bucket_counts, bucket_floor, score_buckets,
)
from slsg_train.metrics.roc import GOOD, LOCO_TYPE_KEYS, trapezoid, type_key

AU_SPRO_LIMITS: tuple[float, ...] = (0.05, 0.1, 0.3, 1.0)  # 0.05 is the headline number
_DEFECT_FREE, _SPRO_RISE = 0, 1  # histogram columns


@dataclass
class ImageMaps:
    """One test image for localisation metrics.

    anomaly_map: float [H, W] at the image's original size.
    defects: one (mask [H, W], saturation area in pixels) per defect (mask PNG); empty for good images.
    anomaly_type: the test sub-folder ("good", "logical_anomalies", ...); needed for per-type results.
    name: shown in error messages (e.g. the image path).
    """

    anomaly_map: np.ndarray
    defects: list[tuple[np.ndarray, float]] = field(default_factory=list)
    anomaly_type: str = ""
    name: str = ""


def saturation_area(defect_area: int, saturation_threshold: float, relative: bool) -> float:
    """Pixels of TP at which a defect counts as fully found, as the official script computes it.

    Relative: ``int(threshold * area)`` (floored), at least 1 so a tiny defect cannot divide by
    zero (the official script would give NaN there); absolute: ``min(threshold, area)``.
    """
    if defect_area <= 0:
        raise ValueError(f"defect area must be positive, got {defect_area}")
    if relative:
        if not 0 < saturation_threshold <= 1:
            raise ValueError(f"relative saturation threshold must be in (0, 1], got {saturation_threshold}")
        return float(max(int(saturation_threshold * defect_area), 1))
    if saturation_threshold <= 0:
        raise ValueError(f"absolute saturation threshold must be positive, got {saturation_threshold}")
    return float(min(saturation_threshold, defect_area))


def _image_label(image: ImageMaps) -> str:
    return f"image {image.name!r}" if image.name else "image"


def _validated_map(image: ImageMaps) -> np.ndarray:
    amap = np.asarray(image.anomaly_map)
    if amap.ndim != 2 or amap.size == 0:
        raise ValueError(f"{_image_label(image)}: anomaly map must be a non-empty 2-D array, got shape {amap.shape}")
    if not np.issubdtype(amap.dtype, np.number) or np.isnan(amap).any():
        raise ValueError(f"{_image_label(image)}: anomaly map must be numeric without NaN")
    return amap


def _validated_mask(image: ImageMaps, index: int, mask: np.ndarray, sat_area: float, shape: tuple) -> np.ndarray:
    mask = np.asarray(mask)
    where = f"{_image_label(image)}, defect {index}"
    if mask.shape != shape:
        raise ValueError(f"{where}: mask shape {mask.shape} differs from anomaly map shape {shape}")
    mask = mask != 0  # mask PNGs carry the defect's pixel_value
    area = int(mask.sum())
    if area == 0:
        raise ValueError(f"{where}: mask is empty")
    if not 0 < sat_area <= area:
        raise ValueError(f"{where}: saturation area {sat_area} must be in (0, defect area {area}]")
    return mask


def _spro_rises(buckets: np.ndarray, sat_area: float) -> tuple[np.ndarray, np.ndarray]:
    """Buckets (descending) where one defect's sPRO rises as the threshold falls, and the rises."""
    levels, counts = np.unique(buckets, return_counts=True)
    spro = np.minimum(np.cumsum(counts[::-1]) / sat_area, 1.0)
    rises = np.diff(spro, prepend=0.0)
    keep = rises > 0  # once saturated, lower thresholds change nothing
    return levels[::-1][keep], rises[keep]


class SPROCurve:
    """Streaming accumulator of the sPRO curve: ``add`` each test image, then ``curve`` / ``au_spro``.

    Memory is two float64 columns over the bucket range the scores span (64 MB for maps in
    [0, 1]), independent of the number of images.
    """

    def __init__(self, dropped_bits: int = DEFAULT_DROPPED_BITS) -> None:
        self.dropped_bits = dropped_bits
        self.num_images = 0
        self.num_defects = 0
        self._hist = BucketHistogram(columns=2)

    def add(self, image: ImageMaps) -> None:
        """Add one image's defect-free pixel counts and its defects' sPRO rises."""
        amap = _validated_map(image)
        if image.anomaly_type == GOOD and image.defects:
            raise ValueError(f"{_image_label(image)}: a 'good' image cannot have defect masks")
        buckets = score_buckets(amap, self.dropped_bits)
        defect_free = np.ones(amap.shape, dtype=bool)
        for index, (mask, sat_area) in enumerate(image.defects):
            mask = _validated_mask(image, index, mask, sat_area, amap.shape)
            defect_free &= ~mask
            levels, rises = _spro_rises(buckets[mask], sat_area)
            if len(levels):
                self._hist.add(_SPRO_RISE, *bucket_counts(levels, weights=rises))
        self._hist.add(_DEFECT_FREE, *bucket_counts(buckets[defect_free]))
        self.num_images += 1
        self.num_defects += len(image.defects)

    def merge(self, other: "SPROCurve") -> None:
        """Add another accumulator's images (e.g. the good images to each anomaly type)."""
        if other.dropped_bits != self.dropped_bits:
            raise ValueError("cannot merge sPRO curves bucketed with different dropped_bits")
        self._hist.merge(other._hist)
        self.num_images += other.num_images
        self.num_defects += other.num_defects

    def curve(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(fpr ascending from 0 to 1, mean sPRO, thresholds descending from +inf).

        Point i counts a pixel positive when ``score >= thresholds[i]`` (the floor of its bucket).
        """
        if self.num_defects == 0:
            raise ValueError("sPRO needs at least one defect mask; the images added have none")
        buckets, sums = self._hist.occupied()
        defect_free = np.cumsum(sums[::-1, _DEFECT_FREE])
        if len(defect_free) == 0 or defect_free[-1] == 0:
            raise ValueError("FPR is undefined: the images added have no defect-free pixel")
        mean_spro = np.minimum(np.cumsum(sums[::-1, _SPRO_RISE]) / self.num_defects, 1.0)
        fpr = np.r_[0.0, defect_free / defect_free[-1]]
        thresholds = np.r_[np.inf, bucket_floor(buckets[::-1], self.dropped_bits)]
        return fpr, np.r_[0.0, mean_spro], thresholds

    def au_spro(self, limit: float) -> float:
        fpr, spro, _ = self.curve()
        return au_spro(fpr, spro, limit)


def spro_curve(images: Iterable[ImageMaps], dropped_bits: int = DEFAULT_DROPPED_BITS,
               progress: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fpr, mean_spro, thresholds) over all images; see ``SPROCurve.curve``."""
    curve = SPROCurve(dropped_bits)
    for image in tqdm(images, desc="sPRO", unit="image", disable=not progress, leave=False):
        curve.add(image)
    return curve.curve()


def _validated_curve(fpr: np.ndarray, spro: np.ndarray, limit: float) -> tuple[np.ndarray, np.ndarray]:
    fpr, spro = np.asarray(fpr, dtype=np.float64), np.asarray(spro, dtype=np.float64)
    if not 0 < limit <= 1:
        raise ValueError(f"FPR limit must be in (0, 1], got {limit}")
    if fpr.shape != spro.shape or fpr.ndim != 1 or fpr.size < 2:
        raise ValueError(f"fpr and spro must be 1-D of equal length >= 2, got {fpr.shape} and {spro.shape}")
    if fpr[0] != 0 or fpr[-1] != 1 or np.any(np.diff(fpr) < 0):
        raise ValueError("fpr must rise from 0 to 1")
    return fpr, spro


def au_spro(fpr: np.ndarray, spro: np.ndarray, limit: float) -> float:
    """Area under the sPRO curve for FPR in [0, limit], divided by limit (1.0 = perfect)."""
    fpr, spro = _validated_curve(fpr, spro, limit)
    inside = int(np.searchsorted(fpr, limit, side="right"))  # points with fpr <= limit
    area = trapezoid(fpr[:inside], spro[:inside])
    x0, y0 = fpr[inside - 1], spro[inside - 1]
    if x0 < limit:  # the curve crosses the limit inside segment [inside-1, inside]
        x1, y1 = fpr[inside], spro[inside]
        y_limit = y0 + (y1 - y0) * (limit - x0) / (x1 - x0)
        area += 0.5 * (y0 + y_limit) * (limit - x0)
    return area / limit


def au_spro_error_bound(fpr: np.ndarray, spro: np.ndarray, limit: float) -> float:
    """Largest possible |AU-sPRO(this curve) - AU-sPRO(exact curve)| from bucketing.

    Between two points the exact curve is monotone inside their bounding box, so the chord
    misses at most half the box (a full segment) or the whole clipped box (the segment at
    the limit). It is a bound, not an estimate: it stays positive even where bucketing lost nothing.
    """
    fpr, spro = _validated_curve(fpr, spro, limit)
    x0, x1, rise = fpr[:-1], fpr[1:], np.diff(spro)
    full = x1 <= limit
    crossing = (x0 < limit) & ~full
    bound = 0.5 * np.sum((x1 - x0)[full] * rise[full]) + np.sum((limit - x0[crossing]) * rise[crossing])
    return float(bound / limit)


class SPROByType:
    """Streaming per-anomaly-type sPRO curves: each type's images plus all good images."""

    def __init__(self, dropped_bits: int = DEFAULT_DROPPED_BITS) -> None:
        self.dropped_bits = dropped_bits
        self._by_type: dict[str, SPROCurve] = {}

    def add(self, image: ImageMaps) -> None:
        if not image.anomaly_type:
            raise ValueError(f"{_image_label(image)}: anomaly_type is needed for per-type sPRO")
        self._by_type.setdefault(image.anomaly_type, SPROCurve(self.dropped_bits)).add(image)

    def curves(self) -> dict[str, SPROCurve]:
        """Result key ("logical", "structural", MVTec AD type) -> curve of good + that type."""
        types = sorted(t for t in self._by_type if t != GOOD)
        if not types:
            raise ValueError("per-type sPRO needs anomalous test images; only 'good' ones were added")
        curves = {}
        for anomaly_type in types:
            curve = SPROCurve(self.dropped_bits)
            curve.merge(self._by_type[anomaly_type])
            if GOOD in self._by_type:
                curve.merge(self._by_type[GOOD])
            curves[type_key(anomaly_type)] = curve
        return curves

    def result(self, limits: Iterable[float] = AU_SPRO_LIMITS) -> dict[str, dict[str, float]]:
        """``{str(limit): {type key: AU-sPRO, ..., "mean": mean over types}}``."""
        curves = {key: curve.curve() for key, curve in self.curves().items()}
        result = {}
        for limit in limits:
            per_type = {key: au_spro(fpr, spro, limit) for key, (fpr, spro, _) in curves.items()}
            per_type["mean"] = float(np.mean(list(per_type.values())))
            result[str(float(limit))] = per_type
        return result


def au_spro_by_type(images: Iterable[ImageMaps], limits: Iterable[float] = AU_SPRO_LIMITS,
                    dropped_bits: int = DEFAULT_DROPPED_BITS, progress: bool = True) -> dict[str, dict[str, float]]:
    """AU-sPRO per anomaly type (good + that type's images) and their mean, for each limit.

    Keys: ``"0.05", "0.1", "0.3", "1.0"`` -> ``{"logical", "structural", "mean"}`` on LOCO.
    """
    by_type = SPROByType(dropped_bits)
    for image in tqdm(images, desc="sPRO by type", unit="image", disable=not progress, leave=False):
        by_type.add(image)
    return by_type.result(limits)


__all__ = [
    "AU_SPRO_LIMITS", "LOCO_TYPE_KEYS", "ImageMaps", "SPROByType", "SPROCurve", "au_spro", "au_spro_by_type",
    "au_spro_error_bound", "saturation_area", "spro_curve",
]
