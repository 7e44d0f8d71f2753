"""Training the composition check's autoencoder (``models/composition.py``) after SLSG's training.

The targets are the frozen reference encoder's features of the training images, computed once; the
autoencoder sees each image at its 128x128 input with a random brightness (as EfficientAD's
autoencoder sees colour-jittered images), so it learns the layout rather than one exposure.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from slsg.contract import IMAGENET_MEAN, IMAGENET_STD
from slsg_train.models.composition import INPUT_SIZE, CompositionCheck
from slsg_train.training.dataset import to_tensor

BRIGHTNESS = 0.2  # the input's brightness factor is drawn from [1 - b, 1 + b]


def train_composition_check(check: CompositionCheck, encoder: torch.nn.Module, images: list[np.ndarray],
                            steps: int, device: torch.device | str = "cpu", batch_size: int = 16, lr: float = 1e-3,
                            seed: int = 0, progress: bool = True) -> dict:
    """Fit ``check``'s feature standardisation and train its autoencoder on ``images`` (uint8 HxWx3 of
    the model's input size) for ``steps`` Adam steps with a cosine schedule; leaves it in eval mode."""
    if not images or steps < 1:
        raise ValueError(f"the composition check needs >= 1 training image and >= 1 step, got {len(images)}, {steps}")
    inputs, targets = _inputs_and_targets(check, encoder, images, device)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)
    optimiser = torch.optim.Adam(check.parameters(), lr=lr, weight_decay=1e-5)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, steps)
    losses = []
    check.train().requires_grad_(True)
    try:
        with torch.enable_grad():
            bar = tqdm(range(steps), desc="composition check", unit="step", disable=not progress, mininterval=1.0)
            for _ in bar:
                pick = torch.randint(len(inputs), (min(batch_size, len(inputs)),), generator=generator)
                factor = (1 + BRIGHTNESS * (2 * torch.rand(len(pick), 1, 1, 1, generator=generator) - 1)).to(device)
                x = inputs[pick] * factor + mean / std * (factor - 1)  # the raw image scaled by factor, renormalised
                loss = F.mse_loss(check.rebuild(x, tuple(targets.shape[-2:])), targets[pick])
                optimiser.zero_grad(set_to_none=True)
                loss.backward()
                optimiser.step()
                schedule.step()
                losses.append(loss.item())
                bar.set_postfix(loss=f"{losses[-1]:.4f}", refresh=False)
    finally:
        check.eval().requires_grad_(False)
    tail = losses[-max(1, steps // 10):]
    return {"steps": steps, "images": len(images), "final_loss": float(np.mean(tail))}


@torch.no_grad()
def _inputs_and_targets(check: CompositionCheck, encoder: torch.nn.Module, images: list[np.ndarray],
                        device: torch.device | str, batch_size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """(autoencoder inputs [N, 3, 128, 128], standardised target features [N, dim, h, w]) on ``device``."""
    inputs, features = [], []
    for i in range(0, len(images), batch_size):
        x = torch.stack([to_tensor(im) for im in images[i:i + batch_size]]).to(device)
        features.append(check.features(encoder(x)))
        inputs.append(F.interpolate(x, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False))
    features = torch.cat(features)
    check.fit_standardisation(features)
    return torch.cat(inputs), (features - check.feature_mean) / check.feature_std
