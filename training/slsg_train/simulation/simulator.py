"""The anomaly simulator the trainer calls per sample: structural or logical, by configuration.

SLSG (arXiv 2305.00398) trains on normal images next to simulated anomalies with pixel
masks. ``AnomalySimulator`` picks the kind with ``logical_probability``, estimates the
object once per call (or takes a cached estimate) and returns a ``SimulatedAnomaly``.
It holds no global random state: everything is drawn from the ``rng`` passed in, so a
seed reproduces a sample exactly (also inside DataLoader workers).
"""

from __future__ import annotations

import numpy as np

from slsg_train.simulation.config import SimulatedAnomaly, SimulationConfig
from slsg_train.simulation.foreground import estimate_foreground
from slsg_train.simulation.logical import simulate_logical_anomaly
from slsg_train.simulation.structural import simulate_structural_anomaly
from slsg_train.simulation.textures import TextureBank

MIN_SIDE = 8  # smaller images cannot hold a blob of any meaning


def as_rgb_uint8(image: np.ndarray, name: str = "image") -> np.ndarray:
    """Check ``image`` is uint8 (H, W), (H, W, 1) or (H, W, 3) and return it as (H, W, 3)."""
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise ValueError(f"{name} must be uint8, got {image.dtype}")
    if image.ndim == 2:
        image = image[..., None]
    if image.ndim != 3 or image.shape[2] not in (1, 3):
        raise ValueError(f"{name} must have shape (H, W, 3) (or grey (H, W)), got {image.shape}")
    if min(image.shape[:2]) < MIN_SIDE:
        raise ValueError(f"{name} is {image.shape[0]}x{image.shape[1]}; both sides must be >= {MIN_SIDE}")
    return np.repeat(image, 3, axis=2) if image.shape[2] == 1 else image


class AnomalySimulator:
    """Draws one simulated anomaly per call; ``config`` should already be ``for_category(...)``."""

    def __init__(self, config: SimulationConfig, textures: TextureBank | None = None) -> None:
        self.config = config
        self.textures = textures if textures is not None else TextureBank.from_source(config.texture_source)

    def __call__(
        self,
        image: np.ndarray,
        rng: np.random.Generator,
        donor: np.ndarray | None = None,
        foreground: np.ndarray | None = None,
    ) -> SimulatedAnomaly:
        """Simulate on uint8 ``image`` (H, W, 3). ``donor``: another normal image of the same size.

        ``foreground`` (bool H, W) may be passed to reuse a cached estimate.
        """
        image = as_rgb_uint8(image)
        if donor is not None:
            donor = as_rgb_uint8(donor, "donor")
        if foreground is None:
            foreground = estimate_foreground(image, self.config.foreground)
        elif foreground.shape != image.shape[:2] or not foreground.any():
            raise ValueError(f"foreground must be a non-empty bool mask of shape {image.shape[:2]}, "
                             f"got shape {foreground.shape}")
        foreground = foreground.astype(bool, copy=False)
        if rng.random() < self.config.logical_probability:
            return simulate_logical_anomaly(image, rng, self.config, foreground, donor)
        return simulate_structural_anomaly(image, rng, self.textures, self.config, foreground)
