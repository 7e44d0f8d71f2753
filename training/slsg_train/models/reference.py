"""The reference checks beside SLSG's learned map, behind one interface: a frozen ImageNet encoder
they share, the base class :class:`Check`, and the mapping that puts a check's raw score on the
local score's scale.

A check is fitted after SLSG's training, not by SLSG's optimiser: :meth:`Check.collect` takes what
it needs from each batch of training images, :meth:`Check.fit` fits it from that, and
:meth:`Check.fit_scale` standardises its image score on the calibration images together with the
local score (in logit space), so a raw score as unusual as a local score becomes the same
probability and the two can be combined with a plain max: the paper's score stays a floor. A *map*
check gives a [B, 1, h, w] patch grid, fused into the anomaly map by a pixelwise max; an *image*
check gives one number per image, fused into the image score. ``training/calibration.py`` fits the
model's checks in one loop; ``slsg.py`` lists the check types (``CHECK_TYPES``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .backbones import PADDING_SAME, WeightsArg, create_backbone

LOGIT_EPS = 1e-6  # local scores are probabilities; keep their logits finite
# a local score that barely varies on the calibration images (a barely trained or saturated model)
# would squash every check onto one value; trained models measured 1.3-1.7
LOGIT_STD_FLOOR = 0.5
MAP, IMAGE = "map", "image"  # a check's kind: fused into the anomaly map, or into the image score only


class ReferenceEncoder(nn.Module):
    """A frozen ImageNet backbone: image [B, 3, H, W] -> its stage maps, shallow to deep.

    Its own copy: the SLSG encoder may have been re-trained by generative pre-training, and those
    features separate normal from abnormal images less well than ImageNet's (cable: 0.70 vs 0.83).
    ``padding``: how its strided convolutions pad (``backbones.PADDINGS``); ``"same"`` is how the
    ImageNet weights were trained, ``"symmetric"`` what checkpoints before the choice were fitted with.
    """

    def __init__(self, backbone: str, weights: WeightsArg, allow_download: bool = False,
                 padding: str = PADDING_SAME) -> None:
        super().__init__()
        self.backbone = create_backbone(backbone, weights, allow_download, padding).requires_grad_(False).eval()
        # its stride-s patch i is centred on pixel s*i + s - 1 when it pads as SAME, else on s*i (resize_patches)
        self.centred_last = self.backbone.pads_same
        self.channels: list[int] = list(self.backbone.channels)
        self.strides: list[int] = list(self.backbone.strides)

    def train(self, mode: bool = True) -> ReferenceEncoder:
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
        raise ValueError(f"a check's scale needs >= 2 paired scores, got {d.size} and {logits.size}")
    return torch.tensor([d.mean(), max(d.std(), 1e-6), logits.mean(), max(logits.std(), LOGIT_STD_FLOOR)])


def local_log_odds(distance: Tensor, scale: Tensor, weight: float) -> Tensor:
    """A distance (any shape) mapped to the log-odds a local score as unusual would have (its
    probability is the sigmoid of that; the fusion works in log-odds, which do not round to 1)."""
    d_mean, d_std, l_mean, l_std = scale.unbind()
    return l_mean + l_std * weight * (distance - d_mean) / d_std


class CheckNotApplicable(Exception):
    """Raised by :meth:`Check.fit` when the normal images give the check nothing to model (the component
    check on a category without countable parts); the message says why. ``fit_checks`` then leaves the
    check out of the model, and training and the model card say so."""


@dataclass
class FitContext:
    """What a check's :meth:`Check.fit` may need beyond its collected features."""

    train_images: list[np.ndarray]  # uint8 [H, W, 3] frames at model size
    seed: int = 0
    progress: bool = True
    simulation: Any = None  # the run's SimulationConfig (None: default settings)
    precision: str = "fp32"  # a resolved precision for checks with training steps
    keep_trained: bool = False  # a check with training steps keeps its trained weights, refits the rest
    top_k: int | None = None  # the model's top-K (a check that scores its training images needs it)


class Check(nn.Module):
    """A reference check: the image [B, 3, H, W] (normalised) and the reference encoder's stage maps
    -> its raw score, a [B, 1, h, w] patch grid (``kind`` MAP) or [B] (``kind`` IMAGE).

    ``name`` is the model attribute, the state-dict prefix and the SLSGConfig switch that turns it
    on; ``raw_name`` names the raw score in fit reports (``distance_mean`` ...)."""

    name: ClassVar[str]
    kind: ClassVar[str]
    raw_name: ClassVar[str] = "score"
    # a MAP check on the reference encoder's grid: whether its patch i is centred on pixel s*i + s - 1
    # (the encoder pads as SAME) rather than s*i; see resize_patches
    centred_last: bool = False

    def __init__(self, weight: float) -> None:
        super().__init__()
        self.weight = weight
        self.register_buffer("scale", scale_buffer())
        self.register_buffer("fitted", torch.tensor(False))

    @classmethod
    def from_config(cls, config: Any, encoder: ReferenceEncoder) -> Check:
        """The unfitted check an SLSGConfig asks for, on the reference encoder's maps."""
        raise NotImplementedError

    def forward(self, x: Tensor, maps: list[Tensor]) -> Tensor:
        raise NotImplementedError

    def collect(self, x: Tensor, maps: list[Tensor]) -> Any:
        """What :meth:`fit` needs from one batch of training images (None: nothing)."""
        return None

    def fit(self, collected: list, context: FitContext) -> dict:
        """Fit from the :meth:`collect` results of every training batch; returns a report. Raises
        :class:`CheckNotApplicable` when the normal images give it nothing to model."""
        return {}

    def image_raw(self, raw: Tensor, size: tuple[int, int], top_k: int) -> Tensor:
        """[B]: the raw image score its scale is fitted on (a map check: top-K mean of its upsampled map)."""
        return image_score(resize_patches(raw, size, self.centred_last), top_k) if self.kind == MAP else raw

    def log_odds(self, raw: Tensor, size: tuple[int, int]) -> Tensor:
        """The raw score on the local score's scale, in log-odds: [B, 1, H, W] (MAP) or [B] (IMAGE)."""
        up = resize_patches(raw, size, self.centred_last) if self.kind == MAP else raw
        return local_log_odds(up, self.scale, self.weight)

    @torch.no_grad()
    def fit_scale(self, raw_scores: np.ndarray, local_scores: np.ndarray) -> None:
        """Standardise the check's raw image scores and the local scores of the same normal
        (calibration) images; marks the check fitted."""
        self.scale.copy_(fitted_scale(raw_scores, local_scores))
        self.fitted.fill_(True)

    def scale_report(self) -> dict:
        return {f"{self.raw_name}_mean": float(self.scale[0]), f"{self.raw_name}_std": float(self.scale[1])}


def image_score(prob_map: Tensor, k: int) -> Tensor:
    """Mean of the ``k`` largest pixels of each [B, 1, H, W] probability map -> [B]."""
    return top_k_pixels(prob_map, k).mean(dim=1)


def top_k_pixels(score_map: Tensor, k: int) -> Tensor:
    """[B, k]: the ``k`` largest pixels of each [B, 1, H, W] map."""
    pixels = score_map.flatten(1)
    if not 1 <= k <= pixels.shape[1]:
        raise ValueError(f"top-K must lie in [1, {pixels.shape[1]}] for a {tuple(score_map.shape[-2:])} map, got {k}")
    return pixels.topk(k, dim=1).values


def resize_patches(x: Tensor, size: tuple[int, int], centred_last: bool = False) -> Tensor:
    """Bilinear upsampling of a stride-s patch grid [B, C, h, w] to ``size`` = (s*h, s*w) that puts
    patch i where its receptive field is centred: on pixel s*i for a backbone that pads symmetrically
    (the last s - 1 pixels repeating the edge), on pixel s*i + s - 1 for one that pads as TensorFlow's
    SAME (``centred_last``; the first s - 1 pixels repeating the edge): each strided layer then reads
    pixels 2i .. 2i + 2, not 2i - 1 .. 2i + 1. Resizing as if patch i covered pixels
    s*i .. s*i + s - 1 put the peak 8 px down-right of a small stain on average (4.8 px with this),
    and this raised AU-sPRO@0.05 from 0.75 to 0.81 on tray and from 0.58 to 0.64 on cable."""
    (h, w), (height, width) = x.shape[-2:], size
    sy, sx = height // h, width // w
    if sy * h != height or sx * w != width:
        raise ValueError(f"cannot upsample a {h}x{w} patch grid to {height}x{width}: not a whole stride")
    x = F.interpolate(x, size=((h - 1) * sy + 1, (w - 1) * sx + 1), mode="bilinear", align_corners=True)
    pad = (sx - 1, 0, sy - 1, 0) if centred_last else (0, sx - 1, 0, sy - 1)
    return F.pad(x, pad, mode="replicate")


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, LOGIT_EPS, 1 - LOGIT_EPS)
    return np.log(p) - np.log1p(-p)
