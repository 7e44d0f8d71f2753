"""The run checkpoint: weights plus everything needed to rebuild, resume, calibrate and export."""

from __future__ import annotations

import dataclasses
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from slsg.contract import IMAGENET_MEAN, IMAGENET_STD

CHECKPOINT_FORMAT = "slsg-checkpoint/1"


class CheckpointError(ValueError):
    pass


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> Path:
    """Write atomically: a crash mid-write never leaves a truncated checkpoint behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".checkpoint-", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        torch.save({"format": CHECKPOINT_FORMAT, **payload}, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def load_checkpoint_payload(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if path.is_dir():
        path = path / "checkpoint.pt"
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist (expected RUN_DIR/checkpoint.pt written by `slsg train`)")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # corrupt or not a torch file
        raise CheckpointError(f"checkpoint {path} cannot be read: {exc}") from exc
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not an SLSG checkpoint (expected format {CHECKPOINT_FORMAT!r})")
    payload["path"] = str(path)
    return payload


def normalisation() -> dict[str, list[float]]:
    return {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD), "scale": [1 / 255]}


def build_model(model_config: dict[str, Any]):
    """Rebuild the network from the stored config (no pretrained download: weights come from the state)."""
    from slsg_train.models import SLSG, SLSGConfig

    cfg = dataclasses.replace(SLSGConfig.from_dict(model_config), backbone_weights=None)
    return SLSG(cfg)
