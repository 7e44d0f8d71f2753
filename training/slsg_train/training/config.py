"""Training configuration as data. Defaults reproduce the authors' settings (SLSG.md)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

PRECISIONS = ("auto", "fp32", "bf16")  # of training's forward passes; see precision.py


def check_precision(name: str) -> None:
    if name not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}; got {name!r}")


@dataclass
class PretrainConfig:
    """Generative pre-training of the encoder: restore images from masked / shuffled-patch copies."""

    steps: int = 1000
    lr_encoder: float = 1e-4
    lr_decoder: float = 1e-3
    patch_size: int = 16          # at 256 px; scaled with the image size
    mask_ratio: float = 0.3       # share of patches blanked out
    shuffle_ratio: float = 0.2    # share of patches permuted among themselves
    freeze_encoder_after: bool = True  # stage 2 keeps the pre-trained encoder frozen (authors)


@dataclass
class LossConfig:
    focal_weight: float = 0.4
    focal_gamma: float = 4.0
    l1_weight: float = 0.6
    aux_l1_weight: float = 0.3


@dataclass
class OptimConfig:
    lr: float = 0.04
    momentum: float = 0.9
    weight_decay: float = 3e-5
    # cosine annealing over all steps (authors); warm-up keeps early BN statistics sane at lr 0.04
    warmup_steps: int = 0


CALIBRATION_HOLDOUT = 0.2


@dataclass
class TrainConfig:
    category: str = ""
    preset: str = "default"                  # "default" (EfficientNet-Lite0) or "paper" (ResNet-18)
    backbone: str | None = None              # overrides the preset's backbone
    backbone_weights: str | None = "imagenet"
    allow_download: bool = False             # resnet18 "imagenet" weights via torch.hub when online
    # (H, W), multiples of 32; or "auto" / "auto:N": from the training images' aspect ratio within
    # N x N pixels (256), resolved when training starts (data/input_size.py); square images give 256x256
    image_size: tuple[int, int] | str = "auto"
    steps: int = 3500
    batch_size: int = 4                      # normal images per step; as many simulated copies are added
    seed: int = 0
    colour_jitter: float = 0.1
    workers: int = 2
    device: str = "auto"
    precision: str = "auto"                  # training forward passes: "auto" (bf16 where native), "fp32", "bf16"
    checkpoint_every: int = 250
    log_every: int = 10
    anomaly_source: str | None = None        # DTD folder for textures; None = built-in textures
    calibration_fpr: float = 0.01
    # at most this share of train/good is held out of training to calibrate on, where validation/good
    # has fewer normal images than the target rate needs (see training/calibration.py)
    calibration_holdout: float = CALIBRATION_HOLDOUT
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    simulation: dict[str, Any] = field(default_factory=dict)  # SimulationConfig.to_dict()
    model: dict[str, Any] = field(default_factory=dict)       # SLSGConfig fields over the preset's

    def __post_init__(self) -> None:
        check_precision(self.precision)
        size = self.image_size  # a settings file may say 256, "320x256", "auto" or [256, 320]
        self.image_size = parse_image_size(size) if isinstance(size, (str, int)) else tuple(size)
        if not 0 <= self.calibration_holdout < 1:
            raise ValueError(f"calibration_holdout must be in [0, 1), got {self.calibration_holdout}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainConfig":
        data = dict(data)
        nested = {"pretrain": PretrainConfig, "loss": LossConfig, "optim": OptimConfig}
        for key, kind in nested.items():
            if isinstance(data.get(key), dict):
                data[key] = kind(**data[key])
        if isinstance(data.get("image_size"), list):
            data["image_size"] = tuple(data["image_size"])
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown training settings: {sorted(unknown)}")
        return cls(**data)


def merge_settings(base: dict, overrides: dict) -> dict:
    """``base`` updated by ``overrides``, nested mappings merged key by key."""
    out = dict(base)
    for key, value in overrides.items():
        nested = isinstance(value, dict) and isinstance(out.get(key), dict)
        out[key] = merge_settings(out[key], value) if nested else value
    return out


def load_settings_file(path: str) -> dict:
    """A JSON or YAML mapping of training settings; errors name the file and the problem."""
    import json
    from pathlib import Path

    try:
        text = Path(path).read_text()
        if path.endswith((".yaml", ".yml")):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as exc:  # noqa: BLE001 - any read or parse failure is the file's fault
        raise ValueError(f"--config {path}: cannot parse: {exc}") from exc
    if not isinstance(data, dict):
        raise ValueError(f"--config {path}: expected a mapping of settings, got {type(data).__name__}")
    return data


def resolve_train_config(category: str, layers: list[dict[str, Any]]) -> TrainConfig:
    """The one place where a run's settings are layered, lowest first: TrainConfig's defaults, the
    preset's network fields, the category's simulation prior, then each of ``layers`` (settings
    files, then the command line's flags), nested mappings merged key by key.

    The result is complete: its ``model`` holds every network field and its ``simulation`` every
    simulator field, so what ``slsg train --print-config`` shows is what the run uses.
    """
    from slsg_train.models import preset
    from slsg_train.simulation import SimulationConfig

    settings = TrainConfig().to_dict()
    for layer in layers:
        settings = merge_settings(settings, layer)
    settings["category"] = category
    cfg = TrainConfig.from_dict(settings)
    changes: dict[str, Any] = {"backbone_weights": cfg.backbone_weights, "allow_download": cfg.allow_download}
    if cfg.backbone:
        changes["backbone"] = cfg.backbone
    if cfg.pretrain.steps > 0:
        changes["freeze_encoder"] = cfg.pretrain.freeze_encoder_after
    cfg.model = preset(cfg.preset, **{**changes, **cfg.model}).to_dict()
    prior = SimulationConfig().for_category(category)  # a file's own category_overrides apply last
    simulation = SimulationConfig.from_dict(merge_settings(prior.to_dict(), cfg.simulation))
    if cfg.anomaly_source:
        simulation = dataclasses.replace(simulation, texture_source=cfg.anomaly_source)
    cfg.simulation = simulation.for_category(category).to_dict()
    return cfg


def parse_image_size(text: str | int) -> tuple[int, int] | str:
    """'256' -> (256, 256); '320x256' (WxH) -> (256, 320), both sides multiples of 32; 'auto' and
    'auto:N' stay as they are (lower case), to be resolved from the training images."""
    from slsg.sizes import parse_size
    from slsg_train.data.input_size import parse_auto

    text = str(text).strip().lower()
    if parse_auto(text) is not None:
        return text
    return parse_size(text, multiple=32, minimum=32, form="N, WxH or auto[:N]")
