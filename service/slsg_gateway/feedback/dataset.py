"""A data set from operators' reviews: ``slsg dataset from-reviews``.

Reads the reviewed inspections of one model from the record store (only those whose frame was
kept) and writes one category in the flat MVTec layout the training side reads
(``training/slsg_train/data/loco.py``, docs/data.md):

- confirmed false alarms (verdict ``false_alarm``: the operator saw no defect) are normal images.
  Each goes either to ``validation/good`` (to recalibrate on: ``slsg calibrate --data ROOT``) or,
  for a share ``holdout`` chosen by its record id (stable across runs), to ``test/good``, where the
  promotion gate (``slsg promote``) scores versions on images no version was calibrated on.
  ``train/good`` holds copies of the model's own training images when they are given
  (``train_good``): ``slsg calibrate`` refits the reference checks (the patch memory) on
  ``train/good`` and draws the images the run held out of training from its end, so with the
  originals the recalibrated model keeps what it was trained on. Without them ``train/good`` holds
  the ``validation/good`` images (the layout needs normal training images), and a recalibration
  refits the checks on those false alarms.
- confirmed defects go to ``test/reviewed_defect`` with a mask in ``ground_truth/reviewed_defect``:
  the regions the gateway reported, filled as boxes (coarse: a box around each region, not its
  outline), or the whole frame when it reported none (a miss the operator caught).

``reviews_manifest.json`` in the category says where every image came from: record id, time,
model version, line, camera, score, the gateway's decision, the verdict, reviewer and note.
Frames are written as the gateway received them (same bytes and format).
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
from dataclasses import dataclass, field
from datetime import datetime, UTC
from pathlib import Path
from typing import Any
from collections.abc import Iterator

import numpy as np
from PIL import Image

from slsg_gateway.records import InspectionRecord, RecordStore

DEFECT_TYPE = "reviewed_defect"
MANIFEST = "reviews_manifest.json"
_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
_SUFFIX = {"image/png": ".png", "image/jpeg": ".jpg", "image/bmp": ".bmp", "image/tiff": ".tiff"}
_PAGE = 500


class DatasetError(ValueError):
    """The reviews cannot make the data set asked for; the message says why."""


@dataclass
class DatasetSummary:
    """What ``from_reviews`` wrote: image counts per folder and records it could not use."""

    root: Path
    category: str
    counts: dict[str, int] = field(default_factory=dict)
    skipped: dict[str, int] = field(default_factory=dict)

    def describe(self) -> str:
        counts = ", ".join(f"{folder} {n}" for folder, n in sorted(self.counts.items()))
        text = f"wrote {self.root / self.category}: {counts}"
        if self.skipped:
            text += "; skipped " + ", ".join(f"{n} {why}" for why, n in sorted(self.skipped.items()))
        return text


def reviewed_records(store: RecordStore, model: str) -> Iterator[InspectionRecord]:
    """Every reviewed record of ``model`` (newest first), page by page."""
    cursor = None
    while True:
        page = store.query(model=model, review="reviewed", limit=_PAGE, cursor=cursor)
        yield from page.records
        if page.next_cursor is None:
            return
        cursor = page.next_cursor


def is_held_out(record_id: str, holdout: float) -> bool:
    """Whether a normal frame is kept for the gate: a stable pseudo-random share ``holdout`` of ids."""
    draw = int.from_bytes(hashlib.sha256(record_id.encode()).digest()[:8], "big") / 2.0**64
    return draw < holdout


def box_mask(record: InspectionRecord) -> tuple[np.ndarray, str]:
    """uint8 [H, W] mask, 255 inside the record's region boxes, or the whole frame without regions."""
    mask = np.zeros((record.image_height, record.image_width), np.uint8)
    for region in record.regions:
        box = region["box"]
        mask[box["y0"]:box["y1"], box["x0"]:box["x1"]] = 255
    if not mask.any():
        mask[:] = 255
        return mask, "whole_frame"
    return mask, "regions"


def from_reviews(store: RecordStore, model: str, out: Path, category: str, holdout: float = 0.3,
                 overwrite: bool = False, train_good: Path | None = None) -> DatasetSummary:
    """Write the data set (see the module docstring) under ``out / category``.

    ``train_good``: a folder of the model's training images, copied (same names, so the same order)
    to ``train/good``; None puts the calibration false alarms there.
    """
    if not 0.0 <= holdout < 1.0:
        raise DatasetError(f"holdout must be in [0, 1), got {holdout}")
    originals = _training_images(train_good) if train_good is not None else None
    target = out / category
    if target.exists() and any(target.iterdir()) and not overwrite:
        raise DatasetError(f"{target} exists and is not empty; choose another --out or pass --overwrite")
    summary, entries = DatasetSummary(out, category), []
    for record in reviewed_records(store, model):
        frame = store.frame(record.id)
        if frame is None:
            summary.skipped["without a stored frame"] = summary.skipped.get("without a stored frame", 0) + 1
            continue
        entries.append(_write_one(target, record, frame, holdout, summary, with_train=originals is None))
    if not entries:
        raise DatasetError(f"no reviewed inspections of model {model!r} with a stored frame in {store.description}")
    if not summary.counts.get("validation/good"):
        raise DatasetError(f"none of the {len(entries)} reviewed frames of {model!r} is a confirmed false alarm "
                           f"outside the held-out share: nothing to calibrate on (review more, or lower --holdout)")
    if not any(folder.startswith("test/") for folder in summary.counts):
        raise DatasetError(f"no confirmed defect and no held-out false alarm among the {len(entries)} reviewed frames "
                           f"of {model!r}: test/ would be empty (review more, or raise --holdout)")
    if originals is not None:
        _copy_training_images(originals, target / "train" / "good", summary)
    _write_manifest(target, store, model, holdout, entries, train_good)
    return summary


def _training_images(folder: Path) -> list[Path]:
    images = sorted(p for p in folder.iterdir() if p.suffix.lower() in _IMAGE_SUFFIXES) if folder.is_dir() else []
    if not images:
        raise DatasetError(f"{folder}: no training images (expected the model's train/good folder)")
    return images


def _copy_training_images(images: list[Path], folder: Path, summary: DatasetSummary) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for path in images:
        shutil.copyfile(path, folder / path.name)
    summary.counts["train/good"] = len(images)


def _write_one(target: Path, record: InspectionRecord, frame: bytes, holdout: float,
               summary: DatasetSummary, with_train: bool) -> dict[str, Any]:
    assert record.review is not None  # reviewed_records yields reviewed records only
    suffix = _SUFFIX.get(record.frame_media_type or "", ".png")
    if record.review.verdict == "defect":
        folders, mask = [f"test/{DEFECT_TYPE}"], box_mask(record)
    else:
        folders = (["test/good"] if is_held_out(record.id, holdout)
                   else ["validation/good", "train/good"] if with_train else ["validation/good"])
        mask = None
    paths = []
    for folder in folders:
        index = summary.counts.get(folder, 0)
        summary.counts[folder] = index + 1
        path = target / folder / f"{index:03d}{suffix}"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(frame)
        paths.append(path.relative_to(target).as_posix())
    entry = _provenance(record, paths)
    if mask is not None:
        pixels, kind = mask
        mask_path = target / "ground_truth" / DEFECT_TYPE / f"{Path(paths[0]).stem}_mask.png"
        mask_path.parent.mkdir(parents=True, exist_ok=True)
        _save_png(pixels, mask_path)
        entry.update(mask=mask_path.relative_to(target).as_posix(), mask_kind=kind)
    return entry


def _save_png(pixels: np.ndarray, path: Path) -> None:
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    path.write_bytes(out.getvalue())


def _provenance(record: InspectionRecord, paths: list[str]) -> dict[str, Any]:
    review = record.review
    return {
        "paths": paths, "record_id": record.id, "time": record.time.isoformat(), "model": record.model,
        "version": record.version, "line_id": record.line_id, "camera_id": record.camera_id,
        "score": record.score, "threshold": record.threshold, "decision": record.decision,
        "verdict": review.verdict, "reviewer": review.reviewer, "note": review.note,
        "reviewed_at": review.time.isoformat(), "frame_sha256": record.frame_sha256,
    }


def _write_manifest(target: Path, store: RecordStore, model: str, holdout: float,
                    entries: list[dict[str, Any]], train_good: Path | None) -> None:
    manifest = {"model": model, "records": store.description, "holdout": holdout,
                "train_good": str(train_good.resolve()) if train_good else "validation/good",
                "created": datetime.now(UTC).isoformat(timespec="seconds"),
                "defect_type": DEFECT_TYPE, "images": entries}
    (target / MANIFEST).write_text(json.dumps(manifest, indent=1))
