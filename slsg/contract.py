"""The model-repository contract between the training side and the gateway.

A model repository is Triton's layout: ``<root>/<name>/config.pbtxt`` and
``<root>/<name>/<version>/model.onnx``. Every exported network has the same
signature, so every client sends the same thing:

- input ``image``: UINT8 RGB, NHWC ``[-1, H, W, 3]`` at the model's input size
  (cast, scaling, ImageNet normalisation and the transpose happen in the graph);
- output ``score``: FP32 ``[-1, 1]``, calibrated so that 0.5 is the decision threshold; above it the
  score keeps rising with the evidence and never reaches 1, so strong anomalies stay in order
  (see :meth:`Calibration.calibrated_score`);
- output ``anomaly_map``: FP32 ``[-1, 1, H, W]``, each pixel's anomaly probability on the score's
  scale (the same calibration, pixel by pixel: 0.5 at the threshold, never 1), so a heat map reads
  the same for every model and regions keep their order. Cards from before that say
  ``anomaly_map_scale: "probability"``: their map is the plain probability. Either way a region is
  where the map exceeds the card's ``calibration.pixel_threshold``.

The ONNX metadata entry ``slsg.model_card`` holds a JSON ``ModelCard``.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

INPUT_IMAGE = "image"
OUTPUT_ANOMALY_MAP = "anomaly_map"
OUTPUT_SCORE = "score"
# FP32 [N, K]: parts found per part kind; only in models whose card lists part kinds (ModelCard.part_kinds)
OUTPUT_PART_COUNTS = "part_counts"
MODEL_CARD_KEY = "slsg.model_card"
MODEL_FILENAME = "model.onnx"
CONFIG_FILENAME = "config.pbtxt"
DECISION_THRESHOLD = 0.5  # calibrated scores: >= 0.5 is anomalous
# what a card's anomaly_map holds: the calibrated scale (exports since it existed) or the probability
ANOMALY_MAP_CALIBRATED = "calibrated"
ANOMALY_MAP_PROBABILITY = "probability"
# raw scores are float32 probabilities: the largest one under 1, and the smallest a log-odds is taken of
_FLOAT32_BELOW_ONE = 1.0 - 2.0**-24
_SMALLEST_SCORE = 1e-12
MIN_LOG_ODDS_SCALE = 1.0  # the score's unit above the threshold, in log-odds, at least a factor e in odds

# how a frame is brought to the model's input size (aspect ratio ignored): Pillow's filter of that name.
# "lanczos" is the SLSG authors' preprocessing, which their imported weights expect.
RESIZE_BILINEAR = "bilinear"
RESIZE_LANCZOS = "lanczos"
RESIZE_FILTERS = (RESIZE_BILINEAR, RESIZE_LANCZOS)

# the arithmetic of an exported graph: float32 throughout, or INT8 (ONNX QDQ: quantized convolutions and
# matrix products, the blocks that quantization hurts and the score's calibration in float32); either
# way the inputs and outputs are the contract's, so a server runs both alike
PRECISION_FP32 = "fp32"
PRECISION_INT8 = "int8"
PRECISIONS = (PRECISION_FP32, PRECISION_INT8)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

CARD_FORMAT = 2  # of ModelCard's JSON; migrate_card() reads every older one

_MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


@dataclass
class Calibration:
    """Maps a raw image score (mean of the top-K map pixels, a probability) to [0, 1] with 0.5 at the threshold.

    ``score_min`` and ``score_median`` are the lowest and the median raw score of the normal calibration
    images. Below the threshold the map is linear in the raw score, ``score_min`` -> 0; above it, it
    is in the raw score's log-odds (:meth:`calibrated_score`). ``score_median`` is None on cards from
    before it existed (``migrate_card`` drops older cards' dead ``score_max``); fields
    :meth:`from_dict` does not know are ignored.

    ``num_images`` normal images, never trained on, set the threshold; the promised false-positive
    rates (:meth:`expected_fpr`, :meth:`fpr_upper`) count them alone. ``scale_images`` other such
    images fitted the reference checks' scales (0: the model has none). None on cards from before that
    split: a model with checks had them scaled on the threshold's own images, and its promise is
    optimistic (new normal images pass more often than its threshold images did).
    """

    raw_threshold: float = 0.5
    score_min: float = 0.0
    target_fpr: float = 0.01
    pixel_threshold: float = 0.5  # anomaly-map value above which a pixel belongs to a region
    num_images: int = 0
    score_median: float | None = None
    scale_images: int | None = None

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Calibration":
        """A stored calibration (card or checkpoint); fields a newer version added are ignored."""
        return cls(**_known_fields(cls, data))

    def expected_fpr(self) -> float | None:
        """The share of new normal images at or above the threshold, on average (None before calibration):
        see :func:`calibration_exceedances`."""
        n = self.num_images
        return (calibration_exceedances(self.target_fpr, n) + 1) / (n + 1) if n > 0 else None

    def fpr_upper(self, probability: float = 0.9) -> float | None:
        """The false-positive rate this threshold stays under for ``probability`` of calibration sets (None
        before calibration). The rate a line sees depends on which normal images calibrated it: with k of n
        at or above the threshold it is Beta(k + 1, n - k) distributed, with mean :meth:`expected_fpr`.
        Above all of 60 images: 1.6 % on average, under 3.8 % for nine calibration sets in ten."""
        n = self.num_images
        if n <= 0:
            return None
        k = calibration_exceedances(self.target_fpr, n)
        return beta_quantile(k + 1, n - k, probability)

    def score_floor(self) -> float:
        """The raw score mapped onto 0, at least 1e-6 below the threshold."""
        return min(self.score_min, self.raw_threshold - 1e-6)

    def log_odds_threshold(self) -> float:
        """The raw threshold in log-odds (a threshold at or above 1, which no float32 score under 1
        reaches, counts as the largest float32 under 1)."""
        return _logit(self.raw_threshold)

    def log_odds_scale(self) -> float:
        """The score's unit above the threshold: how far, in log-odds, the median normal calibration
        image lies below the threshold (the lowest one on older cards), at least 1."""
        typical = self.score_min if self.score_median is None else self.score_median
        return max(self.log_odds_threshold() - _logit(typical), MIN_LOG_ODDS_SCALE)

    def on_calibrated_map(self) -> "Calibration":
        """This calibration for a model whose anomaly map is calibrated like its score: the pixel
        threshold (a probability) becomes its value on that map, 0.5 where it is the image threshold."""
        return replace(self, pixel_threshold=float(self.calibrated_score(_logit(self.pixel_threshold))))

    def calibrated_score(self, log_odds: Any) -> Any:
        """Calibrated score(s) in [0, 1] of raw scores given as their log-odds; floats or numpy arrays.

        Below the threshold: linear in the raw score, from ``score_min`` (0) to the threshold (0.5).
        Above it: 1 - 0.5 / (1 + m), with m the log-odds above the threshold in units of
        :meth:`log_odds_scale`: 0.75 for an image as far above the threshold as a typical normal image
        is below it, 0.9 for four times that, and never 1. The raw score itself cannot do this: a mean
        of K probabilities is exactly 1.0 in float32 for most clear anomalies, its log-odds is not.
        """
        import numpy as np

        log_odds = np.asarray(log_odds, dtype=np.float64)
        threshold, floor = self.log_odds_threshold(), self.score_floor()
        with np.errstate(over="ignore"):
            raw = 1.0 / (1.0 + np.exp(-log_odds))
        below = 0.5 * (raw - floor) / (self.raw_threshold - floor)
        above = 1.0 - 0.5 / (1.0 + np.maximum(log_odds - threshold, 0.0) / self.log_odds_scale())
        out = np.clip(np.where(log_odds < threshold, below, above), 0.0, 1.0)
        return out if out.ndim else float(out)


def _logit(p: float) -> float:
    p = min(max(p, _SMALLEST_SCORE), _FLOAT32_BELOW_ONE)
    return math.log(p) - math.log1p(-p)


def calibration_exceedances(target_fpr: float, num_images: int) -> int:
    """How many of ``num_images`` normal calibration scores may lie at or above the threshold.

    A new normal image's score is equally likely to rank anywhere among the n calibration scores, so
    with k of them above the threshold it lands there with probability (k + 1) / (n + 1). The largest k
    with (k + 1) / (n + 1) <= target_fpr meets the target on average (split-conformal); below
    n = 1 / target_fpr - 1 images (99 for 1 %) not even k = 0 does, and the threshold is then simply
    above all of them (see :func:`images_for_fpr`).
    """
    if not 0 <= target_fpr < 1:
        raise ValueError(f"target false-positive rate {target_fpr} must be in [0, 1)")
    if num_images < 0:
        raise ValueError(f"the number of calibration images must be >= 0, got {num_images}")
    return max(math.floor(target_fpr * (num_images + 1) + 1e-9) - 1, 0)


def beta_quantile(a: int, b: int, probability: float) -> float:
    """The ``probability`` quantile of Beta(a, b) for whole a, b >= 1, by bisection on its CDF, which for
    whole parameters is a binomial tail: P(Beta(a, b) <= x) = P(Binomial(a + b - 1, x) >= a)."""
    if a < 1 or b < 1 or not 0 < probability < 1:
        raise ValueError(f"need whole a, b >= 1 and 0 < probability < 1; got a={a}, b={b}, p={probability}")
    n = a + b - 1
    log_choose = [math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) for i in range(a)]

    def cdf(x: float) -> float:
        log_x, log_1x = math.log(x), math.log1p(-x)
        return 1.0 - sum(math.exp(c + i * log_x + (n - i) * log_1x) for i, c in enumerate(log_choose))

    lo, hi = 0.0, 1.0
    for _ in range(60):  # 2^-60: far below any rate that matters
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if cdf(mid) < probability else (lo, mid)
    return 0.5 * (lo + hi)


def images_for_fpr(target_fpr: float) -> int:
    """The fewest normal calibration images whose threshold meets ``target_fpr`` on average."""
    if not 0 < target_fpr < 1:
        raise ValueError(f"need a target false-positive rate in (0, 1), got {target_fpr}")
    return max(math.ceil(1 / target_fpr - 1e-9) - 1, 1)


@dataclass
class PartKind:
    """A part kind the model's component check counts: column ``i`` of ``part_counts`` is ``part_kinds[i]``."""

    name: str  # what the inspection answer calls it ("kind 1", or a colour name)
    expected: int  # the rounded mean count on the normal training images
    tolerance: int = 0  # a count off by more than this is explained in the answer

    def explain(self, found: float) -> dict[str, Any] | None:
        """``{"part", "found", "expected"}`` when ``found`` is off by more than the tolerance, else None."""
        count = int(round(float(found)))
        if abs(count - self.expected) <= self.tolerance:
            return None
        return {"part": self.name, "found": count, "expected": self.expected}


@dataclass
class ModelCard:
    """What a deployed model says about itself (stored as ONNX metadata and Triton parameters)."""

    name: str
    category: str
    backbone: str
    input_height: int
    input_width: int
    top_k: int
    calibration: Calibration = field(default_factory=Calibration)
    metrics: dict[str, Any] = field(default_factory=dict)
    training_data_hash: str = ""
    created: str = ""
    project_version: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    anomaly_map_scale: str = ANOMALY_MAP_CALIBRATED  # see the module docstring
    # what the training images were: "colour", "greyscale" (three equal channels), or "" (not recorded)
    image_colour: str = ""
    resize: str = RESIZE_BILINEAR  # the filter frames are resized with (RESIZE_FILTERS); older cards: bilinear
    # the component check's part kinds, in the order of the graph's part_counts columns; none: no such output
    part_kinds: list[PartKind] = field(default_factory=list)
    # the parts of the model its fused score ignores, and why ("slsg_map": SLSG's own map; others: checks, which
    # the graph then lacks); older cards: none
    fusion_left_out: dict[str, str] = field(default_factory=dict)
    precision: str = PRECISION_FP32  # PRECISIONS; cards from before the field are float32 graphs
    card_format: int = CARD_FORMAT  # migrate_card() reads every older one

    def __post_init__(self) -> None:
        if self.resize not in RESIZE_FILTERS:
            raise ValueError(f"model card resize {self.resize!r} is not one of {', '.join(RESIZE_FILTERS)}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"model card precision {self.precision!r} is not one of {', '.join(PRECISIONS)}")

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "ModelCard":
        data = migrate_card(json.loads(text))
        data["calibration"] = Calibration.from_dict(data.get("calibration", {}))
        data["part_kinds"] = [PartKind(**_known_fields(PartKind, k)) for k in data.get("part_kinds", [])]
        return cls(**_known_fields(cls, data))


def _card_v1_to_v2(data: dict[str, Any]) -> dict[str, Any]:
    """Version 1 (no ``card_format``) wrote fields only as they were added: a card without
    ``anomaly_map_scale`` has a probability map, and its calibration may carry the dead ``score_max``.
    Fields it lacks otherwise (resize, precision, part kinds, colour) mean the dataclass defaults."""
    data = {**data, "card_format": 2}
    data.setdefault("anomaly_map_scale", ANOMALY_MAP_PROBABILITY)
    calibration = data.get("calibration")
    if isinstance(calibration, dict):
        data["calibration"] = {k: v for k, v in calibration.items() if k != "score_max"}
    return data


_CARD_MIGRATIONS = {1: _card_v1_to_v2}


def migrate_card(data: dict[str, Any]) -> dict[str, Any]:
    """A stored model card (parsed JSON) of any format this code reads, in the current format; each step
    turns one version into the next. A card newer than this code is refused, naming both versions."""
    version = int(data.get("card_format", 1))
    if version > CARD_FORMAT:
        raise ValueError(f"model card format {version} is newer than this code reads ({CARD_FORMAT}): "
                         "upgrade the gateway")
    while version < CARD_FORMAT:
        data = _CARD_MIGRATIONS[version](data)
        version = int(data["card_format"])
    return data


def explain_counts(card: ModelCard, counts: Any) -> list[dict[str, Any]]:
    """The part kinds of ``card`` whose count in ``counts`` (one image's ``part_counts`` row) is off."""
    row = [float(c) for c in counts]
    if len(row) != len(card.part_kinds):
        raise ValueError(f"part_counts has {len(row)} columns, the card of {card.name!r} lists "
                         f"{len(card.part_kinds)} part kinds")
    found = (kind.explain(c) for kind, c in zip(card.part_kinds, row))
    return [e for e in found if e is not None]


def _known_fields(cls: type, data: dict[str, Any]) -> dict[str, Any]:
    """``data`` without keys ``cls`` does not have: a card written by a newer exporter still reads."""
    return {k: v for k, v in data.items() if k in cls.__dataclass_fields__}


def validate_model_name(name: str) -> str:
    if not _MODEL_NAME.match(name):
        raise ValueError(
            f"invalid model name {name!r}: use 1-64 letters, digits, '_', '-' or '.', starting with a letter or digit"
        )
    return name


def list_versions(root: str | Path, name: str) -> list[int]:
    """Versions of ``name`` in the repository that hold a model file, ascending."""
    model_dir = Path(root) / name
    if not model_dir.is_dir():
        return []
    return sorted(
        int(p.name) for p in model_dir.iterdir()
        if p.is_dir() and p.name.isdigit() and (p / MODEL_FILENAME).is_file()
    )


def next_version(root: str | Path, name: str) -> int:
    """The next free version number (1 for a new model). Never reuses a number, even of an empty folder."""
    model_dir = Path(root) / name
    taken = [int(p.name) for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit()] if model_dir.is_dir() else []
    return max(taken, default=0) + 1


def list_models(root: str | Path) -> list[str]:
    """Names of models with at least one servable version."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if p.is_dir() and list_versions(root, p.name))


def model_path(root: str | Path, name: str, version: int) -> Path:
    return Path(root) / name / str(version) / MODEL_FILENAME


# -- desired state: which version every gateway should serve -----------------------------------------------

SERVING_FILENAME = "serving.json"


class ServingStateError(ValueError):
    """A ``serving.json`` that cannot be used; the message names the file and the problem."""


@dataclass(frozen=True)
class ServingState:
    """The desired state of one model, ``<root>/<name>/serving.json``: the version every gateway serves.

    Written by ``slsg deploy`` (a rollback is the same command with an older version); each gateway
    polls it and loads that version on its backend. ``updated`` (UTC, ISO 8601) and ``previous`` (the
    version it replaced, None for a first deploy) are for people reading the file.
    """

    model: str
    version: int
    updated: str = ""
    previous: int | None = None

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"


def serving_path(root: str | Path, name: str) -> Path:
    return Path(root) / validate_model_name(name) / SERVING_FILENAME


def _whole_number(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def parse_serving_state(text: str, name: str, source: str = SERVING_FILENAME) -> ServingState:
    """Validate the text of ``name``'s serving.json; ServingStateError says what is wrong and where."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ServingStateError(f"{source}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ServingStateError(f"{source}: expected a JSON object, got {type(data).__name__}")
    if data.get("model", name) != name:
        raise ServingStateError(f"{source}: names model {data['model']!r} but lies in the folder of {name!r}")
    version = data.get("version")
    if not _whole_number(version) or version < 1:
        raise ServingStateError(f"{source}: 'version' must be a whole number >= 1, got {version!r}")
    previous = data.get("previous")
    if previous is not None and (not _whole_number(previous) or previous < 1):
        raise ServingStateError(f"{source}: 'previous' must be null or a whole number >= 1, got {previous!r}")
    updated = data.get("updated", "")
    if not isinstance(updated, str):
        raise ServingStateError(f"{source}: 'updated' must be a string, got {updated!r}")
    return ServingState(name, version, updated, previous)


def read_serving_state(root: str | Path, name: str) -> ServingState | None:
    """``name``'s desired state, None when it has no serving.json; ServingStateError when it is unusable."""
    path = serving_path(root, name)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        raise ServingStateError(f"{path}: cannot be read ({exc})") from None
    return parse_serving_state(text, name, str(path))


def models_with_serving_state(root: str | Path) -> list[str]:
    """Names of the models under ``root`` that have a serving.json (whether valid or not)."""
    root = Path(root)
    if not root.is_dir():
        return []
    names = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and (p / SERVING_FILENAME).is_file()):
        try:
            names.append(validate_model_name(folder.name))
        except ValueError:
            continue  # not a model folder ("lost+found", ".snapshot"): nothing a gateway could serve
    return names


def write_serving_state(root: str | Path, name: str, version: int) -> ServingState:
    """Make ``version`` the one every gateway serves; refuses a version the repository does not hold.

    Written atomically (a temporary file in the same folder, then a rename), so a gateway polling the
    file reads the old state or the new one, never half of one.
    """
    import datetime
    import os
    import tempfile

    path = serving_path(root, name)
    versions = list_versions(root, name)
    if not versions:
        raise ServingStateError(f"{Path(root) / name}: no servable version of {name!r} (no <N>/{MODEL_FILENAME})")
    if version not in versions:
        raise ServingStateError(f"version {version} of {name!r} is not in {Path(root) / name} "
                                f"(servable versions: {versions})")
    try:
        old = read_serving_state(root, name)
    except ServingStateError:
        old = None  # a broken file is replaced by a good one; that is how it gets repaired
    now = datetime.datetime.now(datetime.UTC).replace(microsecond=0).isoformat()
    state = ServingState(name, version, now, old.version if old else None)
    fd, tmp = tempfile.mkstemp(prefix=f".{SERVING_FILENAME}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(state.to_json())
            out.flush()
            os.fsync(out.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; gateways run as another user
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return state
