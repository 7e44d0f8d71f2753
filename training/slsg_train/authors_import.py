"""The authors' released weights (``<category>.tch``) as a checkpoint of ours: the ``paper`` preset with
their preprocessing (LANCZOS to 256x256, aspect ratio ignored, ImageNet normalisation) and their score
(mean of the 100 largest anomaly probabilities), calibrated on the category's normal images when the data
set is at hand. Their file carries no threshold: without data the checkpoint is marked uncalibrated, and
``slsg export`` refuses it until ``slsg calibrate`` has run."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import datetime, UTC
from pathlib import Path

from slsg import __version__
from slsg.contract import RESIZE_LANCZOS
from slsg_train.checkpoint import RunCheckpoint, save_checkpoint
from slsg_train.models.authors import Conversion, authors_network, read_authors_state

AUTHORS_IMAGE_SIZE = (256, 256)
AUTHORS_TOP_K = 100
IMPORTED_STAGE = "imported"


@dataclass
class ImportResult:
    checkpoint: Path
    conversion: Conversion
    calibration_stats: dict | None  # None: uncalibrated


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _checkpoint(model, category: str, weights: Path, conversion: Conversion, data_root: str) -> RunCheckpoint:
    return RunCheckpoint(
        stage=IMPORTED_STAGE, step=0, category=category, model_config=model.config, train_config=None,
        image_size=AUTHORS_IMAGE_SIZE, top_k=AUTHORS_TOP_K, resize=RESIZE_LANCZOS, data_root=data_root,
        model_state=model.state_dict(), project_version=__version__,
        created=datetime.now(UTC).isoformat(timespec="seconds"),
        imported_from={"path": str(weights.resolve()), "sha256": _sha256(weights), **conversion.summary(),
                       "unused_keys": conversion.unused, "alias_keys": conversion.aliases},
    )


def import_authors(weights: str | Path, category: str, out: str | Path, data_root: str | Path | None = None,
                   target_fpr: float = 0.01, device: str = "cpu") -> ImportResult:
    """Convert ``weights`` into ``out/checkpoint.pt``; with ``data_root``, calibrate on ``category``'s
    normal images there (validation/good, else held-out images of train/good)."""
    from slsg_train.data.loco import LocoCategory
    from slsg_train.training.calibration import calibrate_threshold, split_for_calibration
    from slsg_train.data.images import load_resized

    weights, target = Path(weights), Path(out) / "checkpoint.pt"
    if target.exists():
        raise FileExistsError(f"{target} already exists; import into a new run directory")
    model, conversion = authors_network(read_authors_state(weights))
    data = LocoCategory(data_root, category) if data_root is not None else None  # checked before the slow part
    checkpoint = _checkpoint(model, category, weights, conversion, str(Path(data_root).resolve()) if data else "")
    stats = None
    if data is not None:
        checkpoint.data_hash = data.data_hash()
        # their network has no checks to scale; it was trained on LOCO's train/good, so validation/good
        # alone calibrates it where the data set has that split
        split = split_for_calibration(data, target_fpr, has_checks=False,
                                      held_out_train=0 if data.validation_paths else None)
        images = load_resized(split.threshold, AUTHORS_IMAGE_SIZE, RESIZE_LANCZOS)
        calibration, stats = calibrate_threshold(model.to(device), images, AUTHORS_TOP_K, target_fpr, device)
        checkpoint.calibration, checkpoint.calibration_stats = calibration, stats
        checkpoint.model_state = model.cpu().state_dict()
    save_checkpoint(target, checkpoint)
    return ImportResult(target, conversion, stats)
