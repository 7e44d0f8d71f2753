"""ROC curves and AUROC with exact tie handling, and the image AUROC split by anomaly type.

Samples with equal scores enter the curve together (one diagonal step), so the area under
the curve equals the Mann-Whitney U statistic with ties counted 1/2. On MVTec LOCO AD the
image AUROC is reported per anomaly type, each type against the shared ``good`` test images.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

GOOD = "good"
# LOCO sub-folder -> short key of the published table.
LOCO_TYPE_KEYS: Mapping[str, str] = {"logical_anomalies": "logical", "structural_anomalies": "structural"}


def type_key(anomaly_type: str) -> str:
    """Short result key of an anomaly type: "logical", "structural", or the type itself (MVTec AD)."""
    return LOCO_TYPE_KEYS.get(anomaly_type, anomaly_type)


def _validated(scores: Sequence[float] | np.ndarray,
               labels: Sequence[int] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(scores, dtype=np.float64).ravel()
    y = np.asarray(labels).ravel()
    if s.shape != y.shape:
        raise ValueError(f"scores and labels differ in length: {s.size} vs {y.size}")
    if np.isnan(s).any():
        raise ValueError("scores contain NaN")
    if not np.isin(y, (0, 1)).all():
        raise ValueError("labels must be 0 (normal) or 1 (anomalous)")
    y = y.astype(bool)
    if not y.any():
        raise ValueError("AUROC needs both classes: no positive (anomalous, label 1) sample")
    if y.all():
        raise ValueError("AUROC needs both classes: no negative (normal, label 0) sample")
    return s, y


def roc_curve(scores: Sequence[float] | np.ndarray,
              labels: Sequence[int] | np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ROC curve (fpr, tpr, thresholds), thresholds descending from +inf.

    Point i counts a sample positive when ``score >= thresholds[i]``; every distinct score is
    one point, so tied samples move the curve together.
    """
    s, y = _validated(scores, labels)
    order = np.argsort(-s, kind="stable")
    s, y = s[order], y[order]
    last_of_tie = np.r_[np.flatnonzero(np.diff(s)), s.size - 1]
    tp = np.cumsum(y)[last_of_tie]
    fp = last_of_tie + 1 - tp
    fpr = np.r_[0.0, fp / fp[-1]]
    tpr = np.r_[0.0, tp / tp[-1]]
    return fpr, tpr, np.r_[np.inf, s[last_of_tie]]


def trapezoid(x: np.ndarray, y: np.ndarray) -> float:
    """Trapezoid-rule area under y(x) for ascending x."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    return float(np.sum(np.diff(x) * (y[1:] + y[:-1]) * 0.5))


def auroc(scores: Sequence[float] | np.ndarray, labels: Sequence[int] | np.ndarray) -> float:
    """Area under the ROC curve (= Mann-Whitney U / (n_pos n_neg), ties 1/2)."""
    fpr, tpr, _ = roc_curve(scores, labels)
    return trapezoid(fpr, tpr)


def auroc_from_counts(negatives: np.ndarray, positives: np.ndarray) -> float:
    """AUROC from per-level counts of negatives and positives, levels in ascending score order.

    Samples on the same level are ties (1/2). Exact in float64 for counts up to ~1e12.
    """
    neg = np.asarray(negatives, dtype=np.float64)
    pos = np.asarray(positives, dtype=np.float64)
    n_neg, n_pos = neg.sum(), pos.sum()
    if n_pos == 0:
        raise ValueError("AUROC needs both classes: no positive (anomalous) sample")
    if n_neg == 0:
        raise ValueError("AUROC needs both classes: no negative (normal) sample")
    below = np.cumsum(neg) - neg  # negatives strictly below each level
    return float(np.sum(pos * (below + 0.5 * neg)) / (n_neg * n_pos))


def image_auroc_by_type(scores: Sequence[float] | np.ndarray, anomaly_types: Sequence[str]) -> dict[str, float]:
    """Image AUROC of each anomaly type against the ``good`` images, plus their mean.

    LOCO types give ``{"logical", "structural", "mean"}`` (absent types omitted, mean over
    those present). Any other (MVTec AD) defect type is keyed by its name and adds ``"all"``:
    every anomalous image against ``good``.
    """
    s = np.asarray(scores, dtype=np.float64).ravel()
    types = np.asarray(anomaly_types, dtype=object).ravel()
    if s.shape != types.shape:
        raise ValueError(f"scores and anomaly_types differ in length: {s.size} vs {types.size}")
    good = types == GOOD
    if not good.any():
        raise ValueError(f"image AUROC needs '{GOOD}' test images as negatives; types seen: {sorted(set(types))}")
    anomalous = sorted(set(types[~good]))
    if not anomalous:
        raise ValueError("image AUROC needs anomalous test images; only 'good' ones were given")
    result = {type_key(t): auroc(s[good | (types == t)], types[good | (types == t)] == t) for t in anomalous}
    result["mean"] = float(np.mean(list(result.values())))
    if any(t not in LOCO_TYPE_KEYS for t in anomalous):
        result["all"] = auroc(s, ~good)
    return result


def image_auroc_by_defect(scores: Sequence[float] | np.ndarray,
                          defects: Sequence[Sequence[str]]) -> dict[str, dict[str, float | int]]:
    """Image AUROC of each defect name against the good images (those with no defect), and its count.

    ``defects[i]`` names the defects of image ``i`` (its ground-truth mask files); an image with
    two defects counts for both. This is the breakdown that says *which* rule a model misses.
    """
    s = np.asarray(scores, dtype=np.float64).ravel()
    if s.size != len(defects):
        raise ValueError(f"scores and defects differ in length: {s.size} vs {len(defects)}")
    good = np.array([not names for names in defects], dtype=bool)
    if not good.any():
        raise ValueError("image AUROC by defect needs good test images (images without defects) as negatives")
    result: dict[str, dict[str, float | int]] = {}
    for name in sorted({n for names in defects for n in names}):
        has = np.array([name in names for names in defects], dtype=bool)
        result[name] = {"auroc": auroc(s[good | has], has[good | has]), "count": int(has.sum())}
    return result
