"""Pseudo-anomaly simulation for SLSG training (arXiv 2305.00398): structural (DRAEM-style
Perlin blobs filled with augmented textures) and logical (rearranged normal content).

Numpy/scipy/scikit-image/Pillow only; no torch, so it runs in any DataLoader worker.
"""

from slsg_train.simulation.config import (
    LOCO_CATEGORY_OVERRIDES,
    ForegroundConfig,
    SimulatedAnomaly,
    SimulationConfig,
)
from slsg_train.simulation.foreground import estimate_foreground
from slsg_train.simulation.logical import simulate_logical_anomaly
from slsg_train.simulation.simulator import AnomalySimulator
from slsg_train.simulation.structural import simulate_structural_anomaly
from slsg_train.simulation.textures import TextureBank, augment_texture

__all__ = [
    "LOCO_CATEGORY_OVERRIDES",
    "AnomalySimulator",
    "ForegroundConfig",
    "SimulatedAnomaly",
    "SimulationConfig",
    "TextureBank",
    "augment_texture",
    "estimate_foreground",
    "simulate_logical_anomaly",
    "simulate_structural_anomaly",
]
