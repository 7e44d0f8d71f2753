"""Perlin gradient noise and the thresholded "blob" masks of DRAEM (Zavrtanik et al., ICCV 2021).

DRAEM draws noise with ``2**k`` lattice cells per axis, rotates the noise image and keeps
the pixels above a threshold. Here the rotation is applied to the sampling coordinates
instead of the rendered image, so any image size (square or not) works and there are no
empty corners, at the cost of one matrix product. Values follow DRAEM's scaling
(``sqrt(2) * lerp(...)``, roughly in [-1, 1]) so its thresholds (0.5, 0.4) keep their meaning.
"""

from __future__ import annotations

import math

import numpy as np


def _fade(t: np.ndarray) -> np.ndarray:
    return t * t * t * (t * (t * 6.0 - 15.0) + 10.0)


def perlin_noise(
    shape: tuple[int, int],
    res: tuple[float, float],
    rng: np.random.Generator,
    angle_deg: float = 0.0,
) -> np.ndarray:
    """Gradient noise of ``shape`` (H, W) with ``res`` (cells along H, cells along W), float32.

    The lattice is rotated by ``angle_deg`` around the image centre.
    """
    height, width = shape
    ys = (np.arange(height, dtype=np.float32) - (height - 1) / 2.0) * (res[0] / height)
    xs = (np.arange(width, dtype=np.float32) - (width - 1) / 2.0) * (res[1] / width)
    cos_a, sin_a = math.cos(math.radians(angle_deg)), math.sin(math.radians(angle_deg))
    # Coordinates in lattice units, rotated; (H, W) each.
    u = cos_a * xs[None, :] - sin_a * ys[:, None]
    v = sin_a * xs[None, :] + cos_a * ys[:, None]
    u0, v0 = np.floor(u), np.floor(v)
    fu, fv = u - u0, v - v0
    iu = (u0 - u0.min()).astype(np.intp)
    iv = (v0 - v0.min()).astype(np.intp)
    cols = int(iu.max()) + 2
    angles = rng.uniform(0.0, 2.0 * math.pi, size=(int(iv.max()) + 2) * cols)
    grad_u, grad_v = np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)
    flat = iv * cols + iu  # one flat lattice index, so each corner is a cheap np.take

    def corner(offset: int, du: int, dv: int) -> np.ndarray:
        index = flat + offset if offset else flat
        return np.take(grad_u, index) * (fu - du) + np.take(grad_v, index) * (fv - dv)

    n00, n01 = corner(0, 0, 0), corner(1, 1, 0)
    n10, n11 = corner(cols, 0, 1), corner(cols + 1, 1, 1)
    wu, wv = _fade(fu), _fade(fv)
    top = n00 + wu * (n01 - n00)
    bottom = n10 + wu * (n11 - n10)
    return (math.sqrt(2.0) * (top + wv * (bottom - top))).astype(np.float32)


def fractal_noise(
    shape: tuple[int, int],
    res: tuple[float, float],
    rng: np.random.Generator,
    octaves: int = 4,
    persistence: float = 0.5,
) -> np.ndarray:
    """Sum of ``octaves`` Perlin layers, each twice the frequency and ``persistence`` the amplitude."""
    noise = np.zeros(shape, dtype=np.float32)
    amplitude, frequency = 1.0, 1.0
    for _ in range(octaves):
        noise += amplitude * perlin_noise(shape, (res[0] * frequency, res[1] * frequency), rng)
        amplitude *= persistence
        frequency *= 2.0
    return noise


def perlin_blob_mask(
    shape: tuple[int, int],
    rng: np.random.Generator,
    scale_range: tuple[int, int],
    threshold: float,
    max_rotation_deg: float = 90.0,
) -> np.ndarray:
    """DRAEM's anomaly blob: noise with ``2**randint(*scale_range)`` cells per axis, rotated, > threshold.

    The cell count is relative to the shorter image side, so blobs stay round-ish on
    non-square images. Returns bool (H, W).
    """
    height, width = shape
    short = min(height, width)
    scale_y = 2 ** int(rng.integers(scale_range[0], scale_range[1]))
    scale_x = 2 ** int(rng.integers(scale_range[0], scale_range[1]))
    res = (scale_y * height / short, scale_x * width / short)
    angle = float(rng.uniform(-max_rotation_deg, max_rotation_deg))
    return perlin_noise(shape, res, rng, angle) > threshold


def minimum_mask_area(shape: tuple[int, int], fraction: float) -> int:
    """Pixels a mask must cover: ``fraction`` of the image area, at least 1."""
    return max(1, math.ceil(fraction * shape[0] * shape[1]))


def force_minimum_blob(allowed: np.ndarray, rng: np.random.Generator, min_area: int) -> np.ndarray:
    """A disc inside ``allowed`` (bool H, W) covering at least ``min_area`` pixels (or all of ``allowed``).

    Used when random blobs keep missing the object; the disc is centred on an allowed pixel and
    grown until it is large enough.
    """
    ys, xs = np.nonzero(allowed)
    if ys.size == 0:
        raise ValueError("force_minimum_blob: the allowed region is empty")
    pick = int(rng.integers(ys.size))
    cy, cx = int(ys[pick]), int(xs[pick])
    yy, xx = np.ogrid[: allowed.shape[0], : allowed.shape[1]]
    dist2 = (yy - cy) ** 2 + (xx - cx) ** 2
    radius = math.sqrt(min_area / math.pi)
    while True:
        disc = (dist2 <= radius * radius) & allowed
        if disc.sum() >= min(min_area, ys.size):
            return disc
        radius *= 1.25
