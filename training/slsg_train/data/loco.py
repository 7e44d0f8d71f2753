"""Reader for one category of MVTec LOCO AD (Bergmann et al., IJCV 2022) and its simpler relatives.

Three ground-truth layouts are read (the project design note LOCO.md):

- ``loco``: ``ground_truth/<type>/<000>/<000>.png ...`` (one mask per defect, its non-zero pixels
  all equal to the defect's ``pixel_value``) plus ``defects_config.json``;
- ``flat``: ``ground_truth/<type>/000_mask.png`` (one binary mask per image), which is the seed
  README's layout and MVTec AD's, where test types are arbitrary defect folder names, there may be
  no validation split and no ``defects_config.json``: one :class:`DefectConfig` per type is
  synthesised (pixel value 255, relative saturation 1.0).

The folder structure and ``defects_config.json`` are checked when a :class:`LocoCategory` is built;
the masks are checked (size, value) when :meth:`LocoCategory.test_samples` lists them.

Ground truth as users have it: a category may have no ``ground_truth`` folder at all (image-level
labels only), and single masks may be missing, empty or unreadable. None of these is an error: the
anomalous image keeps its label for the image metrics, gets no masks, and says why in
:attr:`TestSample.ground_truth_issue`, so evaluation can leave it out of the region metrics by name.
A mask of the wrong size, or one whose value is not in ``defects_config.json``, still is an error:
it means the data set and its configuration disagree, not that one file is missing.
Only numpy, Pillow and the core's decoding rule are used (no torch), so the gateway side could read
data sets too; every image is decoded as the gateway decodes a frame (``load_rgb``).
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from slsg.image_modes import UnsupportedImageMode, rgb8_from_image

GOOD = "good"
SPLITS_REQUIRED = {"loco": ("train", "validation", "test"), "flat": ("train", "test")}
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
DEFECTS_CONFIG = "defects_config.json"
FLAT_MASK_SUFFIX = "_mask"
_CONFIG_KEYS = {"defect_name": str, "pixel_value": int, "saturation_threshold": (int, float),
                "relative_saturation": bool}


class DataSetError(ValueError):
    """A data set on disk is not what the reader expects; the message names the path and the problem."""


@dataclass(frozen=True)
class DefectConfig:
    """One entry of ``defects_config.json``: how a defect is marked and when it counts as found (sPRO)."""

    defect_name: str
    pixel_value: int
    saturation_threshold: float
    relative_saturation: bool

    def saturation_area(self, defect_area: int) -> float:
        """Area (pixels) at which this defect's overlap saturates: a fraction of it, or a count capped at it.

        Same rule as the official evaluation (relative areas are floored), kept in one place: the metrics.
        """
        from slsg_train.metrics.spro import saturation_area

        return saturation_area(defect_area, self.saturation_threshold, self.relative_saturation)


@dataclass(frozen=True)
class DefectMask:
    """One ground-truth mask file and the defect it marks."""

    path: Path
    defect: DefectConfig
    binary: bool = False  # flat layout: every non-zero pixel is defective, whatever its value

    def load(self) -> np.ndarray:
        """Bool HxW mask of this defect."""
        values = _load_mask_values(self.path)
        return values != 0 if self.binary else values == self.defect.pixel_value


@dataclass(frozen=True)
class TestSample:
    """One test image with its ground truth. ``size`` is the original image's (H, W).

    ``ground_truth_issue`` says why an anomalous image has no usable masks (no mask file, an empty or
    unreadable one); it is None for good images and for anomalous images whose masks are all usable.
    """

    __test__ = False  # not a pytest test class despite the name

    path: Path
    anomaly_type: str
    index: str
    masks: tuple[DefectMask, ...]
    size: tuple[int, int]
    ground_truth_issue: str | None = None

    @property
    def is_anomalous(self) -> bool:
        return self.anomaly_type != GOOD

    @property
    def name(self) -> str:
        """``<type>/<index>``, how reports name the image."""
        return f"{self.anomaly_type}/{self.index}"

    @property
    def has_ground_truth(self) -> bool:
        """True for good images (no defect anywhere) and for anomalous images with usable masks."""
        return not self.is_anomalous or bool(self.masks)

    def load_image(self) -> np.ndarray:
        return load_rgb(self.path)


def load_rgb(path: str | Path) -> np.ndarray:
    """Uint8 HxWx3 RGB array by the project's one decoding rule (:mod:`slsg.image_modes`, the gateway's too):
    greyscale copied to three channels, 16-bit scaled by its bit depth (a PNG's sBIT), palette and CMYK
    converted, alpha dropped."""
    path = Path(path)
    try:
        data = path.read_bytes()
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            return rgb8_from_image(img, data).pixels
    except UnsupportedImageMode as exc:
        raise DataSetError(f"{path}: cannot use image ({exc})") from exc
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as exc:
        raise DataSetError(f"{path}: cannot read image ({exc}); expected a readable PNG/JPEG/BMP/TIFF") from exc


class MaskUnusable(Exception):
    """One mask file cannot serve as ground truth (missing, empty, unreadable); the message says why."""


def _load_mask_values(path: Path) -> np.ndarray:
    """The mask's pixel values as a 2-D array (first channel if the file has several)."""
    try:
        with Image.open(path) as img:
            img.load()
            if img.mode == "1":
                img = img.convert("L")
            values = np.asarray(img)
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as exc:
        raise DataSetError(f"{path}: cannot read mask ({exc}); expected a single-channel PNG") from exc
    return values[:, :, 0] if values.ndim == 3 else values


def image_size(path: Path) -> tuple[int, int]:
    """(H, W) from the file header, without decoding the pixels."""
    try:
        with Image.open(path) as img:
            width, height = img.size
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as exc:
        raise DataSetError(f"{path}: cannot read image header ({exc}); expected a readable image") from exc
    return height, width


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _subfolders(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def list_categories(root: str | Path) -> list[str]:
    """Names of the folders under ``root`` that look like a category (they hold ``train/good``)."""
    root = Path(root)
    if not root.is_dir():
        raise DataSetError(f"{root}: data set root not found; expected a folder holding <category>/train/good")
    return [name for name in _subfolders(root) if (root / name / "train" / GOOD).is_dir()]


def parse_defects_config(path: Path) -> list[DefectConfig]:
    """Validated entries of a ``defects_config.json``."""
    try:
        entries = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataSetError(f"{path}: malformed defects config ({exc}); expected a JSON list of entries") from exc
    if not isinstance(entries, list) or not entries:
        raise DataSetError(f"{path}: malformed defects config; expected a non-empty JSON list of entries")
    defects = [_parse_defect_entry(path, i, entry) for i, entry in enumerate(entries)]
    values = [d.pixel_value for d in defects]
    if len(set(values)) != len(values):
        raise DataSetError(f"{path}: malformed defects config; pixel_value must be unique, got {values}")
    return defects


def _parse_defect_entry(path: Path, i: int, entry: object) -> DefectConfig:
    expected = "{defect_name: str, pixel_value: 1..255, saturation_threshold: > 0, relative_saturation: bool}"
    if not isinstance(entry, dict):
        raise DataSetError(f"{path}: malformed defects config, entry {i} is {entry!r}; expected {expected}")
    for key, kind in _CONFIG_KEYS.items():
        value = entry.get(key)
        if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
            raise DataSetError(f"{path}: malformed defects config, entry {i} has {key}={value!r}; expected {expected}")
    defect = DefectConfig(entry["defect_name"], entry["pixel_value"], float(entry["saturation_threshold"]),
                          entry["relative_saturation"])
    if not 1 <= defect.pixel_value <= 255 or defect.saturation_threshold <= 0 or (
            defect.relative_saturation and defect.saturation_threshold > 1):
        raise DataSetError(f"{path}: malformed defects config, entry {i} ({entry}) is out of range; "
                           f"expected {expected} and a relative threshold in (0, 1]")
    return defect


class LocoCategory:
    """One category of an MVTec LOCO AD-style data set, checked on construction."""

    def __init__(self, root: str | Path, category: str):
        self.root = Path(root)
        self.name = category
        self.path = self.root / category
        if not self.path.is_dir():
            found = list_categories(self.root)  # raises if the root itself is missing
            raise DataSetError(f"{self.path}: category {category!r} not found; categories under {self.root}: "
                               f"{', '.join(found) if found else 'none (no <category>/train/good folders)'}")
        config = self.path / DEFECTS_CONFIG
        self.layout = "loco" if config.is_file() else "flat"
        for split in SPLITS_REQUIRED[self.layout]:
            if not (self.path / split).is_dir():
                raise DataSetError(f"{self.path / split}: split folder missing; expected it in the "
                                   f"{self.layout} layout")
        self.train_paths = self._split_images("train", required=True)
        self.validation_paths = self._split_images("validation", required=self.layout == "loco")
        self.test_types = self._test_types()
        self.defects = parse_defects_config(config) if self.layout == "loco" else [
            DefectConfig(t, 255, 1.0, True) for t in self.test_types if t != GOOD]

    def _split_images(self, split: str, required: bool) -> list[Path]:
        folder = self.path / split / GOOD
        if not folder.is_dir():
            if required:
                raise DataSetError(f"{folder}: folder missing; expected normal images in {split}/{GOOD}")
            return []
        images = _images_in(folder)
        if not images:
            raise DataSetError(f"{folder}: no images; expected {', '.join(IMAGE_SUFFIXES)} files")
        return images

    def _test_types(self) -> list[str]:
        test = self.path / "test"
        types = _subfolders(test)
        if not types:
            raise DataSetError(f"{test}: no test type folders; expected test/{GOOD} and anomaly folders")
        for name in types:
            if not _images_in(test / name):
                raise DataSetError(f"{test / name}: no images; expected {', '.join(IMAGE_SUFFIXES)} files")
        return types

    def __repr__(self) -> str:
        return f"LocoCategory({str(self.root)!r}, {self.name!r}, layout={self.layout!r})"

    @property
    def has_ground_truth_folder(self) -> bool:
        return (self.path / "ground_truth").is_dir()

    def test_samples(self, types: Iterable[str] | None = None) -> list[TestSample]:
        """Test images with their masks, sorted by type then index; reads every mask to check it.

        An anomalous image whose masks are missing, empty or unreadable is listed without masks and
        with the reason in ``ground_truth_issue``.
        """
        wanted = self.test_types if types is None else list(types)
        unknown = sorted(set(wanted) - set(self.test_types))
        if unknown:
            raise DataSetError(f"{self.path / 'test'}: no test type(s) {unknown}; found {self.test_types}")
        samples = []
        for anomaly_type in sorted(wanted):
            for path in _images_in(self.path / "test" / anomaly_type):
                size = image_size(path)
                masks: tuple[DefectMask, ...] = ()
                issue = None
                if anomaly_type != GOOD:
                    try:
                        masks = self._masks_for(anomaly_type, path.stem, size)
                    except MaskUnusable as exc:
                        issue = str(exc)
                samples.append(TestSample(path, anomaly_type, path.stem, masks, size, issue))
        return samples

    def _masks_for(self, anomaly_type: str, index: str, size: tuple[int, int]) -> tuple[DefectMask, ...]:
        """The usable masks of one anomalous image; MaskUnusable says why there are none."""
        if not self.has_ground_truth_folder:
            raise MaskUnusable(f"no ground truth ({self.path / 'ground_truth'} does not exist)")
        gt = self.path / "ground_truth" / anomaly_type
        if self.layout == "flat":
            return (self._flat_mask(gt, anomaly_type, index, size),)
        folder = gt / index
        files = _images_in(folder) if folder.is_dir() else []
        if not files:
            raise MaskUnusable(f"{folder}: mask folder missing or empty; expected one mask PNG per defect")
        return tuple(DefectMask(f, self._defect_of(f, size)) for f in files)

    def _flat_mask(self, gt: Path, anomaly_type: str, index: str, size: tuple[int, int]) -> DefectMask:
        mask_path = next((gt / f"{index}{FLAT_MASK_SUFFIX}{s}" for s in IMAGE_SUFFIXES
                          if (gt / f"{index}{FLAT_MASK_SUFFIX}{s}").is_file()), None)
        if mask_path is None:
            hint = (f" (found folder {gt / index}: a LOCO multi-mask layout needs {self.path / DEFECTS_CONFIG})"
                    if (gt / index).is_dir() else "")
            raise MaskUnusable(f"{gt / (index + FLAT_MASK_SUFFIX + '.png')}: mask missing{hint}")
        values = self._checked_mask_values(mask_path, size)
        if not values.any():
            raise MaskUnusable(f"{mask_path}: mask is empty (no non-zero pixel)")
        defect = next(d for d in self.defects if d.defect_name == anomaly_type)
        return DefectMask(mask_path, defect, binary=True)

    @staticmethod
    def _checked_mask_values(path: Path, size: tuple[int, int]) -> np.ndarray:
        """The mask's values; MaskUnusable if it cannot be read, DataSetError if its size is not its image's."""
        try:
            values = _load_mask_values(path)
        except DataSetError as exc:
            raise MaskUnusable(str(exc)) from exc
        if values.shape != size:
            raise DataSetError(f"{path}: mask size (H, W)={values.shape} differs from its image's {size}")
        return values

    def _defect_of(self, path: Path, size: tuple[int, int]) -> DefectConfig:
        """The defect a LOCO mask marks, from its single non-zero pixel value."""
        values = np.unique(self._checked_mask_values(path, size))
        values = values[values != 0]
        if len(values) == 0:
            raise MaskUnusable(f"{path}: mask is empty (no non-zero pixel)")
        if len(values) != 1:
            raise DataSetError(f"{path}: mask has non-zero values {values.tolist()}; expected exactly one "
                               f"pixel_value from {self.path / DEFECTS_CONFIG}")
        value = int(values[0])
        defect = next((d for d in self.defects if d.pixel_value == value), None)
        if defect is None:
            raise DataSetError(f"{path}: mask value {value} is not in {self.path / DEFECTS_CONFIG} "
                               f"(pixel values {[d.pixel_value for d in self.defects]})")
        return defect

    def data_hash(self) -> str:
        """sha256 over the train and validation files' names (relative to the category) and bytes."""
        digest = hashlib.sha256()
        for path in self.train_paths + self.validation_paths:
            digest.update(path.relative_to(self.path).as_posix().encode() + b"\0")
            with path.open("rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    digest.update(chunk)
        return digest.hexdigest()
