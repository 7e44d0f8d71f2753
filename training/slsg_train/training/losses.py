"""SLSG losses: 0.4 * focal (gamma 4, on softmax) + 0.6 * L1(anomaly prob, mask) + 0.3 * L1(aux prob, mask)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from slsg_train.training.config import LossConfig
from slsg_train.training.precision import autocast


def focal_loss(logits: torch.Tensor, target: torch.Tensor, gamma: float) -> torch.Tensor:
    """Mean focal loss of 2-class logits [B,2,H,W] against a {0,1} mask [B,1,H,W]."""
    log_p = F.log_softmax(logits, dim=1)
    labels = target[:, 0].long()
    log_pt = log_p.gather(1, labels[:, None])[:, 0]
    return (-((1 - log_pt.exp()) ** gamma) * log_pt).mean()


def slsg_loss(logits: torch.Tensor, aux_logits: torch.Tensor, mask: torch.Tensor,
              cfg: LossConfig) -> tuple[torch.Tensor, dict[str, float]]:
    prob = F.softmax(logits, dim=1)[:, 1:2]
    aux_prob = F.softmax(aux_logits, dim=1)[:, 1:2]
    parts = {
        "focal": focal_loss(logits, mask, cfg.focal_gamma),
        "l1": F.l1_loss(prob, mask),
        "aux_l1": F.l1_loss(aux_prob, mask),
    }
    total = cfg.focal_weight * parts["focal"] + cfg.l1_weight * parts["l1"] + cfg.aux_l1_weight * parts["aux_l1"]
    return total, {k: float(v.detach()) for k, v in parts.items()}


def training_step_loss(net: torch.nn.Module, images: torch.Tensor, masks: torch.Tensor, cfg: LossConfig,
                       precision: str, device: torch.device) -> tuple[torch.Tensor, dict[str, float]]:
    """One SLSG training step's forward pass in the resolved ``precision`` and its loss in float32
    (the trainer's step, and the one ``slsg bench pipeline`` times)."""
    with autocast(precision, device):
        out = net(images)
    return slsg_loss(out.logits.float(), out.aux_logits.float(), masks, cfg)
