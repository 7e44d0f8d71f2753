"""Small building blocks of the SLSG network (arXiv 2305.00398): conv-BN-ReLU, the large-kernel
spatial attention on the skip features, and one U-Net decoder stage."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def resize_to(x: Tensor, size: tuple[int, int] | torch.Size) -> Tensor:
    """Bilinear resize with aligned corners, as the authors' ``nn.Upsample`` layers."""
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=True)


def resize_by_doubling(x: Tensor, size: tuple[int, int] | torch.Size) -> Tensor:
    """Upsample by successive x2 steps (aligned corners) while a step fits in ``size``, then
    :func:`resize_to` the rest: the authors' repeated ``nn.Upsample(scale_factor=2)`` of the
    auxiliary map. With aligned corners two x2 steps are not one x4 step."""
    height, width = int(size[0]), int(size[1])
    while 2 * x.shape[-2] <= height and 2 * x.shape[-1] <= width:
        x = resize_to(x, (2 * x.shape[-2], 2 * x.shape[-1]))
    return x if tuple(x.shape[-2:]) == (height, width) else resize_to(x, (height, width))


class ConvBNReLU(nn.Sequential):
    """3x3 (by default) convolution, batch norm, ReLU; the unit of the decoder and auxiliary head."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int = 3) -> None:
        super().__init__(
            nn.Conv2d(in_channels, out_channels, kernel, padding=kernel // 2),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )


class SpatialAttention(nn.Module):
    """Large-kernel attention on a skip feature (the Visual-Attention-Network "LKA" idea).

    attention = 1x1(depth-wise dilated kxk(depth-wise 3x3(x))); y = 1x1(ReLU(x * attention)) + x.
    With k=3 and dilation 3 the receptive field is 9x9 at a fraction of a dense conv's cost.
    Shape: [B, C, H, W] -> [B, C, H, W].
    """

    def __init__(self, channels: int, kernel: int = 3, dilation: int = 3) -> None:
        super().__init__()
        self.depthwise = nn.Conv2d(channels, channels, 3, padding=1, groups=channels)
        self.depthwise_dilated = nn.Conv2d(
            channels, channels, kernel, padding=(kernel - 1) * dilation // 2, groups=channels, dilation=dilation
        )
        self.pointwise = nn.Conv2d(channels, channels, 1)
        self.act = nn.ReLU()
        self.proj = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        attention = self.pointwise(self.depthwise_dilated(self.depthwise(x)))
        return self.proj(self.act(x * attention)) + x


class DecoderStage(nn.Module):
    """One U-Net stage: (upsample to the skip's size +) conv-BN-ReLU, concatenate the skip (and an
    optional extra map, e.g. the auxiliary head's features), then ``num_convs`` conv-BN-ReLU.
    ``extra_by_doubling``: bring the extra map to size by successive x2 steps (:func:`resize_by_doubling`).

    Shapes: x [B, in, h, w], skip [B, skip, H, W], extra [B, extra, H', W'] -> [B, out, H, W].
    """

    def __init__(
        self,
        in_channels: int,
        up_channels: int,
        skip_channels: int,
        out_channels: int,
        num_convs: int = 2,
        extra_channels: int = 0,
        upsample: bool = True,
        extra_by_doubling: bool = False,
    ) -> None:
        super().__init__()
        self.extra_by_doubling = extra_by_doubling
        if num_convs < 1:
            raise ValueError(f"a decoder stage needs at least one conv, got num_convs={num_convs}")
        self.upsample = upsample
        self.extra_channels = extra_channels
        self.up = ConvBNReLU(in_channels, up_channels)
        joined = up_channels + skip_channels + extra_channels
        self.fuse = nn.Sequential(
            *[ConvBNReLU(joined if i == 0 else out_channels, out_channels) for i in range(num_convs)]
        )

    def forward(self, x: Tensor, skip: Tensor, extra: Tensor | None = None) -> Tensor:
        if self.upsample:
            x = resize_to(x, skip.shape[-2:])
        parts = [self.up(x), skip]
        if self.extra_channels:
            if extra is None:
                raise ValueError("this decoder stage was built to receive an extra (auxiliary) map")
            resize = resize_by_doubling if self.extra_by_doubling else resize_to
            parts.append(resize(extra, skip.shape[-2:]))
        return self.fuse(torch.cat(parts, dim=1))
