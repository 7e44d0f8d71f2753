"""Evaluate a checkpoint on a category's test split with the LOCO metrics, and write the report.

The image metrics need only each test image's folder (its label). The region metrics (AU-sPRO,
pixel AUROC) need masks: anomalous images without usable masks (see ``TestSample.ground_truth_issue``)
are left out of them by name, and when no anomalous image has a mask the region metrics are
reported as unavailable (None) with the reason, not failed.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm import tqdm

from slsg.contract import DECISION_THRESHOLD
from slsg_train.data.loco import GOOD, LocoCategory, TestSample
from slsg_train.evaluation.report import (
    HeatmapItem, plot_heatmap_grid, plot_roc_curves, plot_score_histograms, plot_spro_curves, render_report_md,
    write_metrics_json, write_tiff_map,
)
from slsg_train.inference import LoadedModel, Prediction, predict
from slsg_train.metrics import ImageMaps, PixelROC, SPROByType, image_auroc_by_defect, image_auroc_by_type
from slsg_train.metrics.false_alarms import false_alarm_report
from slsg_train.data.images import resize_rgb

THUMBNAIL = 192  # px, longest side of the images kept for the heat-map grid


@dataclass
class EvaluationResult:
    metrics: dict[str, Any]
    out_dir: Path
    files: list[Path] = field(default_factory=list)


def upsample_map(amap: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Model-size probability map -> the original image size (H, W), bilinear, float32."""
    h, w = size
    if amap.shape == (h, w):
        return amap.astype(np.float32)
    return np.asarray(Image.fromarray(amap.astype(np.float32), mode="F").resize((w, h), Image.BILINEAR))


def _thumbnail(image: np.ndarray) -> np.ndarray:
    h, w = image.shape[:2]
    scale = THUMBNAIL / max(h, w)
    return resize_rgb(image, (max(1, round(h * scale)), max(1, round(w * scale)))) if scale < 1 else image


class RegionMetrics:
    """AU-sPRO and pixel AUROC over the test images that have ground truth, and the names of those left out."""

    def __init__(self, samples: list[TestSample]) -> None:
        self.spro, self.pixel = SPROByType(), PixelROC()
        self.left_out = {s.name: s.ground_truth_issue or "no masks" for s in samples if not s.has_ground_truth}
        self.anomalous = sum(s.is_anomalous for s in samples)
        self.available = any(s.masks for s in samples)

    def add(self, sample: TestSample, full_map: np.ndarray) -> None:
        """Add one image's map at its original size; an image without ground truth is skipped."""
        if not self.available or not sample.has_ground_truth:
            return
        image_maps = _image_maps(sample, full_map)
        self.spro.add(image_maps)
        self.pixel.add_image(image_maps)

    def unavailable_reason(self) -> str | None:
        if self.available:
            return None
        if self.anomalous == 0:
            return "no anomalous test images"
        return f"no ground-truth masks: none of the {self.anomalous} anomalous test images has a usable mask"

    def result(self) -> dict[str, Any]:
        """``pixel_auroc``, ``au_spro`` (None when unavailable) and the ``ground_truth`` summary."""
        reason = self.unavailable_reason()
        summary = {"anomalous_images": self.anomalous, "with_masks": self.anomalous - len(self.left_out),
                   "region_metrics": "unavailable: " + reason if reason else "computed",
                   "left_out": self.left_out}
        if reason:
            return {"pixel_auroc": None, "au_spro": None, "ground_truth": summary}
        return {"pixel_auroc": self.pixel.auroc(), "au_spro": self.spro.result(), "ground_truth": summary}

    def curves(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """(fpr, mean sPRO) per anomaly type, empty when unavailable."""
        return {name: c.curve()[:2] for name, c in self.spro.curves().items()} if self.available else {}


def _image_maps(sample: TestSample, amap: np.ndarray) -> ImageMaps:
    defects = []
    for mask in sample.masks:
        region = mask.load()
        defects.append((region, mask.defect.saturation_area(int(region.sum()))))
    return ImageMaps(anomaly_map=amap, defects=defects, anomaly_type=sample.anomaly_type, name=sample.name)


def evaluate_category(loaded: LoadedModel, category: LocoCategory, out_dir: str | Path,
                      maps_dir: str | Path | None = None, device: str = "cpu", batch_size: int = 8) -> EvaluationResult:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    samples = category.test_samples()
    if not samples:
        raise ValueError(f"{category.path / 'test'} holds no test images")
    regions = RegionMetrics(samples)
    scores, types, defects, names, thumbs = [], [], [], [], []
    cal = loaded.calibration
    calibrated: list[float] | None = [] if cal else None
    t0 = time.perf_counter()
    bar = tqdm(total=len(samples), desc=f"evaluate {category.name}", unit="img", dynamic_ncols=True)
    for start in range(0, len(samples), batch_size):
        batch = samples[start:start + batch_size]
        originals = [s.load_image() for s in batch]
        maps, raw, log_odds, map_log_odds = _predict(
            loaded, [resize_rgb(im, loaded.image_size, loaded.resize) for im in originals], device, batch_size)
        # what the exported model answers, and what the heat-map grid ranks and shows: raw scores and
        # probabilities tie at 1.0
        shown = np.atleast_1d(cal.calibrated_score(log_odds)) if cal else raw
        shown_maps = cal.calibrated_score(map_log_odds).astype(np.float32) if cal else maps
        if calibrated is not None:
            calibrated.extend(shown.tolist())
        for sample, image, amap, score, shown_score, shown_map in zip(batch, originals, maps, raw, shown, shown_maps):
            full = upsample_map(amap, sample.size)
            regions.add(sample, full)
            if maps_dir is not None:
                write_tiff_map(maps_dir, category.name, sample.anomaly_type, sample.index, full)
            scores.append(float(score))
            types.append(sample.anomaly_type)
            defects.append(sorted({m.defect.defect_name for m in sample.masks}))
            names.append(sample.name)
            thumbs.append(HeatmapItem(_thumbnail(image), shown_map, float(shown_score), sample.anomaly_type,
                                      sample.name))
        bar.update(len(batch))
    bar.close()
    seconds = time.perf_counter() - t0
    metrics = _metrics(loaded, category, scores, types, regions, seconds)
    if any(defects):
        # anomalous images without masks name no defect: leave them out rather than count them as good
        known = [i for i, s in enumerate(samples) if s.has_ground_truth]
        metrics["image_auroc_by_defect"] = image_auroc_by_defect([scores[i] for i in known],
                                                                 [defects[i] for i in known])
    files = _write_outputs(out_dir, metrics, scores, calibrated, types, regions.curves(), thumbs)
    _write_scores(out_dir / "scores.json", scores, calibrated, types, names, defects)
    files.append(out_dir / "scores.json")
    return EvaluationResult(metrics, out_dir, files)


def _predict(loaded: LoadedModel, images: list[np.ndarray], device: str, batch_size: int) -> Prediction:
    """The checkpoint's PyTorch prediction, or an exported file's through ONNX Runtime (``load_onnx_model``)."""
    from slsg_train.onnx_inference import OnnxModel

    if isinstance(loaded.model, OnnxModel):
        return loaded.model.predict(images, batch_size)
    return predict(loaded.model, images, loaded.top_k, device, batch_size)


def _decision_rates(scores: np.ndarray, types: np.ndarray, threshold: float) -> dict[str, float]:
    """Share of each test type's images at or above the threshold (FPR for good, recall for the others)."""
    return {t: float((scores[types == t] >= threshold).mean()) for t in sorted(set(types.tolist()))}


def _metrics(loaded: LoadedModel, category: LocoCategory, scores: list[float], types: list[str],
             regions: RegionMetrics, seconds: float) -> dict[str, Any]:
    s, t = np.asarray(scores), np.asarray(types, dtype=object)
    cal = loaded.calibration
    threshold: dict[str, Any] = {}
    false_alarms: dict[str, Any] = {}
    if cal is not None:
        threshold = {"raw": cal.raw_threshold, "target_fpr": cal.target_fpr, "pixel": cal.pixel_threshold,
                     "calibration_images": cal.num_images, "scale_images": cal.scale_images,
                     "expected_fpr": cal.expected_fpr(), "fpr_upper_90": cal.fpr_upper(0.9),
                     "flagged_share_by_type": _decision_rates(s, t, cal.raw_threshold)}
        good = s[t == GOOD]
        # the float32 comparison the exported graph makes (0.5 at the threshold)
        flagged = int((good.astype(np.float32) >= np.float32(cal.raw_threshold)).sum())
        false_alarms = false_alarm_report(flagged, int(good.size), cal, has_checks=loaded.has_checks)
    return {
        "category": category.name,
        "image_auroc": image_auroc_by_type(s, t.tolist()),
        **regions.result(),
        "threshold": threshold,
        "false_alarms": false_alarms,
        "counts": {k: int((t == k).sum()) for k in sorted(set(types))},
        "checkpoint": loaded.describe(),
        "evaluation_seconds": round(seconds, 2),
    }


def _write_outputs(out_dir: Path, metrics: dict, scores: list[float], calibrated: list[float] | None,
                   types: list[str], curves: dict[str, tuple[np.ndarray, np.ndarray]],
                   thumbs: list[HeatmapItem]) -> list[Path]:
    files = [write_metrics_json(out_dir / "metrics.json", metrics)]
    report = out_dir / "report.md"
    report.write_text(render_report_md(metrics) + _figure_links(bool(curves)))
    files.append(report)
    files.append(plot_roc_curves(scores, types, out_dir / "roc_curves.png"))
    histograms = out_dir / "score_histograms.png"
    if calibrated is None:  # no threshold yet: the raw scores
        files.append(plot_score_histograms(scores, types, histograms))
    else:  # what the exported model answers; raw scores of clear anomalies are all 1.0
        files.append(plot_score_histograms(calibrated, types, histograms, threshold=DECISION_THRESHOLD,
                                           label="calibrated score"))
    if curves:
        files.append(plot_spro_curves(curves, out_dir / "spro_curves.png"))
    # calibrated maps on the gateway's fixed scale (0.5 = threshold), so the grid shows what an operator sees
    fixed_scale = {} if calibrated is None else {"scale": (0.0, 1.0), "scale_label": "calibrated: 0.5 = threshold, green"}
    files.append(plot_heatmap_grid(thumbs, out_dir / "heatmaps.png", n=min(8, max(1, len(thumbs) // 2)), **fixed_scale))
    return files


def _write_scores(path: Path, scores: list[float], calibrated: list[float] | None, types: list[str],
                  names: list[str], defects: list[list[str]]) -> None:
    """One entry per test image: which image, its type and defects, its raw score and (with a
    calibration) the calibrated score the exported model answers."""
    rows = [{"image": n, "type": t, "defects": d, "score": s} for s, t, n, d in zip(scores, types, names, defects)]
    for row, score in zip(rows, calibrated or []):
        row["calibrated"] = score
    path.write_text("[\n" + ",\n".join(json.dumps(row) for row in rows) + "\n]\n")


def _figure_links(spro_curves: bool) -> str:
    spro = "![sPRO curves](spro_curves.png)\n\n" if spro_curves else ""
    return ("\n\n## Figures\n\n![ROC curves](roc_curves.png)\n\n![Score histograms](score_histograms.png)\n\n"
            f"{spro}![Highest and lowest scoring test images](heatmaps.png)\n")
