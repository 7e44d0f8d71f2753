"""Evaluation outputs: metrics JSON, Markdown tables like the published LOCO tables, figures, TIFF maps.

The metrics dict of one category has a fixed shape (``validate_metrics``)::

    {"category": str,
     "image_auroc": {"logical": x, "structural": x, "mean": x},
     "pixel_auroc": x,
     "au_spro": {"0.05": {"logical": x, "structural": x, "mean": x}, "0.1": ..., "0.3": ..., "1.0": ...},
     "threshold": {...}, "counts": {...}}

Values may be None where a type is absent; ``pixel_auroc`` and ``au_spro`` are None when the test
set has no ground-truth masks, and an optional ``ground_truth`` entry says why and which images
were left out. MVTec AD-style categories key ``image_auroc`` by their defect folders, plus
``mean`` and ``all`` (every anomalous image against the good ones). Figures use matplotlib's object API with the Agg
canvas (no pyplot state, no display needed). Anomaly maps are written as float32 TIFFs in the
official evaluation layout ``<maps_dir>/<category>/test/<type>/<index>.tiff``.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import tifffile
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image

from slsg_train.metrics.false_alarms import render_false_alarms_md
from slsg_train.metrics.roc import GOOD, auroc, roc_curve, type_key

SPRO_LIMIT_KEYS = ("0.05", "0.1", "0.3", "1.0")
TYPE_ROWS = ("structural", "logical", "mean")  # row order of the published table
REQUIRED_KEYS = ("category", "image_auroc", "pixel_auroc", "au_spro", "threshold", "counts")
_INDEX = re.compile(r"^[A-Za-z0-9_.-]+$")


class HeatmapItem(NamedTuple):
    """One test image for the heat-map grid."""

    image: np.ndarray        # uint8 [H, W, 3] (or [H, W] grey)
    anomaly_map: np.ndarray  # float [h, w]; resized to the image if smaller
    score: float
    anomaly_type: str
    title: str


# ---------------------------------------------------------------- JSON and Markdown

def validate_metrics(metrics: Mapping[str, Any]) -> None:
    """Raise ValueError naming the first missing or malformed key of the fixed metrics shape."""
    missing = [key for key in REQUIRED_KEYS if key not in metrics]
    if missing:
        raise ValueError(f"metrics lack keys {missing}; expected {list(REQUIRED_KEYS)}")
    if not isinstance(metrics["image_auroc"], Mapping):
        raise ValueError("metrics['image_auroc'] must be a dict")
    if metrics["au_spro"] is not None and not isinstance(metrics["au_spro"], Mapping):
        raise ValueError("metrics['au_spro'] must be a dict, or None where there is no ground truth")
    wrong = [key for key in metrics["au_spro"] or {} if key not in SPRO_LIMIT_KEYS]
    if wrong:
        raise ValueError(f"metrics['au_spro'] has unknown limit keys {wrong}; expected among {list(SPRO_LIMIT_KEYS)}")


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot write {type(value).__name__} to metrics JSON")


def write_metrics_json(path: str | Path, metrics: Mapping[str, Any]) -> Path:
    """Write the metrics dict (validated; numpy values converted) as indented JSON."""
    validate_metrics(metrics)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(metrics, indent=2, default=_json_default, allow_nan=False) + "\n")
    return path


def _fmt(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{float(value):.3f}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _type_rows(image_auroc: Mapping[str, Any]) -> tuple[str, ...]:
    """Table rows: LOCO's structural/logical/mean, or an MVTec AD category's defect types, mean and all."""
    if "all" not in image_auroc:
        return TYPE_ROWS
    return (*sorted(k for k in image_auroc if k not in ("mean", "all")), "mean", "all")


def _ground_truth_lines(metrics: Mapping[str, Any]) -> list[str]:
    """The pixel AUROC line, and which images the region metrics left out and why."""
    truth = metrics.get("ground_truth") or {}
    if metrics["pixel_auroc"] is None and truth.get("region_metrics", "").startswith("unavailable"):
        lines = [f"Pixel AUROC and AU-sPRO: {truth['region_metrics']}"]
    else:
        lines = [f"Pixel AUROC (all test pixels): {_fmt(metrics['pixel_auroc'])}"]
    left_out = truth.get("left_out") or {}
    if left_out and metrics["pixel_auroc"] is not None:
        lines += ["", f"## Left out of the region metrics ({len(left_out)} of {truth['anomalous_images']} "
                      "anomalous images: no usable mask)", ""]
        lines += [f"- {name}: {reason}" for name, reason in left_out.items()]
    return lines


def render_report_md(metrics: Mapping[str, Any]) -> str:
    """Markdown report of one category: rows per anomaly type and mean, columns image AUROC and AU-sPRO limits."""
    validate_metrics(metrics)
    spro = metrics["au_spro"] or {}
    header = ["", "image AUROC", *(f"AU-sPRO @ FPR {limit}" for limit in SPRO_LIMIT_KEYS)]
    rows = [[row, _fmt(metrics["image_auroc"].get(row)),
             *(_fmt(spro.get(limit, {}).get(row)) for limit in SPRO_LIMIT_KEYS)]
            for row in _type_rows(metrics["image_auroc"])]
    parts = [f"# Evaluation: {metrics['category']}", "", _table(header, rows), "", *_ground_truth_lines(metrics)]
    by_defect = metrics.get("image_auroc_by_defect")
    if by_defect:
        parts += ["", "## Image AUROC by defect (each against the good images)", "",
                  _table(["defect", "images", "image AUROC"],
                         [[name, str(v["count"]), _fmt(v["auroc"])] for name, v in by_defect.items()])]
    if metrics.get("false_alarms"):
        parts += ["", *render_false_alarms_md(metrics["false_alarms"])]
    for section in ("threshold", "counts"):
        if metrics[section]:
            parts += ["", f"## {section.capitalize()}", ""]
            parts += [f"- {key}: {_fmt(value) if isinstance(value, (float, np.floating)) else value}"
                      for key, value in metrics[section].items()]
    return "\n".join(parts) + "\n"


_SUMMARY_COLUMNS: tuple[tuple[str, str, str | None], ...] = (
    *((f"image AUROC {row}", "image_auroc", row) for row in TYPE_ROWS),
    *((f"AU-sPRO@0.05 {row}", "0.05", row) for row in TYPE_ROWS),
    *((f"AU-sPRO@{limit} mean", limit, "mean") for limit in SPRO_LIMIT_KEYS[1:]),
    ("pixel AUROC", "pixel_auroc", None),
)


def _summary_value(metrics: Mapping[str, Any], source: str, row: str | None) -> float | None:
    if source == "pixel_auroc":
        return metrics["pixel_auroc"]
    table = metrics["image_auroc"] if source == "image_auroc" else (metrics["au_spro"] or {}).get(source, {})
    return table.get(row)


def render_summary_table(all_metrics: Sequence[Mapping[str, Any]]) -> str:
    """One row per category plus a mean row (mean over the categories that have the value)."""
    if not all_metrics:
        raise ValueError("no category metrics to summarise")
    for metrics in all_metrics:
        validate_metrics(metrics)
    values = [[_summary_value(m, source, row) for _, source, row in _SUMMARY_COLUMNS] for m in all_metrics]
    means = []
    for column in zip(*values):
        present = [v for v in column if v is not None]
        means.append(float(np.mean(present)) if present else None)
    rows = [[str(m["category"]), *map(_fmt, v)] for m, v in zip(all_metrics, values)]
    rows.append(["**mean**", *map(_fmt, means)])
    return _table(["category", *(name for name, _, _ in _SUMMARY_COLUMNS)], rows) + "\n"


# ---------------------------------------------------------------- figures

def _new_figure(width: float, height: float) -> Figure:
    figure = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _save(figure: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png")
    return path


def _scores_by_type(scores: Sequence[float], types: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(scores, dtype=np.float64).ravel()
    t = np.asarray(types, dtype=object).ravel()
    if s.shape != t.shape:
        raise ValueError(f"scores and types differ in length: {s.size} vs {t.size}")
    return s, t


def plot_roc_curves(scores: Sequence[float], types: Sequence[str], path: str | Path) -> Path:
    """Image-level ROC of each anomaly type against the good images, AUROC in the legend."""
    s, t = _scores_by_type(scores, types)
    figure = _new_figure(5, 5)
    axes = figure.add_subplot()
    for anomaly_type in sorted(set(t) - {GOOD}):
        subset = (t == GOOD) | (t == anomaly_type)
        fpr, tpr, _ = roc_curve(s[subset], t[subset] == anomaly_type)
        area = auroc(s[subset], t[subset] == anomaly_type)
        axes.plot(fpr, tpr, label=f"{type_key(anomaly_type)} (AUROC {area:.3f})")
    axes.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
    axes.set(xlabel="false positive rate (good images)", ylabel="true positive rate",
             title="Image-level ROC", xlim=(0, 1), ylim=(0, 1.01), aspect="equal")
    axes.legend(loc="lower right")
    return _save(figure, path)


def plot_roc_comparison(runs: Sequence[tuple[str, str, Sequence[float], Sequence[str]]], path: str | Path) -> Path:
    """Image-level ROC of several runs, one panel per anomaly type; ``runs`` are (label, group, scores,
    types), and the runs of a group (a preset's seeds) share a colour."""
    kinds = sorted({type_key(t) for _, _, _, types in runs for t in types} - {GOOD})
    groups = list(dict.fromkeys(group for _, group, _, _ in runs))
    colours = colormaps["tab10"]
    figure = _new_figure(5 * max(1, len(kinds)), 5)
    for i, kind in enumerate(kinds):
        axes = figure.add_subplot(1, len(kinds), i + 1)
        seen: dict[str, int] = {}
        for label, group, scores, types in runs:
            s = np.asarray(scores, dtype=np.float64)
            t = np.asarray([type_key(v) for v in types], dtype=object)
            subset = (t == GOOD) | (t == kind)
            fpr, tpr, _ = roc_curve(s[subset], t[subset] == kind)
            nth = seen[group] = seen.get(group, -1) + 1  # a group's runs differ by line style
            axes.plot(fpr, tpr, color=colours(groups.index(group) % 10), linestyle=("-", "--", "-.", ":")[nth % 4],
                      label=f"{label} ({auroc(s[subset], t[subset] == kind):.3f})")
        axes.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
        axes.set(xlabel="false positive rate (good images)", ylabel="true positive rate",
                 title=f"{kind} anomalies", xlim=(0, 1), ylim=(0, 1.01), aspect="equal")
        axes.legend(loc="lower right", fontsize="small")
    return _save(figure, path)


def plot_score_histograms(scores: Sequence[float], types: Sequence[str], path: str | Path,
                          threshold: float | None = None, label: str = "image score") -> Path:
    """Image-score histograms, good against each anomalous type, on shared bins; ``label`` names the score."""
    s, t = _scores_by_type(scores, types)
    anomalous = sorted(set(t) - {GOOD})
    bins = np.histogram_bin_edges(s, bins=min(40, max(10, s.size // 5)))
    figure = _new_figure(5 * max(1, len(anomalous)), 3.5)
    for index, anomaly_type in enumerate(anomalous or [GOOD]):
        axes = figure.add_subplot(1, max(1, len(anomalous)), index + 1)
        axes.hist(s[t == GOOD], bins=bins, alpha=0.6, color="tab:green", label=GOOD)
        if anomaly_type != GOOD:
            axes.hist(s[t == anomaly_type], bins=bins, alpha=0.6, color="tab:red", label=type_key(anomaly_type))
        if threshold is not None:
            axes.axvline(threshold, color="black", linestyle="--", label=f"threshold {threshold:.3g}")
        axes.set(xlabel=label, ylabel="images", title=f"{GOOD} vs {type_key(anomaly_type)}")
        axes.legend(loc="upper center")  # good images left, anomalies right
    return _save(figure, path)


def plot_spro_curves(curves: Mapping[str, tuple[np.ndarray, np.ndarray]], path: str | Path,
                     max_fpr: float = 0.3) -> Path:
    """Mean sPRO against FPR per anomaly type, up to ``max_fpr``, with the AU-sPRO limits marked."""
    figure = _new_figure(5, 4)
    axes = figure.add_subplot()
    for name, (fpr, spro) in curves.items():
        axes.plot(fpr, spro, label=name)
    for limit in SPRO_LIMIT_KEYS:
        if float(limit) <= max_fpr:
            axes.axvline(float(limit), color="grey", linestyle=":", linewidth=1)
    axes.set(xlabel="false positive rate (pixels)", ylabel="mean sPRO", title="sPRO curves",
             xlim=(0, max_fpr), ylim=(0, 1.01))
    axes.legend(loc="lower right")
    return _save(figure, path)


def _rgb(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise ValueError(f"image must be uint8, got {image.dtype}")
    if image.ndim == 2:
        return np.repeat(image[..., None], 3, axis=2)
    if image.ndim == 3 and image.shape[2] in (3, 4):
        return image[..., :3]
    raise ValueError(f"image must be [H, W], [H, W, 3] or [H, W, 4], got shape {image.shape}")


def overlay_heatmap(image: np.ndarray, amap: np.ndarray, vmin: float, vmax: float, alpha: float = 0.5) -> np.ndarray:
    """uint8 [H, W, 3]: the image blended (alpha) with the jet-coloured map scaled to [vmin, vmax].

    A map of another size (e.g. the network's output) is resized bilinearly to the image.
    """
    rgb = _rgb(image)
    amap = np.asarray(amap, dtype=np.float32)
    if amap.ndim != 2:
        raise ValueError(f"anomaly map must be 2-D, got shape {amap.shape}")
    if amap.shape != rgb.shape[:2]:
        amap = np.asarray(Image.fromarray(amap, mode="F").resize(rgb.shape[1::-1], Image.BILINEAR))
    scaled = np.clip((amap - vmin) / max(vmax - vmin, 1e-12), 0.0, 1.0)
    colours = colormaps["jet"](scaled)[..., :3] * 255.0
    return np.round((1 - alpha) * rgb + alpha * colours).astype(np.uint8)


def highest_and_lowest(items: Sequence[HeatmapItem], n: int) -> list[tuple[str, HeatmapItem]]:
    """("highest" | "lowest", item) for the n top- and n bottom-scoring items; all of them ("") if <= 2n."""
    ranked = sorted(items, key=lambda item: item.score, reverse=True)
    if len(ranked) <= 2 * n:
        return [("", item) for item in ranked]
    return [("highest", item) for item in ranked[:n]] + [("lowest", item) for item in ranked[-n:]]


def plot_heatmap_grid(items: Sequence[HeatmapItem | tuple], path: str | Path, n: int = 8,
                      scale: tuple[float, float] | None = None, scale_label: str | None = None) -> Path:
    """Grid of the ``n`` highest- and ``n`` lowest-scoring images with heat-map overlays.

    All overlays share one colour scale, so they compare: ``scale`` (vmin, vmax), e.g. (0, 1) for
    calibrated maps, whose 0.5 is the threshold; by default the min/max over the shown maps.
    ``scale_label`` says what the scale means in the title.
    """
    items = [HeatmapItem(*item) for item in items]
    if not items:
        raise ValueError("no images for the heat-map grid")
    chosen = highest_and_lowest(items, n)
    if scale is None:
        vmin = min(float(np.min(item.anomaly_map)) for _, item in chosen)
        vmax = max(float(np.max(item.anomaly_map)) for _, item in chosen)
    else:
        vmin, vmax = scale
    columns = min(4, len(chosen))
    rows = math.ceil(len(chosen) / columns)
    figure = _new_figure(3.2 * columns, 3.0 * rows)
    for index, (group, item) in enumerate(chosen):
        axes = figure.add_subplot(rows, columns, index + 1)
        axes.imshow(overlay_heatmap(item.image, item.anomaly_map, vmin, vmax))
        prefix = f"[{group}] " if group else ""
        axes.set_title(f"{prefix}{item.title}\n{type_key(item.anomaly_type)}  score {item.score:.3f}", fontsize=8)
        axes.axis("off")
    meaning = f"; {scale_label}" if scale_label else ""
    figure.suptitle(f"Anomaly maps (colour scale {vmin:.3g} to {vmax:.3g}{meaning})")
    return _save(figure, path)


# ---------------------------------------------------------------- TIFF maps

def write_tiff_map(maps_dir: str | Path, category: str, anomaly_type: str, index: str, amap: np.ndarray) -> Path:
    """Write ``<maps_dir>/<category>/test/<anomaly_type>/<index>.tiff`` (float32, the map's own size)."""
    for name, value in (("category", category), ("anomaly_type", anomaly_type), ("index", index)):
        if not _INDEX.match(value) or value in (".", ".."):
            raise ValueError(f"{name} {value!r} is not a plain file/folder name")
    amap = np.asarray(amap)
    if amap.ndim != 2 or amap.size == 0:
        raise ValueError(f"anomaly map for {anomaly_type}/{index} must be a non-empty 2-D array, got {amap.shape}")
    path = Path(maps_dir) / category / "test" / anomaly_type / f"{index}.tiff"
    path.parent.mkdir(parents=True, exist_ok=True)
    tifffile.imwrite(path, amap.astype(np.float32))
    return path
