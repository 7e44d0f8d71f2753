"""Images as the models see them: decoded by the shared rule, resized with the model's filter,
ImageNet-normalised. Shared by training, evaluation, export and scoring."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from slsg.contract import IMAGENET_MEAN, IMAGENET_STD, RESIZE_BILINEAR, RESIZE_LANCZOS
from slsg_train.data.loco import load_rgb

_MEAN = np.asarray(IMAGENET_MEAN, np.float32) * 255
_STD = np.asarray(IMAGENET_STD, np.float32) * 255


_FILTERS = {RESIZE_BILINEAR: Image.BILINEAR, RESIZE_LANCZOS: Image.LANCZOS}


def resize_rgb(image: np.ndarray, size: tuple[int, int], resize: str = RESIZE_BILINEAR) -> np.ndarray:
    """uint8 HxWx3 -> uint8 at (H, W), aspect ratio ignored, with the model's ``resize`` filter
    (bilinear for our runs; LANCZOS for the authors' weights)."""
    h, w = size
    if image.shape[:2] == (h, w):
        return image
    if resize not in _FILTERS:
        raise ValueError(f"resize filter {resize!r} is not one of {', '.join(_FILTERS)}")
    return np.asarray(Image.fromarray(image).resize((w, h), _FILTERS[resize]))


def load_resized(paths: Sequence[Path], size: tuple[int, int], resize: str = RESIZE_BILINEAR) -> list[np.ndarray]:
    return [resize_rgb(load_rgb(p), size, resize) for p in paths]


def to_tensor(image: np.ndarray) -> torch.Tensor:
    """uint8 HxWx3 -> ImageNet-normalised float CHW."""
    return torch.from_numpy(((image.astype(np.float32) - _MEAN) / _STD).transpose(2, 0, 1).copy())
