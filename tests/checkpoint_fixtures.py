"""Run checkpoints in the layouts older releases wrote, for tests that pin their migration."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

# what the last version-1 releases added; the first ones wrote none of these
V1_LATER_FIELDS = ("calibration_split", "input_size_choice", "image_colour", "data_hash", "calibration_stats")
# network settings added to SLSGConfig during version 1
V1_LATER_NETWORK = ("composition_restoration", "layer1_input", "graph_value_on_tokens", "graph_position_table",
                    "aux_upsampling")


def as_version_2(payload: dict[str, Any]) -> dict[str, Any]:
    """A current-format stored dict as a ``slsg-checkpoint/2`` release wrote it: no fusion record, and no
    ``fuse_slsg_map`` in the network settings."""
    v2 = {k: v for k, v in payload.items() if k != "fusion"}
    v2["model_config"] = {k: v for k, v in v2["model_config"].items() if k != "fuse_slsg_map"}
    return {**v2, "format": "slsg-checkpoint/2"}


def as_version_1(payload: dict[str, Any], oldest: bool = False) -> dict[str, Any]:
    """A current-format stored dict as a ``slsg-checkpoint/1`` release wrote it: a ``backbone`` copy,
    ``score_max`` in the calibration, no ``resize`` from the trainer, and optional state only where set.
    ``oldest``: also without every field and setting the version-1 releases added over time."""
    v2 = as_version_2(payload)
    v1 = {**v2, "format": "slsg-checkpoint/1", "backbone": v2["model_config"]["backbone"]}
    for key in ("imported_from", "decoder_state", "optimizer", "scheduler", "input_size_choice"):
        if v1[key] is None:
            del v1[key]
    if v1["resize"] == "bilinear":  # only the authors' import wrote it
        del v1["resize"]
    if v1["calibration"] is not None:
        v1["calibration"] = {**v1["calibration"], "score_max": 1.0}
    if oldest:
        for key in V1_LATER_FIELDS:
            v1.pop(key, None)
        v1["model_config"] = {k: v for k, v in v1["model_config"].items() if k not in V1_LATER_NETWORK}
        if v1["train_config"] is not None:
            v1["train_config"] = {k: v for k, v in v1["train_config"].items() if k != "precision"}
    return v1


def rewrite_as_version_1(path: str | Path, oldest: bool = False) -> dict[str, Any]:
    """Rewrite the checkpoint file at ``path`` in the version-1 layout; returns what was written."""
    v1 = as_version_1(torch.load(path, map_location="cpu", weights_only=False), oldest)
    torch.save(v1, path)
    return v1
