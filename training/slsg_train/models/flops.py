"""Cost of an SLSG network: GFLOP per image and parameter counts."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def count_flops(model: nn.Module, height: int, width: int) -> float:
    """GFLOP of one forward pass of a single [1, 3, height, width] image.

    Counted by ``torch.utils.flop_counter.FlopCounterMode``: a multiply-add is 2 FLOPs, and only
    convolutions and matrix products count (batch norm, activations, softmax, resizing and
    top-k are left out, as in the usual papers' figures). Reference checks count as deployed, fitted
    or not (they are fitted only after training).
    """
    param = next(model.parameters())
    x = torch.zeros(1, 3, height, width, dtype=param.dtype, device=param.device)
    was_training = model.training
    flags = [m.fitted for m in model.modules() if isinstance(getattr(m, "fitted", None), torch.Tensor)]
    saved = [bool(f) for f in flags]
    model.eval()
    try:
        for f in flags:
            f.fill_(True)
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(x)
    finally:
        for f, value in zip(flags, saved):
            f.fill_(value)
        model.train(was_training)
    return counter.get_total_flops() / 1e9


def count_parameters(model: nn.Module) -> dict[str, int]:
    """{"total": all parameters, "trainable": those with requires_grad}."""
    params = list(model.parameters())
    return {
        "total": sum(p.numel() for p in params),
        "trainable": sum(p.numel() for p in params if p.requires_grad),
    }
