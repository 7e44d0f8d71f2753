"""What the reference checks beside SLSG's learned map share: a frozen ImageNet encoder, and the
mapping that puts a check's raw distance on the local score's scale.

The checks (``global_branch.py``, ``patch_memory.py``) are fitted in closed form after training,
not trained. Each one is standardised on the calibration images together with the local score (the
local score in logit space), so a distance as unusual as a local score becomes the same probability
and the two can be combined with a plain max: the paper's score stays a floor.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn

from .backbones import WeightsArg, create_backbone

LOGIT_EPS = 1e-6  # local scores are probabilities; keep their logits finite
# a local score that barely varies on the calibration images (a barely trained or saturated model)
# would squash every check onto one value; trained models measured 1.3-1.7
LOGIT_STD_FLOOR = 0.5


class ReferenceEncoder(nn.Module):
    """A frozen ImageNet backbone: image [B, 3, H, W] -> its stage maps, shallow to deep.

    Its own copy: the SLSG encoder may have been re-trained by generative pre-training, and those
    features separate normal from abnormal images less well than ImageNet's (cable: 0.70 vs 0.83).
    """

    def __init__(self, backbone: str, weights: WeightsArg, allow_download: bool = False) -> None:
        super().__init__()
        self.backbone = create_backbone(backbone, weights, allow_download).requires_grad_(False).eval()
        self.channels: list[int] = list(self.backbone.channels)

    def train(self, mode: bool = True) -> "ReferenceEncoder":
        super().train(mode)
        self.backbone.eval()  # keeps its ImageNet BatchNorm statistics
        return self

    def forward(self, x: Tensor) -> list[Tensor]:
        return self.backbone(x)


def scale_buffer() -> Tensor:
    """Standardisation on the calibration images: [distance mean, std, local-logit mean, std]."""
    return torch.tensor([0.0, 1.0, 0.0, 1.0])


def fitted_scale(distances: np.ndarray, local_scores: np.ndarray) -> Tensor:
    """The scale buffer's values for paired scores of the same normal (calibration) images."""
    d = np.asarray(distances, dtype=np.float64)
    logits = _logit(np.asarray(local_scores, dtype=np.float64))
    if d.size < 2 or d.size != logits.size:
        raise ValueError(f"a reference check's scale needs >= 2 paired scores, got {d.size} and {logits.size}")
    return torch.tensor([d.mean(), max(d.std(), 1e-6), logits.mean(), max(logits.std(), LOGIT_STD_FLOOR)])


def local_log_odds(distance: Tensor, scale: Tensor, weight: float) -> Tensor:
    """A distance (any shape) mapped to the log-odds a local score as unusual would have (its
    probability is the sigmoid of that; the fusion works in log-odds, which do not round to 1)."""
    d_mean, d_std, l_mean, l_std = scale.unbind()
    return l_mean + l_std * weight * (distance - d_mean) / d_std


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, LOGIT_EPS, 1 - LOGIT_EPS)
    return np.log(p) - np.log1p(-p)
