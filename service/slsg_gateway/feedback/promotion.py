"""The promotion gate: ``slsg promote --candidate NAME:N --against NAME:M --data ROOT``.

Both versions score the test images of a reviewed data set (``slsg dataset from-reviews``:
``test/good`` = held-out confirmed false alarms, every other ``test/`` folder = confirmed defects)
with ONNX Runtime, straight from the model repository, after the gateway's own decoding. Per
version: image AUROC (defects against normal frames), false alarms (normal frames at or above the
decision threshold) and misses (defects below it). The candidate passes when it is at least as good
as the version it would replace on all three; a measure that cannot be computed (AUROC without both
kinds of frame) is left out and said so.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from slsg.contract import OUTPUT_SCORE, INPUT_IMAGE, list_versions, model_path
from slsg_gateway.backends.embedded import open_contract_session
from slsg_gateway.imaging import decode_frame

GOOD = "good"
_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
_BATCH = 8


class GateError(ValueError):
    """The gate cannot run as asked (no such version, no test images); the message says why."""


@dataclass(frozen=True)
class GateImage:
    path: Path
    is_defect: bool


@dataclass
class VersionScores:
    """One version's result on the reviewed test images."""

    name: str
    version: int
    threshold: float
    normals: int
    defects: int
    false_alarms: int
    misses: int
    auroc: float | None  # None without both normal and defective frames
    scores: list[float] = field(repr=False, default_factory=list)

    def summary(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k != "scores"}


@dataclass
class GateResult:
    candidate: VersionScores
    incumbent: VersionScores
    passed: bool
    reasons: list[str]

    def to_dict(self) -> dict:
        return {"passed": self.passed, "reasons": self.reasons, "candidate": self.candidate.summary(),
                "incumbent": self.incumbent.summary()}


def parse_version(text: str) -> tuple[str, int]:
    """``NAME:N`` -> (NAME, N)."""
    name, sep, number = text.rpartition(":")
    if not sep or not name or not number.isdigit() or int(number) < 1:
        raise GateError(f"{text!r} is not NAME:VERSION (e.g. tray:3)")
    return name, int(number)


def gate_images(category_dir: Path) -> list[GateImage]:
    """The test images of one data-set category: ``test/good`` normal, any other folder a defect."""
    test = category_dir / "test"
    if not test.is_dir():
        raise GateError(f"{test}: no test folder; build the data set with `slsg dataset from-reviews`")
    images = [GateImage(path, folder.name != GOOD) for folder in sorted(p for p in test.iterdir() if p.is_dir())
              for path in sorted(folder.iterdir()) if path.suffix.lower() in _IMAGE_SUFFIXES]
    if not images:
        raise GateError(f"{test}: no test images")
    return images


def auroc(scores: np.ndarray, is_defect: np.ndarray) -> float | None:
    """Probability that a defect outscores a normal frame (ties count half); None without both kinds."""
    positives, negatives = scores[is_defect], scores[~is_defect]
    if len(positives) == 0 or len(negatives) == 0:
        return None
    greater = (positives[:, None] > negatives[None, :]).sum()
    ties = (positives[:, None] == negatives[None, :]).sum()
    return float((greater + 0.5 * ties) / (len(positives) * len(negatives)))


def score_version(repository: Path, name: str, version: int, images: list[GateImage],
                  threshold: float) -> VersionScores:
    """Score ``images`` with version ``version`` of ``name`` (ONNX Runtime, the gateway's decoding)."""
    path = model_path(repository, name, version)
    if not path.is_file():
        have = list_versions(repository, name)
        raise GateError(f"{path}: no such model version; {name!r} has versions {have or 'none'} in {repository}")
    session = open_contract_session(path, version, threads=0)
    size = (session.input_height, session.input_width)
    scores = []
    for start in range(0, len(images), _BATCH):
        batch = np.stack([decode_frame(image.path.read_bytes(), size, max_pixels=10**9,
                                       resize=session.card.resize).pixels
                          for image in images[start:start + _BATCH]])
        (out,) = session.session.run([OUTPUT_SCORE], {INPUT_IMAGE: batch})
        scores.extend(float(s) for s in out.reshape(-1))
    values = np.asarray(scores)
    is_defect = np.asarray([image.is_defect for image in images])
    flagged = values >= threshold
    return VersionScores(name, version, threshold, int((~is_defect).sum()), int(is_defect.sum()),
                         int((flagged & ~is_defect).sum()), int((~flagged & is_defect).sum()),
                         auroc(values, is_defect), scores)


def gate(candidate: VersionScores, incumbent: VersionScores) -> GateResult:
    """Whether ``candidate`` is at least as good as ``incumbent`` on every measure both have."""
    reasons, passed = [], True
    if candidate.auroc is None or incumbent.auroc is None:
        reasons.append("image AUROC not compared: the test images need both false alarms and defects")
    elif candidate.auroc < incumbent.auroc:
        passed = False
        reasons.append(f"image AUROC {candidate.auroc:.4f} < {incumbent.auroc:.4f}")
    for measure in ("false_alarms", "misses"):
        mine, theirs = getattr(candidate, measure), getattr(incumbent, measure)
        if mine > theirs:
            passed = False
            reasons.append(f"{measure.replace('_', ' ')} {mine} > {theirs}")
    if passed:
        reasons.append("at least as good on every measure")
    return GateResult(candidate, incumbent, passed, reasons)
