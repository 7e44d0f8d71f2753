"""Checkpoint -> versioned Triton model repository entry (ONNX + config.pbtxt + model card)."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from datetime import datetime, UTC
from pathlib import Path
from typing import Any

import numpy as np

from slsg import __version__
from slsg.contract import PRECISION_INT8, PRECISIONS, ModelCard, model_path, next_version, validate_model_name
from slsg_train.checkpoint import CheckpointError, RunCheckpoint


# Why --tensorrt and --precision int8 do not go together (checked before anything is loaded).
TENSORRT_INT8_REFUSED = (
    "--tensorrt cannot be combined with --precision int8: the INT8 graph quantizes activations to asymmetric "
    "uint8 (the fast pair on x86 CPUs), which TensorRT does not take (its INT8 needs symmetric int8, zero point "
    "0), and Triton's TensorRT accelerator is configured for FP16. Serve the INT8 version on the CPU "
    "(--cpu-config), and export a float32 version with --tensorrt for the GPU (docs/int8.md)")


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
    precision: str = "fp32"  # slsg.contract.PRECISIONS
    calibration_data: str | Path | None = None  # INT8: data set root (default: the run's)
    calibration_category: str | None = None  # INT8: its category (default: the run's)
    max_decision_change: float | None = None  # INT8: refusal above this share (None: int8.MAX_DECISION_CHANGE)
    min_rank_correlation: float | None = None  # INT8: refusal below this (None: int8.MIN_RANK_CORRELATION)


@dataclass
class ExportResult:
    model_path: Path
    config_path: Path
    version: int
    card: ModelCard
    max_map_diff: float
    max_score_diff: float
    near_tie_images: int = 0
    int8: Any = None  # slsg_train.export.int8.Int8Check of an INT8 export


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


def verification_images(checkpoint: RunCheckpoint, size: tuple[int, int], limit: int = 2,
                        resize: str = "bilinear") -> list[np.ndarray]:
    """Real frames to verify the export on: the run's own normal images when reachable, plus real photos,
    resized with the model's filter."""
    from skimage import data as skdata

    from slsg_train.data.loco import LocoCategory
    from slsg_train.data.images import load_resized, resize_rgb

    images = [resize_rgb(skdata.chelsea(), size, resize), resize_rgb(skdata.coffee(), size, resize)]
    try:
        cat = LocoCategory(checkpoint.data_root, checkpoint.category)
        images += load_resized((cat.validation_paths or cat.train_paths)[:limit], size, resize)
    except Exception:  # the data set need not be on the export machine
        pass
    return images


def export_checkpoint(req: ExportRequest) -> ExportResult:
    from slsg.triton_config import write_config
    from slsg_train.export.onnx_export import export_onnx, with_part_kinds
    from slsg_train.inference import load_model

    validate_model_name(req.name)
    if req.precision not in PRECISIONS:
        raise ValueError(f"--precision must be one of {', '.join(PRECISIONS)}, got {req.precision!r}")
    if req.precision == PRECISION_INT8 and req.tensorrt:
        raise ValueError(TENSORRT_INT8_REFUSED)
    loaded = load_model(req.checkpoint)
    ckpt = loaded.checkpoint
    if loaded.calibration is None:
        raise CheckpointError(f"checkpoint {ckpt.path} has no calibration (stage {ckpt.stage!r}): "
                              "finish training or run `slsg calibrate --checkpoint ... --data ROOT` first")
    version = req.version if req.version is not None else next_version(req.repository, req.name)
    if version < 1:
        raise ValueError(f"--version must be >= 1, got {version}")
    target = model_path(req.repository, req.name, version)
    if target.exists():
        raise FileExistsError(f"{target} already exists; versions are immutable, export as a new version")
    h, w = loaded.image_size
    card = ModelCard(
        name=req.name, category=loaded.category, backbone=ckpt.backbone, input_height=h, input_width=w,
        top_k=loaded.top_k, calibration=loaded.calibration.on_calibrated_map(), metrics=_find_metrics(req),
        training_data_hash=ckpt.data_hash, image_colour=ckpt.image_colour,
        project_version=__version__,
        created=datetime.now(UTC).isoformat(timespec="seconds"),
        extra={"checkpoint_step": ckpt.step, "calibration_stats": ckpt.calibration_stats,
               **({"checks_left_out": ckpt.checks_left_out} if ckpt.checks_left_out else {})},
        resize=loaded.resize, fusion_left_out=dict(ckpt.fusion.get("left_out", {})),
    )
    card = with_part_kinds(card, loaded.model)  # the config declares part_counts when the graph has it
    created_dir = not target.parent.exists()
    try:
        verify = verification_images(ckpt, (h, w), resize=loaded.resize)
        int8_check = None
        if req.precision == PRECISION_INT8:
            import dataclasses

            from slsg_train.export.int8 import PRESETS, export_int8

            limits = {k: v for k, v in (("max_decision_change", req.max_decision_change),
                                        ("min_rank_correlation", req.min_rank_correlation)) if v is not None}
            presets = [dataclasses.replace(p, **limits) for p in PRESETS]
            card, int8_check = export_int8(loaded.model, card, target, int8_images(req, loaded), presets, verify)
            max_map_diff = max_score_diff = float("nan")
            near_ties = 0
        else:
            check = export_onnx(loaded.model, card, target, verify_images=verify)
            max_map_diff, max_score_diff, near_ties = check.max_map_diff, check.max_score_diff, check.near_tie_images
        config = write_config(req.repository, req.name, card, max_batch_size=req.max_batch_size,
                              tensorrt=req.tensorrt, gpu=req.gpu)
    except Exception:
        if created_dir and target.parent.exists():  # a failed export leaves no half-made version behind
            shutil.rmtree(target.parent)
        raise
    return ExportResult(target, Path(config), version, card, float(max_map_diff), float(max_score_diff),
                        near_ties, int8_check)


def int8_images(req: ExportRequest, loaded) -> Any:
    """The frames an INT8 export needs from the data set (the run's, or ``req.calibration_data``): training
    images for the activation ranges, the threshold images the run's calibration used, and an anomalous
    copy of each threshold image from the run's anomaly simulator."""
    from slsg_train.data.images import load_resized
    from slsg_train.data.loco import LocoCategory
    from slsg_train.export.int8 import CALIBRATION_IMAGES, Int8Images
    from slsg_train.training.calibration import split_for_calibration

    ckpt: RunCheckpoint = loaded.checkpoint
    root = req.calibration_data or ckpt.data_root
    if not root:
        raise ValueError("the checkpoint does not say which data set it was trained on: give --calibration-data ROOT")
    category = LocoCategory(root, req.calibration_category or ckpt.category)
    split = split_for_calibration(category, loaded.calibration.target_fpr, ckpt.model_config.uses_reference,
                                  held_out_train=ckpt.held_out_train(category))
    step = max(1, len(split.train) // CALIBRATION_IMAGES)  # spread over the whole training set
    size, resize = loaded.image_size, loaded.resize
    threshold = load_resized(split.threshold, size, resize)
    return Int8Images(train=load_resized(split.train[::step][:CALIBRATION_IMAGES], size, resize),
                      threshold=threshold, anomalous=simulated_anomalies(threshold, ckpt),
                      scale_images=len(split.scale))


def simulated_anomalies(images: list[np.ndarray], ckpt: RunCheckpoint, seed: int = 0) -> list[np.ndarray]:
    """One anomalous copy of each image from the run's anomaly simulator (built-in textures), seeded."""
    import dataclasses

    from slsg_train.simulation import AnomalySimulator, SimulationConfig

    saved = ckpt.train_config.simulation if ckpt.train_config is not None else None
    config = SimulationConfig.from_dict(saved) if saved else SimulationConfig()
    simulator = AnomalySimulator(dataclasses.replace(config, texture_source=None))  # the texture folder may be gone
    rng = np.random.default_rng(seed)
    return [simulator(image, rng, donor=images[(i + 1) % len(images)]).image for i, image in enumerate(images)]
