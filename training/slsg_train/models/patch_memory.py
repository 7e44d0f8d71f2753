"""A patch-memory check beside SLSG's learned map: how far each patch lies from every normal patch.

SLSG learns its map from simulated anomalies, and on a CPU budget (about 1000 steps at 256 px) it
misses defects the simulation rarely imitates: on our synthetic cable category its structural image
AUROC was 0.87. The ImageNet features of the normal images already describe every normal patch; a
patch far from all of them is anomalous whatever caused it (PatchCore, Roth et al. 2022). Measured
alone on the same 60-per-type test set, this check reached 0.998 structural on cable and 0.995 / 0.951
(structural / logical) on tray, with no training.

The memory holds ``size`` patch features of the training images (stride-8 features: the last
``levels`` stages resized to the shallowest of them), chosen by greedy k-centre coreset selection so
it covers every normal patch kind. Of tray's 82k patches, 2048 kept 0.991 / 0.944 (all: 0.995 / 0.951;
1024: 0.976 / 0.906).
The per-patch squared distance to the memory is upsampled to the image, put on the local score's
scale (``reference.py``) and combined with SLSG's probability map by a pixelwise max, so the map
shows where and the image score (top-K mean of that map) counts both. Not in the paper.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from .reference import MAP, Check, FitContext, ReferenceEncoder, resize_patches

__all__ = ["PatchMemoryBranch", "coreset", "resize_patches"]

PROJECTION_DIM = 128  # coreset selection compares random projections (Johnson-Lindenstrauss), as PatchCore


class PatchMemoryBranch(Check):
    """The reference encoder's stage maps -> squared distance [B, 1, h, w] of each patch to the memory."""

    name, kind, raw_name = "patch_memory", MAP, "distance"

    def __init__(self, channels: list[int], levels: int = 2, size: int = 2048, weight: float = 1.0) -> None:
        super().__init__(weight)
        if not 1 <= levels <= len(channels) or size < 1 or weight <= 0:
            raise ValueError(f"patch memory needs levels in [1, {len(channels)}], size >= 1 and weight > 0; "
                             f"got {levels}, {size}, {weight}")
        self.levels = levels
        self.register_buffer("memory", torch.zeros(size, sum(channels[-levels:])))

    @classmethod
    def from_config(cls, config, encoder: ReferenceEncoder) -> PatchMemoryBranch:
        branch = cls(encoder.channels, config.patch_memory_levels, config.patch_memory_size, config.patch_memory_weight)
        branch.centred_last = encoder.centred_last
        return branch

    @property
    def dim(self) -> int:
        return self.memory.shape[1]

    @property
    def size(self) -> int:
        return self.memory.shape[0]

    def patch_features(self, maps: list[Tensor]) -> Tensor:
        """[B, dim, h, w]: the last ``levels`` stage maps at the resolution of the shallowest of them.

        The deeper maps are resized as PatchCore does (corners not aligned), not with
        :func:`resize_patches`: on tray that convention here cost 0.02 logical image AUROC."""
        maps = maps[-self.levels:]
        size = tuple(maps[0].shape[-2:])
        return torch.cat([maps[0]] + [F.interpolate(m, size=size, mode="bilinear", align_corners=False)
                                       for m in maps[1:]], dim=1)

    def forward(self, x: Tensor, maps: list[Tensor]) -> Tensor:
        f = self.patch_features(maps)
        b, _, h, w = f.shape
        q = f.flatten(2).transpose(1, 2)  # [B, hw, dim]
        # the nearest memory patch by one matrix product (|m|^2 - 2 q.m; |q|^2 is the same for every m),
        # then its squared distance directly: the expanded form cancels terms ~3x the distance, so its
        # float32 rounding would scale with them. A near-tie in the choice is harmless: either
        # neighbour is about as far.
        nearest = ((self.memory * self.memory).sum(-1) - 2 * q @ self.memory.T).argmin(dim=-1)  # [B, hw]
        return ((q - self.memory[nearest]) ** 2).sum(-1).reshape(b, 1, h, w)

    def collect(self, x: Tensor, maps: list[Tensor]) -> Tensor:
        """[B*h*w, dim]: the batch's patch features, on the CPU."""
        return self.patch_features(maps).permute(0, 2, 3, 1).flatten(0, 2).cpu()

    def fit(self, collected: list[Tensor], context: FitContext) -> dict:
        feats = torch.cat(collected)
        kept = self.fit_memory(feats, context.seed, context.progress)
        return {"candidates": int(feats.shape[0]), "kept": kept, "feature_dim": self.dim}

    @torch.no_grad()
    def fit_memory(self, patches: Tensor, seed: int = 0, progress: bool = True) -> int:
        """Fill the memory from the training images' patch features [N, dim] by greedy coreset
        selection; with fewer than ``size`` patches it keeps them all (repeats fill the rest,
        which the nearest-distance ignores). Returns how many distinct patches it kept."""
        if patches.ndim != 2 or patches.shape[1] != self.dim or patches.shape[0] < 1:
            raise ValueError(f"patch memory needs features of shape (N >= 1, {self.dim}), got {tuple(patches.shape)}")
        # on the memory's device: each greedy step reads every candidate (358k at 256 px from 350
        # images), at the GPU's memory bandwidth rather than the host's where there is one
        chosen = coreset(patches.to(self.memory.device), self.size, seed, progress)
        picked = chosen.repeat((self.size + chosen.numel() - 1) // chosen.numel())[:self.size]
        self.memory.copy_(patches[picked].to(self.memory))
        return chosen.numel()


def coreset(points: Tensor, size: int, seed: int = 0, progress: bool = True) -> Tensor:
    """Indices of up to ``size`` points chosen greedily, each the farthest from those already chosen
    (k-centre), compared in a seeded random projection to ``PROJECTION_DIM`` dimensions."""
    n = points.shape[0]
    if n <= size:
        return torch.arange(n)
    x = points.float()
    if x.shape[1] > PROJECTION_DIM:
        g = torch.Generator().manual_seed(seed)
        x = x @ (torch.randn(x.shape[1], PROJECTION_DIM, generator=g) / PROJECTION_DIM ** 0.5).to(x)
    norms = (x * x).sum(1)

    def distance_to(i: int) -> Tensor:  # |x - x_i|^2 by one matrix-vector product
        return norms - 2 * (x @ x[i]) + norms[i]

    chosen = [int(torch.randint(n, (1,), generator=torch.Generator().manual_seed(seed)))]
    nearest = distance_to(chosen[0])
    for _ in tqdm(range(size - 1), desc="patch memory coreset", unit="patch", disable=not progress, leave=False,
                  mininterval=1.0):
        i = int(nearest.argmax())
        chosen.append(i)
        nearest = torch.minimum(nearest, distance_to(i))
    return torch.tensor(chosen)
