"""A composition check beside SLSG's map: does each part go with the rest of the image?

Some logical rules join parts that look normal alone: on our synthetic cable the colour of the cable
must match the connectors' pin count. Neither SLSG's map, nor the patch memory (every patch has a
normal twin), nor pooled features (a mismatch mixes two normal images' statistics) saw it: 0.68 image
AUROC on that defect. An autoencoder that rebuilds the reference encoder's stride-16 features of the
whole image from a 16-number code can only draw images it has learnt, where colour and pin count go
together; the part that breaks the rule is rebuilt as the rule says, and its features differ there
(EfficientAD's logical branch, Batzner et al. 2024). It is trained after SLSG, on the training images
and the frozen reference features, in about 5 minutes on 2 CPU cores (in bfloat16). On our synthetic
data it took tray's swapped parts from 0.83 to 1.00 and cable's colour rule from 0.68 to 0.76. A small code alone
does not force the rule (it has room for each part's look), so part of its training batches are
simulated rule breaks it learns to undo (``training/composition.py``).

The squared feature error per patch, less the training images' mean error at that place, is
upsampled onto the image, put on the local score's scale (``reference.py``) and fused into the map by
a pixelwise max, as the patch memory is. The per-place mean discounts what the autoencoder never draws
sharply on normal images either (the edges that move with the pose): on cable it took the check's
own logical image AUROC from 0.94 to 0.96-0.97 on two runs. Not in the paper.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .reference import MAP, Check, FitContext, ReferenceEncoder

INPUT_SIZE = 128  # the autoencoder sees every image at 128x128, whatever the model's input size
GRID = 16         # ... and draws a 16x16 feature grid, resized to the stride-16 grid of the input


def autoencoder_input(x: Tensor) -> Tensor:
    """A normalised batch [N, 3, H, W] at the autoencoder's 128x128 (identity when already that size)."""
    return F.interpolate(x, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False)


def on_grid(x: Tensor, size: tuple[int, int]) -> Tensor:
    """A map [B, C, h, w] resized bilinearly to the grid ``size`` (identity when already that size)."""
    return x if tuple(x.shape[-2:]) == size else F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def _down(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 4, stride=2, padding=1), nn.ReLU(inplace=True))


def _up(cin: int, cout: int, size: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(nn.Upsample(size=(size, size), mode="bilinear", align_corners=False),
                         nn.Conv2d(cin, cout, 3, padding=1), nn.ReLU(inplace=True), nn.Dropout(dropout))


class CompositionCheck(Check):
    """Image [B, 3, H, W] (normalised) and the reference encoder's maps -> squared error [B, 1, H/16, W/16]
    of the autoencoder's rebuilt features.

    ``steps`` and ``restoration``: its autoencoder's training steps and the share of simulated logical
    anomalies in its batches (see :meth:`fit`)."""

    name, kind, raw_name = "composition_check", MAP, "error"

    def __init__(self, channels: list[int], levels: int = 2, latent: int = 16, width: int = 64,
                 weight: float = 1.0, steps: int = 8000, restoration: float = 0.5) -> None:
        super().__init__(weight)
        if not 1 <= levels <= len(channels) or latent < 1 or width < 1 or weight <= 0:
            raise ValueError(f"composition check needs levels in [1, {len(channels)}], latent >= 1, width >= 1 "
                             f"and weight > 0; got {levels}, {latent}, {width}, {weight}")
        self.levels, self.steps, self.restoration = levels, steps, restoration
        dim = sum(channels[-levels:])
        # 128 -> 64 -> 32 -> 16 -> 8 -> 4, then one 4x4 convolution: the code sees the whole layout
        self.encoder = nn.Sequential(_down(3, width // 2), _down(width // 2, width // 2), _down(width // 2, width),
                                     _down(width, width), _down(width, width), nn.Conv2d(width, latent, 4))
        self.decoder = nn.Sequential(_up(latent, width, GRID // 4, 0.2), _up(width, width, GRID // 2, 0.2),
                                     _up(width, width, GRID, 0.0), nn.Conv2d(width, dim, 3, padding=1))
        self.register_buffer("feature_mean", torch.zeros(1, dim, 1, 1))
        self.register_buffer("feature_std", torch.ones(1, dim, 1, 1))
        # the training images' mean squared error per place of the GRID x GRID grid (zero: no baseline)
        self.register_buffer("normal_error", torch.zeros(1, 1, GRID, GRID))
        # trained on its own after SLSG (train_composition_check): never by SLSG's optimiser, nor DDP's
        self.requires_grad_(False)

    @classmethod
    def from_config(cls, config, encoder: ReferenceEncoder) -> CompositionCheck:
        check = cls(encoder.channels, config.composition_levels, config.composition_latent,
                    weight=config.composition_weight, steps=config.composition_steps,
                    restoration=config.composition_restoration)
        check.centred_last = encoder.centred_last  # its error map is the encoder's stride-16 grid
        return check

    @property
    def dim(self) -> int:
        return self.feature_mean.shape[1]

    def features(self, maps: list[Tensor]) -> Tensor:
        """[B, dim, h, w]: the last ``levels`` stage maps on the deepest one's grid, shallower ones
        averaged down (each stage halves the resolution)."""
        maps = maps[-self.levels:]
        depth = len(maps) - 1
        return torch.cat([F.avg_pool2d(m, 2 ** (depth - i)) if i < depth else m for i, m in enumerate(maps)], dim=1)

    def standardised(self, features: Tensor) -> Tensor:
        """:meth:`features` standardised per channel with the training images' statistics: the targets."""
        return (features - self.feature_mean) / self.feature_std

    def rebuild(self, x: Tensor, size: tuple[int, int]) -> Tensor:
        """The features the autoencoder draws for image ``x``, on a grid of ``size``."""
        return on_grid(self.decoder(self.encoder(autoencoder_input(x))), size)

    def squared_error(self, x: Tensor, features: Tensor) -> Tensor:
        """[B, 1, h, w]: the squared error per patch, averaged over channels, of the features drawn
        for image ``x`` against its :meth:`features`."""
        target = self.standardised(features)
        return ((self.rebuild(x, tuple(target.shape[-2:])) - target) ** 2).mean(dim=1, keepdim=True)

    def forward(self, x: Tensor, maps: list[Tensor]) -> Tensor:
        """[B, 1, h, w]: the squared error less the normal images' error at the same place."""
        error = self.squared_error(x, self.features(maps))
        return error - on_grid(self.normal_error, tuple(error.shape[-2:]))

    def collect(self, x: Tensor, maps: list[Tensor]) -> tuple[Tensor, Tensor]:
        """(the batch's :func:`autoencoder_input`, its :meth:`features`), on the model's device."""
        return autoencoder_input(x), self.features(maps)

    def fit(self, collected: list[tuple[Tensor, Tensor]], context: FitContext) -> dict:
        """Train the autoencoder on the training images (``context.keep_trained``: keep the trained
        one), then its per-place normal error on them (a kept autoencoder's too: older ones have none)."""
        inputs, features = (torch.cat(part) for part in zip(*collected))
        report = {"kept": True} if context.keep_trained else self._train(inputs, features, context)
        self.fit_normal_error(inputs, features)
        return report

    def _train(self, inputs: Tensor, features: Tensor, context: FitContext) -> dict:
        """Its autoencoder's training, with simulated logical anomalies to undo when ``restoration`` > 0.
        The training loop lives with the other training code; imported here, where a fit asks for it."""
        from slsg_train.simulation.config import SimulationConfig
        from slsg_train.training.composition import (
            restoration_inputs,
            train_composition_check,
        )

        pool = (restoration_inputs(context.train_images, context.simulation or SimulationConfig(), context.seed,
                                   progress=context.progress) if self.restoration > 0 else None)
        return train_composition_check(self, inputs, features, self.steps, seed=context.seed,
                                       progress=context.progress, restoration=pool,
                                       restoration_share=self.restoration, precision=context.precision)

    @torch.no_grad()
    def fit_standardisation(self, features: Tensor) -> None:
        """Per-channel mean and std of the training images' :meth:`features` [N, dim, h, w]."""
        self.feature_mean.copy_(features.mean(dim=(0, 2, 3), keepdim=True))
        self.feature_std.copy_(features.std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-6))

    @torch.no_grad()
    def fit_normal_error(self, inputs: Tensor, features: Tensor, batch_size: int = 64) -> None:
        """The per-place mean of :meth:`squared_error` over the training images: ``inputs`` their
        :func:`autoencoder_input`, ``features`` their :meth:`features` [N, dim, h, w], on one device."""
        if len(inputs) < 1 or len(inputs) != len(features):
            raise ValueError(f"the composition check's normal error needs >= 1 image with features, "
                             f"got {len(inputs)} images and {len(features)} features")
        total = torch.zeros(1, 1, *features.shape[-2:], dtype=torch.float64, device=features.device)
        for i in range(0, len(inputs), batch_size):
            error = self.squared_error(inputs[i:i + batch_size], features[i:i + batch_size])
            total += error.sum(dim=0, keepdim=True).double()
        self.normal_error.copy_(on_grid((total / len(inputs)).float(), (GRID, GRID)))
