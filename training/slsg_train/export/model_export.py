"""Checkpoint -> versioned Triton model repository entry (ONNX + config.pbtxt + model card)."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from datetime import datetime, UTC
from pathlib import Path

import numpy as np

from slsg import __version__
from slsg.contract import ModelCard, model_path, next_version, validate_model_name
from slsg_train.checkpoint import CheckpointError


@dataclass
class ExportRequest:
    checkpoint: str | Path
    repository: str | Path
    name: str
    version: int | None = None
    metrics: str | Path | None = None
    max_batch_size: int = 8
    tensorrt: bool = False
    gpu: bool = True


@dataclass
class ExportResult:
    model_path: Path
    config_path: Path
    version: int
    card: ModelCard
    max_map_diff: float
    max_score_diff: float
    near_tie_images: int = 0


def _find_metrics(req: ExportRequest) -> dict:
    if req.metrics:
        path = Path(req.metrics)
        if not path.is_file():
            raise FileNotFoundError(f"--metrics {path} does not exist")
    else:
        run_dir = Path(req.checkpoint).parent if Path(req.checkpoint).suffix else Path(req.checkpoint)
        path = run_dir / "eval" / "metrics.json"
        if not path.is_file():
            return {}
    return json.loads(path.read_text())


def verification_images(payload: dict, size: tuple[int, int], limit: int = 2,
                        resize: str = "bilinear") -> list[np.ndarray]:
    """Real frames to verify the export on: the run's own normal images when reachable, plus real photos,
    resized with the model's filter."""
    from skimage import data as skdata

    from slsg_train.data.loco import LocoCategory
    from slsg_train.data.images import load_resized, resize_rgb

    images = [resize_rgb(skdata.chelsea(), size, resize), resize_rgb(skdata.coffee(), size, resize)]
    try:
        cat = LocoCategory(payload["data_root"], payload["category"])
        images += load_resized((cat.validation_paths or cat.train_paths)[:limit], size, resize)
    except Exception:  # the data set need not be on the export machine
        pass
    return images


def export_checkpoint(req: ExportRequest) -> ExportResult:
    from slsg.triton_config import write_config
    from slsg_train.export.onnx_export import export_onnx, with_part_kinds
    from slsg_train.inference import load_model

    validate_model_name(req.name)
    loaded = load_model(req.checkpoint)
    payload = loaded.payload
    if loaded.calibration is None:
        raise CheckpointError(f"checkpoint {payload['path']} has no calibration (stage {payload['stage']!r}): "
                              "finish training or run `slsg calibrate --checkpoint ... --data ROOT` first")
    version = req.version if req.version is not None else next_version(req.repository, req.name)
    if version < 1:
        raise ValueError(f"--version must be >= 1, got {version}")
    target = model_path(req.repository, req.name, version)
    if target.exists():
        raise FileExistsError(f"{target} already exists; versions are immutable, export as a new version")
    h, w = loaded.image_size
    card = ModelCard(
        name=req.name, category=loaded.category, backbone=payload["backbone"], input_height=h, input_width=w,
        top_k=loaded.top_k, calibration=loaded.calibration.on_calibrated_map(), metrics=_find_metrics(req),
        training_data_hash=payload.get("data_hash", ""), image_colour=payload.get("image_colour", ""),
        project_version=__version__,
        created=datetime.now(UTC).isoformat(timespec="seconds"),
        extra={"checkpoint_step": payload["step"], "calibration_stats": payload.get("calibration_stats", {}),
               **({"checks_left_out": payload["checks_left_out"]} if payload.get("checks_left_out") else {})},
        resize=loaded.resize,
    )
    card = with_part_kinds(card, loaded.model)  # the config declares part_counts when the graph has it
    created_dir = not target.parent.exists()
    try:
        check = export_onnx(loaded.model, card, target, verify_images=verification_images(payload, (h, w), resize=loaded.resize))
        config = write_config(req.repository, req.name, card, max_batch_size=req.max_batch_size,
                              tensorrt=req.tensorrt, gpu=req.gpu)
    except Exception:
        if created_dir and target.parent.exists():  # a failed export leaves no half-made version behind
            shutil.rmtree(target.parent)
        raise
    return ExportResult(target, Path(config), version, card, float(check.max_map_diff), float(check.max_score_diff),
                        check.near_tie_images)
