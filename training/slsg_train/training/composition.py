"""Training the composition check's autoencoder (``models/composition.py``) after SLSG's training.

The targets are the frozen reference encoder's features of the training images, computed once (by the
caller's pass over them, which feeds the other checks too); the
autoencoder sees each image at its 128x128 input with a random brightness (as EfficientAD's
autoencoder sees colour-jittered images), so it learns the layout rather than one exposure.

Part of each batch (``composition_restoration``) is a training image with a simulated logical anomaly
(one coloured part in another normal image's colour, or another normal image pasted in), and its
target is the clean image's features. EfficientAD trains its autoencoder on normal images only and
trusts the small code to redraw a broken rule as the rule says; ours learnt to draw a wrongly coloured
cable as it was. Taught to undo such changes, it infers a part from the rest: on cable (four runs,
seeds 0-3) the fused logical image AUROC went from 0.929 to 0.955 on average, tray's stayed 1.000. Not in
EfficientAD nor the paper.

Its training steps run in the run's precision, bfloat16 where the device has it: two thirds of the step
time on 2 CPU cores and no loss in the score it gives (README, "Composition check"). What it scores with
afterwards, its residual, is computed in float32.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from slsg.contract import IMAGENET_MEAN, IMAGENET_STD
from slsg_train.models.composition import CompositionCheck, autoencoder_input
from slsg_train.simulation.config import SimulationConfig
from slsg_train.simulation.foreground import estimate_foreground
from slsg_train.simulation.logical import simulate_logical_anomaly
from slsg_train.data.images import to_tensor
from slsg_train.training.precision import autocast

BRIGHTNESS = 0.2  # the input's brightness factor is drawn from [1 - b, 1 + b]
# Rule breaks the autoencoder learns to undo: parts of the product that are normal alone but not together.
# The other logical operations (grid shuffles, flips, colour jitter) move content it cannot put back, and
# taught to undo them it drew everything more blandly (cable's colour rule 0.99 -> 0.71 on one seed).
RESTORATION_OPS = {"donor_paste": 0.5, "part_recolour": 0.5}
RESTORATION_COPIES = 4  # simulated copies of each training image, drawn once before training


def restoration_inputs(images: list[np.ndarray], simulation: SimulationConfig, seed: int = 0,
                       copies: int = RESTORATION_COPIES, progress: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """``copies`` simulated logical anomalies of each training image (uint8 H, W, 3), at the autoencoder's
    input and in float16 (140 MB for 350 images): (inputs [N * copies, 3, 128, 128], the index of the
    training image each one came from [N * copies])."""
    if not images or copies < 1:
        raise ValueError(f"restoration inputs need >= 1 image and >= 1 copy, got {len(images)} and {copies}")
    config = dataclasses.replace(simulation, logical_ops=dict(RESTORATION_OPS))
    rng = np.random.default_rng(seed)
    inputs, sources = [], []
    for i in tqdm(range(len(images)), desc="composition check: simulating", unit="image", disable=not progress,
                  mininterval=1.0):
        foreground = estimate_foreground(images[i], config.foreground)
        simulated = []
        for _ in range(copies):
            donor = images[int(rng.integers(len(images)))]
            simulated.append(simulate_logical_anomaly(images[i], rng, config, foreground, donor).image)
        inputs.append(autoencoder_input(torch.stack([to_tensor(im) for im in simulated])).half())
        sources += [i] * copies
    return torch.cat(inputs), torch.tensor(sources)


def train_composition_check(check: CompositionCheck, inputs: torch.Tensor, features: torch.Tensor, steps: int,
                            batch_size: int = 16, lr: float = 1e-3, seed: int = 0, progress: bool = True,
                            restoration: tuple[torch.Tensor, torch.Tensor] | None = None,
                            restoration_share: float = 0.0, precision: str = "fp32") -> dict:
    """Fit ``check``'s feature standardisation and train its autoencoder for ``steps`` Adam steps with a
    cosine schedule; leaves it in eval mode. ``inputs``: the training images' :func:`autoencoder_input`;
    ``features``: their :meth:`CompositionCheck.features`, on the same device. ``restoration``: the
    output of :func:`restoration_inputs` for the same images, of which ``restoration_share`` of each batch
    is drawn (on any device). ``precision``: a resolved one (``precision.resolve_precision``) for the training
    forward passes; the weights, the loss and everything after training stay float32."""
    if len(inputs) < 1 or len(inputs) != len(features) or steps < 1:
        raise ValueError(f"the composition check needs >= 1 training image with features and >= 1 step, "
                         f"got {len(inputs)} images, {len(features)} features, {steps} steps")
    if restoration_share > 0 and (restoration is None or int(restoration[1].max()) >= len(inputs)):
        raise ValueError("restoration_share > 0 needs restoration inputs made from the same training images")
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
                x = inputs[pick]
                if restoration_share > 0:  # some inputs swapped for a simulated copy; targets stay the clean image's
                    x, pick = _with_restoration(x, pick, restoration, restoration_share, generator)
                factor = (1 + BRIGHTNESS * (2 * torch.rand(len(pick), 1, 1, 1, generator=generator) - 1)).to(device)
                x = x * factor + mean / std * (factor - 1)  # the raw image scaled by factor, renormalised
                with autocast(precision, device):
                    rebuilt = check.rebuild(x, tuple(targets.shape[-2:]))
                loss = F.mse_loss(rebuilt.float(), targets[pick])
                optimiser.zero_grad(set_to_none=True)
                loss.backward()
                optimiser.step()
                schedule.step()
                losses.append(loss.item())
                bar.set_postfix(loss=f"{losses[-1]:.4f}", refresh=False)
    finally:
        check.eval().requires_grad_(False)
    tail = losses[-max(1, steps // 10):]
    return {"steps": steps, "images": len(inputs), "final_loss": float(np.mean(tail)),
            "restoration_share": restoration_share, "precision": precision,
            "restoration_inputs": 0 if restoration is None or restoration_share == 0 else len(restoration[0])}


def _with_restoration(x: torch.Tensor, pick: torch.Tensor, restoration: tuple[torch.Tensor, torch.Tensor],
                      share: float, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch ``x`` of training images ``pick`` with about ``share`` of it replaced by simulated copies
    of random training images, and the images whose features each row must rebuild."""
    simulated, sources = restoration
    swap = torch.rand(len(pick), generator=generator) < share
    drawn = torch.randint(len(simulated), (len(pick),), generator=generator)
    x = x.clone()
    x[swap.to(x.device)] = simulated[drawn[swap]].to(device=x.device, dtype=x.dtype)
    return x, torch.where(swap, sources[drawn], pick)
