"""The run checkpoint: weights plus everything needed to rebuild, resume, calibrate and export.

One typed record, :class:`RunCheckpoint`, written by the trainer, `slsg calibrate` / `slsg checks`
and `slsg import-authors`, and read by everyone through :func:`load_checkpoint`. On disk it is a
``torch.save``\\ d dict with a ``format`` version; :func:`migrate` turns every older layout into the
current one, so no other code knows what older checkpoints looked like (docs/model.md, "Run checkpoint").
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from slsg.contract import IMAGENET_MEAN, IMAGENET_STD, RESIZE_BILINEAR, RESIZE_FILTERS, Calibration

if TYPE_CHECKING:
    from slsg_train.models import SLSGConfig
    from slsg_train.training.config import TrainConfig

FORMAT_V1, FORMAT_V2 = "slsg-checkpoint/1", "slsg-checkpoint/2"
CHECKPOINT_FORMAT = "slsg-checkpoint/3"
# pretrain / train: an unfinished run (resumable); done: trained and calibrated; imported: the authors' weights
STAGES = ("pretrain", "train", "done", "imported")


class CheckpointError(ValueError):
    pass


def normalisation() -> dict[str, list[float]]:
    return {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD), "scale": [1 / 255]}


@dataclass
class RunCheckpoint:
    """A run's state. ``train_config`` is None for imported weights (no run of ours trained them);
    ``calibration`` is None until calibrated; ``calibration_split`` (CalibrationSplit.summary()) is None
    where the split was not recorded (see :meth:`held_out_train`). ``decoder_state``, ``optimizer`` and
    ``scheduler`` hold what an unfinished stage needs to resume. ``path`` is where it was read from;
    it is not stored."""

    stage: str
    step: int
    category: str
    model_config: SLSGConfig
    model_state: dict[str, torch.Tensor]
    image_size: tuple[int, int]  # (H, W)
    top_k: int
    train_config: TrainConfig | None
    data_root: str
    resize: str = RESIZE_BILINEAR  # the filter frames are resized with (contract.RESIZE_FILTERS)
    normalisation: dict[str, list[float]] = field(default_factory=normalisation)
    data_hash: str = ""  # of the training data ("": unknown)
    image_colour: str = ""  # "colour" / "greyscale" ("": not recorded)
    calibration_split: dict[str, int] | None = None
    input_size_choice: dict[str, Any] | None = None  # how image_size "auto" was resolved, None if given
    calibration: Calibration | None = None
    calibration_stats: dict[str, Any] = field(default_factory=dict)
    checks_left_out: dict[str, str] = field(default_factory=dict)  # check name -> why fitting left it out
    # which parts the fused score listens to (training/fusion.py select_fusion's report): "separation" part -> kind -> image
    # AUROC, "chance_cutoff", "left_out" part -> why ("slsg_map": SLSG's own map), "normal_images", "anomalies"
    fusion: dict[str, Any] = field(default_factory=dict)
    decoder_state: dict[str, Any] | None = None
    optimizer: dict[str, Any] | None = None
    scheduler: dict[str, Any] | None = None
    imported_from: dict[str, Any] | None = None
    project_version: str = ""
    created: str = ""
    path: Path | None = field(default=None, compare=False)

    @property
    def backbone(self) -> str:
        return self.model_config.backbone

    def held_out_train(self, category) -> int:
        """How many of train/good's last images the run held out of training (``category``: its
        LocoCategory). Without a recorded split: nothing when the data set has validation/good, else its
        last tenth (at least 2), what runs from before the record (and imported weights) held out."""
        if self.calibration_split is not None:
            return int(self.calibration_split["held_out_train"])
        return 0 if category.validation_paths else max(2, len(category.train_paths) // 10)

    def to_payload(self) -> dict[str, Any]:
        """The stored dict: every field but ``path``, configs and calibration as plain dicts."""
        payload = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "path"}
        payload["model_config"] = self.model_config.to_dict()
        payload["train_config"] = self.train_config.to_dict() if self.train_config is not None else None
        payload["calibration"] = dataclasses.asdict(self.calibration) if self.calibration is not None else None
        payload["image_size"] = list(self.image_size)
        return {"format": CHECKPOINT_FORMAT, **payload}

    @classmethod
    def from_payload(cls, payload: dict[str, Any], path: str | Path | None = None) -> RunCheckpoint:
        """The checkpoint a current-format dict describes; a missing or unknown field, or one that does
        not parse, is a :class:`CheckpointError` naming it and ``path``."""
        where = str(path) if path is not None else "checkpoint"
        stored = {f.name for f in dataclasses.fields(cls)} - {"path"}
        data = {k: v for k, v in payload.items() if k != "format"}
        missing, unknown = sorted(stored - set(data)), sorted(set(data) - stored)
        if missing or unknown:
            problems = ([f"missing field(s) {', '.join(missing)}"] if missing else []) + (
                [f"unknown field(s) {', '.join(unknown)}"] if unknown else [])
            raise CheckpointError(f"{where} ({CHECKPOINT_FORMAT}): {'; '.join(problems)}")
        for name, parse in _PARSERS.items():
            try:
                data[name] = parse(data[name])
            except (TypeError, ValueError, KeyError) as exc:
                raise CheckpointError(f"{where}: field {name!r} is not valid: {exc}") from exc
        return cls(**data, path=Path(path) if path is not None else None)


# what a stored network config means by a setting it lacks: how the model worked before the setting existed
_SLSG_CONFIG_BEFORE = {"reference_padding": "symmetric"}


def _slsg_config(value: dict[str, Any]) -> SLSGConfig:
    from slsg_train.models import SLSGConfig

    return SLSGConfig.from_dict({**_SLSG_CONFIG_BEFORE, **value})


def _train_config(value: dict[str, Any] | None) -> TrainConfig | None:
    from slsg_train.training.config import TrainConfig

    return TrainConfig.from_dict(value) if value is not None else None


def _calibration(value: dict[str, Any] | None) -> Calibration | None:
    return Calibration.from_dict(value) if value is not None else None


def _image_size(value: Any) -> tuple[int, int]:
    h, w = (int(v) for v in value)
    return h, w


def _one_of(allowed: tuple[str, ...]):
    def check(value: str) -> str:
        if value not in allowed:
            raise ValueError(f"{value!r} is not one of {', '.join(allowed)}")
        return value
    return check


def _state(value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise TypeError(f"expected a state dict, got {type(value).__name__}")
    return value


_PARSERS = {
    "stage": _one_of(STAGES), "step": int, "top_k": int, "resize": _one_of(RESIZE_FILTERS),
    "model_config": _slsg_config, "train_config": _train_config, "calibration": _calibration,
    "image_size": _image_size, "model_state": _state,
}


# ---------------------------------------------------------------- older formats

# what a version-1 checkpoint meant by a field it lacks: the network settings from before they
# existed (the composition check then trained on normal images only), float32 training before mixed
# precision, bilinear resizing before the setting
_V1_NETWORK = {"composition_restoration": 0.0, "layer1_input": "stem", "graph_value_on_tokens": False,
               "graph_position_table": False, "aux_upsampling": "direct"}
_V1_DEFAULTS: dict[str, Any] = {
    "resize": RESIZE_BILINEAR, "data_hash": "", "image_colour": "", "calibration_split": None,
    "input_size_choice": None, "calibration": None, "calibration_stats": {}, "checks_left_out": {}, "decoder_state": None,
    "optimizer": None, "scheduler": None, "imported_from": None, "train_config": None, "data_root": "",
    "project_version": "", "created": "",
}


def _v1_to_v2(payload: dict[str, Any]) -> dict[str, Any]:
    """Version 1 wrote optional state only where set, kept a copy of the backbone name and the
    calibration's ``score_max``, and its early releases lacked the fields in ``_V1_DEFAULTS``."""
    data = {**_V1_DEFAULTS, **payload, "format": FORMAT_V2}
    data.pop("backbone", None)  # the model config's
    if isinstance(data.get("model_config"), dict):
        data["model_config"] = {**_V1_NETWORK, **data["model_config"]}
    if isinstance(data["train_config"], dict):
        data["train_config"] = {"precision": "fp32", **data["train_config"]}
    if isinstance(data["calibration"], dict):  # score_max: the top of a linear scale the score no longer has
        data["calibration"] = {k: v for k, v in data["calibration"].items() if k != "score_max"}
    data["normalisation"] = data.get("normalisation") or normalisation()
    data["calibration_stats"] = data["calibration_stats"] or {}
    return data


def _v2_to_v3(payload: dict[str, Any]) -> dict[str, Any]:
    """Version 2 had no fusion record: every part fused (its configuration has no ``fuse_slsg_map``,
    which means True)."""
    return {**payload, "fusion": {}, "format": CHECKPOINT_FORMAT}


_MIGRATIONS = {FORMAT_V1: _v1_to_v2, FORMAT_V2: _v2_to_v3}


def migrate(payload: dict[str, Any]) -> dict[str, Any]:
    """``payload`` (a stored checkpoint dict of any format this code reads) in the current format;
    a current one is returned unchanged. Each step turns one version into the next."""
    while payload.get("format") != CHECKPOINT_FORMAT:
        step = _MIGRATIONS.get(payload.get("format"))
        if step is None:
            raise CheckpointError(f"unknown checkpoint format {payload.get('format')!r} (this version reads "
                                  f"{', '.join([*_MIGRATIONS, CHECKPOINT_FORMAT])})")
        payload = step(payload)
    return payload


# ---------------------------------------------------------------- files


def save_checkpoint(path: str | Path, checkpoint: RunCheckpoint) -> Path:
    """Write atomically: a crash mid-write never leaves a truncated checkpoint behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".checkpoint-", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        torch.save(checkpoint.to_payload(), tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def load_checkpoint(path: str | Path) -> RunCheckpoint:
    """The checkpoint at ``path`` (a file, or a run directory holding ``checkpoint.pt``), of any format."""
    path = Path(path)
    if path.is_dir():
        path = path / "checkpoint.pt"
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist (expected RUN_DIR/checkpoint.pt written by `slsg train`)")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # corrupt or not a torch file
        raise CheckpointError(f"checkpoint {path} cannot be read: {exc}") from exc
    if not isinstance(payload, dict) or not str(payload.get("format", "")).startswith("slsg-checkpoint/"):
        raise CheckpointError(f"{path} is not an SLSG checkpoint (expected format {CHECKPOINT_FORMAT!r})")
    try:
        payload = migrate(payload)
    except CheckpointError as exc:
        raise CheckpointError(f"{path}: {exc}") from exc
    return RunCheckpoint.from_payload(payload, path)


def build_model(model_config: SLSGConfig):
    """Rebuild the network from the stored config (no pretrained download: weights come from the state)."""
    from slsg_train.models import SLSG

    return SLSG(dataclasses.replace(model_config, backbone_weights=None))
