"""A global check beside SLSG's local map: how far an image's pooled features lie from the normal images.

SLSG scores an image by the top of its anomaly map, and the map is local: an image whose every part
looks normal but whose combination breaks a rule scores low (a cable whose colour does not match the
connectors' pin count, a cable missing altogether; the paper's weakest categories, screw_bag and
splicing_connectors, are of this kind). This branch pools a frozen ImageNet encoder's last stages
over the whole image (mean and max per channel) and measures the Mahalanobis distance of that vector
to the Gaussian of the training images, PaDiM-style but per image. Not in the paper; off by default.

The distance is put on the local score's scale (both standardised on the calibration images, the
local score in logit space) and the image score is the larger of the two, so the local score keeps
its meaning and a clear global outlier can still raise an image above the threshold.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn

from .backbones import WeightsArg, create_backbone

LOGIT_EPS = 1e-6  # local scores are probabilities; keep their logits finite


class GlobalFeatureBranch(nn.Module):
    """Image [B, 3, H, W] (ImageNet-normalised) -> Mahalanobis distance [B] to the normal images."""

    def __init__(self, backbone: str, weights: WeightsArg, allow_download: bool = False, levels: int = 2,
                 weight: float = 1.0, shrinkage: float = 0.1) -> None:
        super().__init__()
        if levels < 1 or weight <= 0 or not 0 < shrinkage <= 1:
            raise ValueError(f"global branch needs levels >= 1, weight > 0 and shrinkage in (0, 1]; "
                             f"got {levels}, {weight}, {shrinkage}")
        # Its own frozen copy: the SLSG encoder may have been re-trained by generative pre-training,
        # and its pooled features separate normal from abnormal images less well than ImageNet's.
        self.encoder = create_backbone(backbone, weights, allow_download).requires_grad_(False).eval()
        self.levels, self.weight, self.shrinkage = levels, weight, shrinkage
        dim = 2 * sum(self.encoder.channels[-levels:])
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("whitening", torch.eye(dim))  # W with W W^T = inverse covariance
        # standardisation on the calibration images: distance mean/std, local-score logit mean/std
        self.register_buffer("scale", torch.tensor([0.0, 1.0, 0.0, 1.0]))
        self.register_buffer("fitted", torch.tensor(False))

    def train(self, mode: bool = True) -> "GlobalFeatureBranch":
        super().train(mode)
        self.encoder.eval()  # frozen: keeps its ImageNet BatchNorm statistics
        return self

    @property
    def dim(self) -> int:
        return self.mean.numel()

    def features(self, x: Tensor) -> Tensor:
        """[B, dim]: per-channel mean and max of the last ``levels`` encoder stages."""
        maps = self.encoder(x)[-self.levels:]
        return torch.cat([m.mean(dim=(2, 3)) for m in maps] + [m.amax(dim=(2, 3)) for m in maps], dim=1)

    def forward(self, x: Tensor) -> Tensor:
        return ((self.features(x) - self.mean) @ self.whitening).norm(dim=1)

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

    @torch.no_grad()
    def fit_scale(self, distances: np.ndarray, local_scores: np.ndarray) -> None:
        """Standardise both scores on the same normal (calibration) images; marks the branch fitted."""
        d = np.asarray(distances, dtype=np.float64)
        logits = _logit(np.asarray(local_scores, dtype=np.float64))
        if d.size < 2 or d.size != logits.size:
            raise ValueError(f"global branch scale needs >= 2 paired scores, got {d.size} and {logits.size}")
        self.scale.copy_(torch.tensor([d.mean(), max(d.std(), 1e-6), logits.mean(), max(logits.std(), 1e-6)]))
        self.fitted.fill_(True)

    def combine(self, local_score: Tensor, distance: Tensor) -> Tensor:
        """max(local score, distance mapped onto the local score's scale) -> [B]."""
        d_mean, d_std, l_mean, l_std = self.scale.unbind()
        z = (distance - d_mean) / d_std
        return torch.maximum(local_score, torch.sigmoid(l_mean + l_std * self.weight * z))


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, LOGIT_EPS, 1 - LOGIT_EPS)
    return np.log(p) - np.log1p(-p)
