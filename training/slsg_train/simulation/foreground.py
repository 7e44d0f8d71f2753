"""A cheap object/foreground estimate so that simulated anomalies land on the product.

SLSG restricts its masks to the object where that is known (the authors threshold the
image per category, e.g. juice_bottle against its dark background). Here that becomes one
of two generic estimates chosen by configuration, with a fallback to the whole image when
the estimate is implausibly small.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from slsg_train.simulation.config import ForegroundConfig

_REFERENCE_SIDE = 256  # ForegroundConfig.dilation is given at this image size
_WORKING_SIDE = 128


def _border_pixels(image: np.ndarray) -> np.ndarray:
    """The outer ring of pixels (about 2% of the shorter side), (N, C)."""
    width = max(1, round(0.02 * min(image.shape[:2])))
    ring = [image[:width].reshape(-1, image.shape[2]), image[-width:].reshape(-1, image.shape[2]),
            image[:, :width].reshape(-1, image.shape[2]), image[:, -width:].reshape(-1, image.shape[2])]
    return np.concatenate(ring)


def _border_difference(image: np.ndarray, threshold: float) -> np.ndarray:
    background = np.median(_border_pixels(image), axis=0)
    # Per-channel look-up tables: far cheaper than an int16 difference image.
    far = np.abs(np.arange(256)[None, :] - background[:, None]) > threshold  # (C, 256)
    mask = far[0][image[..., 0]]
    for channel in range(1, image.shape[2]):
        mask |= far[channel][image[..., channel]]
    return mask


def _otsu(image: np.ndarray) -> np.ndarray:
    from skimage.filters import threshold_otsu

    grey = image.mean(axis=2)
    if grey.max() == grey.min():
        return np.zeros(grey.shape, dtype=bool)
    bright = grey > threshold_otsu(grey)
    border = _border_pixels(bright[..., None]).ravel()
    # The background is whichever side dominates the border.
    return ~bright if border.mean() > 0.5 else bright


def estimate_foreground(image: np.ndarray, config: ForegroundConfig) -> np.ndarray:
    """Bool (H, W) mask of the object in uint8 ``image`` (H, W, 3); all True when unknown."""
    if image.ndim != 3:
        raise ValueError(f"estimate_foreground needs an (H, W, C) image, got shape {image.shape}")
    height, width = image.shape[:2]
    if config.method == "none":
        return np.ones((height, width), dtype=bool)
    # Work at about 128 px: the estimate is coarse anyway (it is dilated) and morphology is costly.
    step = max(1, min(height, width) // _WORKING_SIDE)
    small = image[::step, ::step]
    raw = _border_difference(small, config.threshold) if config.method == "border_difference" else _otsu(small)
    # Drop single-pixel noise, close the object's interior, then grow it a little.
    mask = ndimage.binary_fill_holes(ndimage.binary_opening(raw))
    radius = round(config.dilation * min(height, width) / _REFERENCE_SIDE / step)
    if radius > 0:
        mask = ndimage.maximum_filter(mask, size=2 * radius + 1)
    if step > 1:
        mask = np.repeat(np.repeat(mask, step, axis=0), step, axis=1)[:height, :width]
    if mask.mean() < config.min_fraction:
        return np.ones((height, width), dtype=bool)
    return mask
