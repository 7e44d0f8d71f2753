"""Settings and result type of the anomaly simulator, as data (SLSG, arXiv 2305.00398, "pseudo-prior knowledge").

Defaults follow the authors' code (its anomaly-simulation modules in the SLSG repository,
areylng/SLSG on GitHub, not part of this project; they build on DRAEM): structural blobs from Perlin noise with 2**[0, 4)
cells and threshold 0.5, blend factor beta 0.75 with probability 0.25 else U(0, 0.9);
logical ("scar") blobs with 2**[0, 3) cells and threshold 0.4, beta U(0, 0.25), about
58% of samples (``uniform(0, 0.6) < 0.35``). The authors' per-category hand settings are
``LOCO_CATEGORY_OVERRIDES`` instead of ``if category == ...`` branches.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from typing import Any

import numpy as np

FOREGROUND_METHODS = ("border_difference", "otsu", "none")
LOGICAL_OPERATIONS = ("grid_shuffle", "flip", "band_swap", "donor_paste", "colour_jitter", "part_recolour")


@dataclass
class ForegroundConfig:
    """How to find the object so that anomaly masks stay on it.

    ``border_difference``: the background colour is the median of the image border; a pixel is
    foreground when some channel differs from it by more than ``threshold`` (0-255 levels).
    ``otsu``: Otsu's threshold on grey levels; the side less present on the border is foreground.
    ``none``: the whole image. In every case holes are filled, the result is dilated by
    ``dilation`` pixels (given at 256 px, scaled with the image) and an estimate covering less
    than ``min_fraction`` of the image falls back to the whole image.
    """

    method: str = "border_difference"
    threshold: float = 30.0
    dilation: int = 4
    min_fraction: float = 0.05

    def __post_init__(self) -> None:
        if self.method not in FOREGROUND_METHODS:
            raise ValueError(f"foreground.method {self.method!r} is not one of {FOREGROUND_METHODS}")
        if self.dilation < 0 or not 0.0 <= self.min_fraction <= 1.0:
            raise ValueError("foreground.dilation must be >= 0 and foreground.min_fraction in [0, 1]")


def _default_logical_ops() -> dict[str, float]:
    return {"grid_shuffle": 0.4, "flip": 0.2, "band_swap": 0.1, "donor_paste": 0.2, "colour_jitter": 0.1}


# The authors' per-category choices (utils.Scar_test, qianjing, CutPastePlus2.augment_image).
LOCO_CATEGORY_OVERRIDES: dict[str, dict[str, Any]] = {
    "breakfast_box": {
        "logical_probability": 0.5,  # uniform(0, 0.7) < 0.35
        "beta_range": (0.0, 0.7), "fixed_beta_probability": 0.0,
        "logical_grids": ((3, 2),), "logical_ops": {"grid_shuffle": 1 / 3, "flip": 2 / 3},
        "logical_jitter_probability": 0.0,
    },
    "juice_bottle": {
        "beta_range": (0.0, 0.0), "fixed_beta_probability": 0.0, "logical_beta_range": (0.0, 0.0),
        "logical_grids": ((3, 3),), "logical_ops": {"grid_shuffle": 0.25, "flip": 0.333, "donor_paste": 0.417},
        "logical_jitter_probability": 0.0,
    },
    "pushpins": {
        "beta_range": (0.0, 0.4), "fixed_beta_probability": 0.0, "logical_beta_range": (0.0, 0.0),
        "min_mask_fraction": 64 / 256**2,
        "logical_grids": ((3, 5),), "logical_ops": {"grid_shuffle": 0.25, "flip": 0.333, "donor_paste": 0.417},
        "logical_jitter_probability": 0.7,
        "foreground": {"method": "none"},  # the compartment box fills the frame
    },
    "screw_bag": {
        "logical_grids": ((4, 4),), "logical_ops": {"grid_shuffle": 0.25, "flip": 0.25, "donor_paste": 0.5},
        "logical_jitter_probability": 1.0, "logical_jitter": (0.7, 0.7, 0.45),
    },
    "splicing_connectors": {
        "logical_beta_range": (0.0, 0.0),
        "logical_grids": ((2, 4), (1, 4)), "logical_ops": {"donor_paste": 0.7, "band_swap": 0.3},
        "logical_jitter_probability": 0.0,
    },
}


@dataclass
class SimulationConfig:
    """Everything the simulator draws from; ``to_dict``/``from_dict`` round-trip through JSON."""

    logical_probability: float = 0.35 / 0.6  # share of logical samples
    # Structural (DRAEM): image*(1-m) + (1-beta)*texture*m + beta*image*m.
    beta_range: tuple[float, float] = (0.0, 0.9)
    fixed_beta: float = 0.75
    fixed_beta_probability: float = 0.25
    perlin_scale_range: tuple[int, int] = (0, 4)  # 2**randint(lo, hi) cells per axis (DRAEM: (0, 6))
    perlin_threshold: float = 0.5
    perlin_rotation: float = 90.0  # noise rotated by U(-90, 90) degrees
    min_mask_fraction: float = 49 / 256**2  # >= 49 px at 256x256, scaled with the area
    max_attempts: int = 10  # fresh draws before a minimum blob is forced
    texture_augmentations: int = 3
    texture_source: str | None = None  # DTD folder (images/<class>/*.jpg) or None: built-in textures
    # Logical ("scar"): rearranged normal content pasted through a blob.
    logical_grids: tuple[tuple[int, int], ...] = ((4, 8), (3, 3), (2, 4))  # (rows, columns)
    logical_ops: dict[str, float] = field(default_factory=_default_logical_ops)  # relative weights
    logical_perlin_scale_range: tuple[int, int] = (0, 3)
    logical_perlin_threshold: float = 0.4
    logical_beta_range: tuple[float, float] = (0.0, 0.25)
    logical_rotate_probability: float = 0.5  # the source is first turned by 180 degrees
    logical_jitter_probability: float = 0.2  # ... and colour-jittered
    logical_jitter: tuple[float, float, float] = (0.4, 0.4, 0.2)  # brightness, saturation, hue
    part_saturation: float = 80.0  # part_recolour: a pixel is coloured above this HSV saturation (0-255)
    logical_change_tolerance: float = 12.0  # a pixel "changed" when some channel moved more (0-255)
    foreground: ForegroundConfig = field(default_factory=ForegroundConfig)
    category_overrides: dict[str, dict[str, Any]] = field(
        default_factory=lambda: copy.deepcopy(LOCO_CATEGORY_OVERRIDES)
    )

    def __post_init__(self) -> None:
        if isinstance(self.foreground, dict):
            self.foreground = ForegroundConfig(**self.foreground)
        self._normalise_tuples()
        self._validate()
        for category, overrides in self.category_overrides.items():
            _apply_overrides(self, overrides, f"category_overrides[{category!r}]")  # fail early on typos

    def _normalise_tuples(self) -> None:
        # JSON gives lists; keep tuples so configs compare equal after a round trip.
        for name in ("beta_range", "perlin_scale_range", "logical_perlin_scale_range", "logical_beta_range",
                     "logical_jitter"):
            setattr(self, name, tuple(getattr(self, name)))
        self.logical_grids = tuple(tuple(int(n) for n in grid) for grid in self.logical_grids)
        self.category_overrides = _jsonable(self.category_overrides)  # stored in JSON form

    def _validate(self) -> None:
        for name in ("logical_probability", "fixed_beta_probability", "logical_rotate_probability",
                     "logical_jitter_probability"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        for name in ("beta_range", "logical_beta_range"):
            lo, hi = getattr(self, name)
            if not 0.0 <= lo <= hi <= 1.0:
                raise ValueError(f"{name} must satisfy 0 <= low <= high <= 1, got {(lo, hi)}")
        for name in ("perlin_scale_range", "logical_perlin_scale_range"):
            lo, hi = getattr(self, name)
            if not 0 <= lo < hi:
                raise ValueError(f"{name} must satisfy 0 <= low < high (high exclusive), got {(lo, hi)}")
        if not self.logical_grids or any(len(g) != 2 or min(g) < 1 for g in self.logical_grids):
            raise ValueError(f"logical_grids must be non-empty (rows, columns) pairs >= 1, got {self.logical_grids}")
        unknown = set(self.logical_ops) - set(LOGICAL_OPERATIONS)
        if unknown:
            raise ValueError(f"logical_ops has unknown operation(s) {sorted(unknown)}; known: {LOGICAL_OPERATIONS}")
        if not self.logical_ops or min(self.logical_ops.values()) < 0 or sum(self.logical_ops.values()) <= 0:
            raise ValueError(f"logical_ops needs non-negative weights with a positive sum, got {self.logical_ops}")
        if not 0.0 < self.min_mask_fraction < 1.0 or self.max_attempts < 1 or self.texture_augmentations < 0:
            raise ValueError("need 0 < min_mask_fraction < 1, max_attempts >= 1, texture_augmentations >= 0")

    def for_category(self, category: str) -> SimulationConfig:
        """The settings for ``category``: its overrides (if any) applied, ``category_overrides`` emptied.

        The result is what a checkpoint should store: specific, with nothing left to resolve.
        """
        return _apply_overrides(self, self.category_overrides.get(category, {}), f"category_overrides[{category!r}]")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (tuples become lists)."""
        return _jsonable(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SimulationConfig:
        """Inverse of ``to_dict``; unknown keys raise ``ValueError`` naming them."""
        if not isinstance(data, dict):
            raise ValueError(f"SimulationConfig.from_dict needs a mapping, got {type(data).__name__}")
        data = {"category_overrides": copy.deepcopy(LOCO_CATEGORY_OVERRIDES), **data}
        return _apply_overrides(cls(category_overrides={}), data, "SimulationConfig")


def _apply_overrides(config: Any, overrides: dict[str, Any], where: str) -> Any:
    """A copy of dataclass ``config`` with ``overrides`` set; nested dicts update nested dataclasses."""
    if not isinstance(overrides, dict):
        raise ValueError(f"{where} must be a mapping, got {type(overrides).__name__}")
    names = {f.name for f in dataclasses.fields(config)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise ValueError(f"{where}: unknown setting(s) {unknown}; known: {sorted(names)}")
    changes: dict[str, Any] = {}
    for key, value in overrides.items():
        current = getattr(config, key)
        if dataclasses.is_dataclass(current) and isinstance(value, dict):
            value = _apply_overrides(current, value, f"{where}.{key}")
        changes[key] = copy.deepcopy(value)
    if isinstance(config, SimulationConfig) and "category_overrides" not in changes:
        # A derived config is specific already; its copy of the overrides would only be re-checked.
        changes["category_overrides"] = {}
    return dataclasses.replace(config, **changes)


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


@dataclass
class SimulatedAnomaly:
    """One simulated anomalous copy of a normal image."""

    image: np.ndarray  # uint8 (H, W, 3)
    mask: np.ndarray  # float32 (H, W), 1 where the image was altered
    kind: str  # "structural" | "logical"
