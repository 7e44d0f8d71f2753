"""A global check beside SLSG's local map: how far an image's pooled features lie from the normal images.

SLSG scores an image by the top of its anomaly map, and the map is local: an image whose every part
looks normal but whose combination breaks a rule scores low (a cable whose colour does not match the
connectors' pin count, a cable missing altogether; the paper's weakest categories, screw_bag and
splicing_connectors, are of this kind). This branch pools a frozen ImageNet encoder's last stages
over the whole image (mean and max per channel) and measures the Mahalanobis distance of that vector
to the Gaussian of the training images, PaDiM-style but per image. Not in the paper; off by default.

The distance is put on the local score's scale (``reference.py``) and the image score is the larger
of the two, so the local score keeps its meaning and a clear global outlier can still raise an image
above the threshold. The features come from the frozen reference encoder the model owns.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from .reference import IMAGE, Check, FitContext, ReferenceEncoder


class GlobalFeatureBranch(Check):
    """The reference encoder's stage maps -> Mahalanobis distance [B] of the image to the normal images."""

    name, kind, raw_name = "global_branch", IMAGE, "distance"

    def __init__(self, channels: list[int], levels: int = 2, weight: float = 1.0, shrinkage: float = 0.1) -> None:
        super().__init__(weight)
        if not 1 <= levels <= len(channels) or weight <= 0 or not 0 < shrinkage <= 1:
            raise ValueError(f"global branch needs levels in [1, {len(channels)}], weight > 0 and shrinkage in (0, 1]; "
                             f"got {levels}, {weight}, {shrinkage}")
        self.levels, self.shrinkage = levels, shrinkage
        dim = 2 * sum(channels[-levels:])
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("whitening", torch.eye(dim))  # W with W W^T = inverse covariance

    @classmethod
    def from_config(cls, config, encoder: ReferenceEncoder) -> GlobalFeatureBranch:
        return cls(encoder.channels, config.global_levels, config.global_weight, config.global_shrinkage)

    @property
    def dim(self) -> int:
        return self.mean.numel()

    def features(self, maps: list[Tensor]) -> Tensor:
        """[B, dim]: per-channel mean and max of the last ``levels`` stage maps."""
        maps = maps[-self.levels:]
        return torch.cat([m.mean(dim=(2, 3)) for m in maps] + [m.amax(dim=(2, 3)) for m in maps], dim=1)

    def forward(self, x: Tensor, maps: list[Tensor]) -> Tensor:
        return ((self.features(maps) - self.mean) @ self.whitening).norm(dim=1)

    def collect(self, x: Tensor, maps: list[Tensor]) -> Tensor:
        return self.features(maps).double().cpu()

    def fit(self, collected: list[Tensor], context: FitContext) -> dict:
        self.fit_normal(torch.cat(collected).numpy())
        return {"feature_dim": self.dim}

    @torch.no_grad()
    def fit_normal(self, features: np.ndarray) -> None:
        """The Gaussian of the training images' features [N, dim], its covariance shrunk toward a
        scaled identity (N is often smaller than dim)."""
        f = np.asarray(features, dtype=np.float64)
        if f.ndim != 2 or f.shape[1] != self.dim or f.shape[0] < 2:
            raise ValueError(f"global branch needs features of shape (N >= 2, {self.dim}), got {f.shape}")
        mean = f.mean(axis=0)
        cov = np.cov(f - mean, rowvar=False)
        cov = (1 - self.shrinkage) * cov + self.shrinkage * np.trace(cov) / self.dim * np.eye(self.dim)
        precision = np.linalg.inv(cov)
        whitening = np.linalg.cholesky((precision + precision.T) / 2)
        self.mean.copy_(torch.from_numpy(mean))
        self.whitening.copy_(torch.from_numpy(whitening))
