"""PyTorch inference for evaluation and calibration: uint8 frames at model size -> maps and raw scores."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from slsg.contract import Calibration
from slsg_train.checkpoint import RunCheckpoint, build_model, load_checkpoint
from slsg_train.data.images import to_tensor
from slsg_train.training.precision import channels_last


@dataclass
class LoadedModel:
    model: torch.nn.Module
    checkpoint: RunCheckpoint

    @property
    def category(self) -> str:
        return self.checkpoint.category

    @property
    def image_size(self) -> tuple[int, int]:
        return self.checkpoint.image_size

    @property
    def top_k(self) -> int:
        return self.checkpoint.top_k

    @property
    def calibration(self) -> Calibration | None:
        return self.checkpoint.calibration

    @property
    def resize(self) -> str:
        """The filter frames are resized with for this model."""
        return self.checkpoint.resize

    @property
    def has_checks(self) -> bool:
        """Whether reference checks join the score (their scales were fitted on held-out images)."""
        return self.checkpoint.model_config.uses_reference

    def describe(self) -> dict[str, Any]:
        """What an evaluation report says about the model: the checkpoint file, step, backbone, size."""
        ckpt = self.checkpoint
        report = {"path": str(ckpt.path), "step": ckpt.step, "backbone": ckpt.backbone,
                  "image_size": list(self.image_size)}
        if ckpt.train_config is not None:
            report["precision"] = ckpt.train_config.precision
        return report


def load_model(checkpoint: str | Path, device: torch.device | str = "cpu") -> LoadedModel:
    ckpt = load_checkpoint(checkpoint)
    model = build_model(ckpt.model_config)
    model.load_state_dict(ckpt.model_state)
    channels_last(model.to(device)).eval()
    return LoadedModel(model, ckpt)


class Prediction(NamedTuple):
    maps: np.ndarray  # [N, H, W] anomaly probabilities
    scores: np.ndarray  # [N] raw image scores (mean of the top-K pixels), float32
    log_odds: np.ndarray  # [N] their log-odds, exact where a score rounds to 1 (what the calibration maps)
    map_log_odds: np.ndarray  # [N, H, W] the maps' log-odds, exact where a probability rounds to 1


@torch.no_grad()
def predict(model: torch.nn.Module, images: list[np.ndarray], top_k: int, device: torch.device | str = "cpu",
            batch_size: int = 8) -> Prediction:
    """Anomaly maps, raw image scores and the log-odds of both for uint8 frames, as the model scores them."""
    was_training = model.training
    model.eval()
    maps, scores, log_odds, map_log_odds = [], [], [], []
    for start in range(0, len(images), batch_size):
        x = torch.stack([to_tensor(im) for im in images[start:start + batch_size]]).to(device)
        out = model(x)
        fused = model.anomaly_log_odds(out)
        maps.append(torch.sigmoid(fused)[:, 0].float().cpu().numpy())
        map_log_odds.append(fused[:, 0].float().cpu().numpy())
        scores.append(model.score_images(out, top_k, fused).float().cpu().numpy())
        log_odds.append(model.score_log_odds(out, top_k, fused).float().cpu().numpy())
    model.train(was_training)
    if not maps:
        empty, no_maps = np.zeros((0,), np.float32), np.zeros((0, 0, 0), np.float32)
        return Prediction(no_maps, empty, empty, no_maps)
    return Prediction(np.concatenate(maps), np.concatenate(scores), np.concatenate(log_odds),
                      np.concatenate(map_log_odds))
