"""The model input size that fits a category's images: their aspect ratio within a pixel budget.

A long thin part (a 500x1250 strip) squashed into 256x256 loses 60 % of its length's resolution and
gives the network shapes it never sees in the square ImageNet crops; a 160x416 input of the same
area keeps the part's proportions at the same cost. ``--image-size auto`` takes the median aspect
ratio (W / H, in log space, so 1:2 and 2:1 weigh alike) of the training images, solves
H x W = budget at that ratio, and rounds each side to the nearest multiple of 32: the encoders'
deepest stride (EfficientNet-Lite and ResNet-18 reach stride 32 / 16; the graph runs on the stride-16
grid, so a 32-multiple gives whole grid cells at every stage). Square images give exactly
``budget_side`` x ``budget_side`` (256 x 256 by default, the fixed size before), so square
categories train as before. Only image headers are read.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from slsg_train.data.loco import image_size

AUTO = "auto"
DEFAULT_BUDGET_SIDE = 256  # the pixel budget is this side squared: the square default's cost
SIDE_MULTIPLE = 32         # every side a multiple of the encoders' deepest stride
MAX_ASPECT = 16.0          # a cap: at 256^2 the short side keeps 64 px (two stride-32 cells)


@dataclass(frozen=True)
class InputSizeChoice:
    """What ``auto`` chose and from what: ``size`` is (H, W)."""

    size: tuple[int, int]
    median_aspect: float      # W / H of the training images (median in log space)
    budget_pixels: int
    images: int
    distinct_sizes: int

    def describe(self) -> str:
        h, w = self.size
        return (f"input size auto: {w}x{h} (WxH) from the median aspect ratio {self.median_aspect:.2f} (W/H) of "
                f"{self.images} training images ({self.distinct_sizes} distinct sizes) within "
                f"{self.budget_pixels} pixels ({math.isqrt(self.budget_pixels)}^2)")

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "size": list(self.size)}


def parse_auto(text: str) -> int | None:
    """Budget side of ``auto`` (default 256) or ``auto:N`` (an N x N pixel budget); None if not auto."""
    text = str(text).strip().lower()
    if text == AUTO:
        return DEFAULT_BUDGET_SIDE
    if not text.startswith(AUTO + ":"):
        return None
    side = text[len(AUTO) + 1:]
    if not side.isdigit() or int(side) < SIDE_MULTIPLE:
        raise ValueError(f"image size {text!r}: expected 'auto' or 'auto:N' with a budget side N >= {SIDE_MULTIPLE}")
    return int(side)


def _round_side(value: float) -> int:
    return max(SIDE_MULTIPLE, SIDE_MULTIPLE * round(value / SIDE_MULTIPLE))


def input_size_for_aspect(aspect: float, budget_side: int = DEFAULT_BUDGET_SIDE) -> tuple[int, int]:
    """(H, W), multiples of 32, of about ``budget_side``^2 pixels at width / height ``aspect``."""
    if not (aspect > 0 and math.isfinite(aspect)):
        raise ValueError(f"aspect ratio must be positive and finite, got {aspect}")
    aspect = min(max(aspect, 1 / MAX_ASPECT), MAX_ASPECT)
    budget = budget_side * budget_side
    return _round_side(math.sqrt(budget / aspect)), _round_side(math.sqrt(budget * aspect))


def choose_input_size(sizes: Sequence[tuple[int, int]], budget_side: int = DEFAULT_BUDGET_SIDE) -> InputSizeChoice:
    """The input size for images of these (H, W) sizes; see the module docstring."""
    if not sizes:
        raise ValueError("choosing an input size needs at least one training image")
    hw = np.asarray(sizes, dtype=np.float64)
    if hw.ndim != 2 or hw.shape[1] != 2 or (hw <= 0).any():
        raise ValueError(f"image sizes must be positive (H, W) pairs, got {sizes[:3]}...")
    aspect = float(np.exp(np.median(np.log(hw[:, 1] / hw[:, 0]))))
    return InputSizeChoice(input_size_for_aspect(aspect, budget_side), round(aspect, 4), budget_side * budget_side,
                           len(sizes), len({tuple(s) for s in sizes}))


def choose_input_size_for(paths: Sequence[Path], budget_side: int = DEFAULT_BUDGET_SIDE) -> InputSizeChoice:
    """:func:`choose_input_size` from the images' file headers."""
    return choose_input_size([image_size(Path(p)) for p in paths], budget_side)
