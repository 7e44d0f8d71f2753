"""Generative pre-training of the encoder (SLSG idea 1).

The encoder learns, on normal images of one category, to restore an image from a copy whose
patches were partly blanked out and partly shuffled, so its features encode both the normal
appearance and where parts belong. A light decoder reads the deepest and a middle feature map.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from slsg_train.training.config import PretrainConfig


def _conv_bn_relu(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class RestorationDecoder(nn.Module):
    """Deepest map (stride s_d) + a stride-4-ish skip -> RGB at full size. Widths follow the encoder."""

    def __init__(self, channels: list[int], strides: list[int], width: int = 64):
        super().__init__()
        self.skip_index = min(range(len(strides)), key=lambda i: abs(strides[i] - 4))
        self.deep_stride, self.skip_stride = strides[-1], strides[self.skip_index]
        self.deep = _conv_bn_relu(channels[-1], width)
        self.fuse = _conv_bn_relu(width + channels[self.skip_index], width)
        self.refine = _conv_bn_relu(width, width // 2)
        self.to_rgb = nn.Conv2d(width // 2, 3, 1)

    def forward(self, features: list[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
        skip = features[self.skip_index]
        x = F.interpolate(self.deep(features[-1]), size=skip.shape[-2:], mode="bilinear", align_corners=False)
        x = self.fuse(torch.cat([x, skip], dim=1))
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        return self.to_rgb(self.refine(x))


def corrupt_patches(images: torch.Tensor, cfg: PretrainConfig, generator: torch.Generator) -> torch.Tensor:
    """Blank ``mask_ratio`` of the patches and permute ``shuffle_ratio`` of them (per image)."""
    b, c, h, w = images.shape
    p = max(4, round(cfg.patch_size * h / 256))
    while h % p or w % p:  # a patch size that tiles the image
        p -= 1
    gh, gw = h // p, w // p
    patches = images.reshape(b, c, gh, p, gw, p).permute(0, 2, 4, 1, 3, 5).reshape(b, gh * gw, c, p, p).clone()
    n = gh * gw
    n_shuffle, n_mask = int(round(cfg.shuffle_ratio * n)), int(round(cfg.mask_ratio * n))
    for i in range(b):  # a handful of images per step: the loop is over the batch, not over pixels
        order = torch.randperm(n, generator=generator)
        if n_shuffle > 1:
            chosen = order[:n_shuffle]
            patches[i, chosen] = patches[i, chosen[torch.randperm(n_shuffle, generator=generator)]]
        if n_mask:
            patches[i, order[n_shuffle:n_shuffle + n_mask]] = 0.0  # 0 = the ImageNet mean after normalisation
    return patches.reshape(b, gh, gw, c, p, p).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)


def restoration_loss(restored: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.l1_loss(restored, target) + F.mse_loss(restored, target)


class RestorationModel(nn.Module):
    """Encoder + light decoder: corrupted image -> restored image (one module so DDP can wrap it)."""

    def __init__(self, encoder: nn.Module, decoder: RestorationDecoder):
        super().__init__()
        self.encoder, self.decoder = encoder, decoder

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x), x.shape[-2:])
