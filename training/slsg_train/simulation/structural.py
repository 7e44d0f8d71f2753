"""Structural pseudo-anomalies as in DRAEM (Zavrtanik et al., ICCV 2021), used by SLSG.

A Perlin blob on the object is filled with an augmented texture:
``image*(1-m) + (1-beta)*texture*m + beta*image*m`` (beta is the share of the original kept).
"""

from __future__ import annotations

import numpy as np

from slsg_train.simulation.config import SimulatedAnomaly, SimulationConfig
from slsg_train.simulation.perlin import force_minimum_blob, minimum_mask_area, perlin_blob_mask
from slsg_train.simulation.textures import TextureBank, augment_texture


def draw_blob_on(
    foreground: np.ndarray,
    rng: np.random.Generator,
    scale_range: tuple[int, int],
    threshold: float,
    config: SimulationConfig,
) -> np.ndarray:
    """A Perlin blob restricted to ``foreground`` with at least the configured minimum area (bool H, W).

    Draws up to ``config.max_attempts`` blobs, then forces a disc.
    """
    min_area = minimum_mask_area(foreground.shape, config.min_mask_fraction)
    for _ in range(config.max_attempts):
        blob = perlin_blob_mask(foreground.shape, rng, scale_range, threshold, config.perlin_rotation)
        blob &= foreground
        if blob.sum() >= min_area:
            return blob
    return force_minimum_blob(foreground, rng, min_area)


def draw_structural_beta(rng: np.random.Generator, config: SimulationConfig) -> float:
    """The authors' rule: ``fixed_beta`` with ``fixed_beta_probability``, else uniform in ``beta_range``."""
    if rng.random() < config.fixed_beta_probability:
        return config.fixed_beta
    return float(rng.uniform(*config.beta_range))


def simulate_structural_anomaly(
    image: np.ndarray,
    rng: np.random.Generator,
    textures: TextureBank,
    config: SimulationConfig,
    foreground: np.ndarray,
) -> SimulatedAnomaly:
    """Blend an augmented texture into ``image`` (uint8 H, W, 3) inside a blob on ``foreground`` (bool H, W)."""
    height, width = image.shape[:2]
    blob = draw_blob_on(foreground, rng, config.perlin_scale_range, config.perlin_threshold, config)
    texture = augment_texture(textures.sample(rng, height, width), rng, config.texture_augmentations)
    beta = draw_structural_beta(rng, config)
    out = image.copy()
    blended = (1.0 - beta) * texture[blob].astype(np.float32) + beta * image[blob].astype(np.float32)
    out[blob] = blended.round().clip(0, 255).astype(np.uint8)
    return SimulatedAnomaly(image=out, mask=blob.astype(np.float32), kind="structural")
