"""Training the composition check's autoencoder (``models/composition.py``) after SLSG's training.

The targets are the frozen reference encoder's features of the training images, computed once (by the
caller's pass over them, which feeds the other checks too); the
autoencoder sees each image at its 128x128 input with a random brightness (as EfficientAD's
autoencoder sees colour-jittered images), so it learns the layout rather than one exposure.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from slsg.contract import IMAGENET_MEAN, IMAGENET_STD
from slsg_train.models.composition import CompositionCheck

BRIGHTNESS = 0.2  # the input's brightness factor is drawn from [1 - b, 1 + b]


def train_composition_check(check: CompositionCheck, inputs: torch.Tensor, features: torch.Tensor, steps: int,
                            batch_size: int = 16, lr: float = 1e-3, seed: int = 0, progress: bool = True) -> dict:
    """Fit ``check``'s feature standardisation and train its autoencoder for ``steps`` Adam steps with a
    cosine schedule; leaves it in eval mode. ``inputs``: the training images' :func:`autoencoder_input`;
    ``features``: their :meth:`CompositionCheck.features`, on the same device."""
    if len(inputs) < 1 or len(inputs) != len(features) or steps < 1:
        raise ValueError(f"the composition check needs >= 1 training image with features and >= 1 step, "
                         f"got {len(inputs)} images, {len(features)} features, {steps} steps")
    check.fit_standardisation(features)
    targets, device = check.standardised(features), inputs.device
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
    return {"steps": steps, "images": len(inputs), "final_loss": float(np.mean(tail))}
