"""Evaluation outputs: metrics JSON, Markdown tables, PNG figures and official-layout float32 TIFF maps."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import tifffile
from PIL import Image

from slsg_train.evaluation import (
    HeatmapItem, overlay_heatmap, plot_heatmap_grid, plot_roc_curves, plot_score_histograms, plot_spro_curves,
    render_report_md, render_summary_table, write_metrics_json, write_tiff_map,
)
from slsg_train.evaluation.report import highest_and_lowest
from slsg_train.metrics import ImageMaps, PixelROC, SPROByType, image_auroc_by_type, saturation_area

TYPES = ["good"] * 6 + ["logical_anomalies"] * 5 + ["structural_anomalies"] * 5


@pytest.fixture(scope="module")
def evaluation():
    """Real metrics from small synthetic maps, in the fixed metrics-dict shape."""
    rng = np.random.default_rng(0)
    scores = rng.random(len(TYPES)) + np.array([t != "good" for t in TYPES]) * 0.4
    by_type, pixel = SPROByType(), PixelROC()
    curves_input = []
    for index, anomaly_type in enumerate(TYPES):
        amap = rng.random((32, 48)).astype(np.float32)
        defects = []
        if anomaly_type != "good":
            mask = np.zeros((32, 48), bool)
            mask[4:12, 6:20] = True
            amap[mask] += 0.5
            defects.append((mask, saturation_area(int(mask.sum()), 0.5, relative=True)))
        image = ImageMaps(amap, defects, anomaly_type, name=f"{anomaly_type}/{index:03d}")
        by_type.add(image)
        pixel.add_image(image)
        curves_input.append(image)
    metrics = {
        "category": "juice_bottle",
        "image_auroc": image_auroc_by_type(scores, TYPES),
        "pixel_auroc": pixel.auroc(),
        "au_spro": by_type.result(),
        "threshold": {"raw_threshold": np.float32(0.73), "target_fpr": 0.01},
        "counts": {"good": 6, "logical_anomalies": 5, "structural_anomalies": 5},
    }
    curves = {key: curve.curve()[:2] for key, curve in by_type.curves().items()}
    return metrics, scores, curves


def table_row(markdown: str, first_cell: str) -> list[str]:
    for line in markdown.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells[0] == first_cell:
            return cells[1:]
    raise AssertionError(f"no row {first_cell!r} in:\n{markdown}")


def assert_png(path, min_size=(200, 200)):
    assert path.is_file()
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert image.size[0] >= min_size[0] and image.size[1] >= min_size[1]
        pixels = np.asarray(image.convert("RGB"))
    assert pixels.std() > 5  # something was drawn


def test_metrics_json_round_trip(tmp_path, evaluation):
    metrics, _, _ = evaluation
    path = write_metrics_json(tmp_path / "out" / "metrics.json", metrics)
    loaded = json.loads(path.read_text())
    assert loaded["au_spro"]["0.05"] == pytest.approx(metrics["au_spro"]["0.05"])
    assert loaded["threshold"]["raw_threshold"] == pytest.approx(0.73)  # numpy scalar converted
    with pytest.raises(ValueError, match="pixel_auroc"):
        write_metrics_json(tmp_path / "bad.json", {k: v for k, v in metrics.items() if k != "pixel_auroc"})


def test_report_md_table_holds_the_numbers(evaluation):
    metrics, _, _ = evaluation
    markdown = render_report_md(metrics)
    assert "juice_bottle" in markdown
    for row in ("structural", "logical", "mean"):
        expected = [metrics["image_auroc"][row]] + [metrics["au_spro"][k][row] for k in ("0.05", "0.1", "0.3", "1.0")]
        assert table_row(markdown, row) == [f"{value:.3f}" for value in expected]
    assert f"Pixel AUROC (all test pixels): {metrics['pixel_auroc']:.3f}" in markdown
    assert "- raw_threshold: 0.730" in markdown and "- logical_anomalies: 5" in markdown


def test_report_md_marks_absent_types():
    metrics = {"category": "toy", "image_auroc": {"logical": 0.9, "mean": 0.9}, "pixel_auroc": None,
               "au_spro": {"0.05": {"logical": 0.5, "mean": 0.5}}, "threshold": {}, "counts": {}}
    markdown = render_report_md(metrics)
    assert table_row(markdown, "structural") == ["–"] * 5
    assert table_row(markdown, "logical") == ["0.900", "0.500", "–", "–", "–"]


def test_summary_table_has_a_mean_row(evaluation):
    metrics, _, _ = evaluation
    other = json.loads(json.dumps(metrics, default=float))
    other["category"] = "pushpins"
    other["image_auroc"] = {"logical": 0.5, "structural": 0.7, "mean": 0.6}
    other["pixel_auroc"] = 0.8
    summary = render_summary_table([metrics, other])
    header = [c.strip() for c in summary.splitlines()[0].strip("|").split("|")]
    mean_row = table_row(summary, "**mean**")
    column = header.index("image AUROC logical") - 1
    assert mean_row[column] == f"{(metrics['image_auroc']['logical'] + 0.5) / 2:.3f}"
    assert table_row(summary, "pushpins")[header.index("pixel AUROC") - 1] == "0.800"
    assert mean_row[header.index("pixel AUROC") - 1] == f"{(metrics['pixel_auroc'] + 0.8) / 2:.3f}"
    assert len(re.findall(r"^\|", summary, flags=re.M)) == 2 + 3  # header, rule, 2 categories, mean


def test_figures_are_valid_pngs(tmp_path, evaluation):
    metrics, scores, curves = evaluation
    assert_png(plot_roc_curves(scores, TYPES, tmp_path / "roc.png"))
    assert_png(plot_score_histograms(scores, TYPES, tmp_path / "hist.png", threshold=0.7))
    assert_png(plot_spro_curves(curves, tmp_path / "spro.png"))
    with pytest.raises(ValueError, match="differ in length"):
        plot_roc_curves(scores[:3], TYPES, tmp_path / "bad.png")


def test_overlay_heatmap_blends_jet_colours():
    image = np.full((4, 6, 3), 100, np.uint8)
    amap = np.zeros((4, 6), np.float32)
    amap[0, 0] = 1.0
    out = overlay_heatmap(image, amap, vmin=0.0, vmax=1.0)
    assert out.dtype == np.uint8 and out.shape == (4, 6, 3)
    # jet: top of the scale is dark red (0.5, 0, 0), bottom dark blue (0, 0, 0.5); alpha 0.5 over grey 100
    np.testing.assert_allclose(out[0, 0], [114, 50, 50], atol=1)
    np.testing.assert_allclose(out[3, 5], [50, 50, 114], atol=1)
    small = overlay_heatmap(np.full((40, 60), 7, np.uint8), np.random.default_rng(0).random((4, 6)), 0, 1)
    assert small.shape == (40, 60, 3)  # grey image, map resized to it
    with pytest.raises(ValueError, match="uint8"):
        overlay_heatmap(image.astype(float), amap, 0, 1)


def test_heatmap_grid_shows_highest_and_lowest(tmp_path):
    rng = np.random.default_rng(1)
    items = []
    for index in range(12):
        image = np.clip(rng.normal(120, 30, (64, 96, 3)), 0, 255).astype(np.uint8)
        amap = rng.random((16, 24)).astype(np.float32) * 0.2
        amap[4:9, 6:12] += index / 12  # higher score, brighter blob
        items.append((image, amap, index / 12, TYPES[index], f"{index:03d}.png"))
    chosen = highest_and_lowest([HeatmapItem(*item) for item in items], n=3)
    assert [group for group, _ in chosen] == ["highest"] * 3 + ["lowest"] * 3
    assert [item.title for _, item in chosen] == ["011.png", "010.png", "009.png", "002.png", "001.png", "000.png"]
    assert len(highest_and_lowest([HeatmapItem(*item) for item in items[:4]], n=3)) == 4
    assert_png(plot_heatmap_grid(items, tmp_path / "grid.png", n=3), min_size=(600, 400))


def test_tiff_maps_in_official_layout_read_back_equal(tmp_path):
    amap = np.random.default_rng(2).random((37, 53))  # float64 in, float32 stored, original size kept
    path = write_tiff_map(tmp_path / "maps", "breakfast_box", "logical_anomalies", "007", amap)
    assert path == tmp_path / "maps" / "breakfast_box" / "test" / "logical_anomalies" / "007.tiff"
    back = tifffile.imread(path)
    assert back.dtype == np.float32 and back.shape == (37, 53)
    np.testing.assert_array_equal(back, amap.astype(np.float32))
    with pytest.raises(ValueError, match="index"):
        write_tiff_map(tmp_path, "breakfast_box", "good", "../000", amap)
    with pytest.raises(ValueError, match="2-D"):
        write_tiff_map(tmp_path, "breakfast_box", "good", "000", np.zeros((2, 3, 3)))


def test_report_without_ground_truth_says_why_and_rows_follow_the_defect_types():
    metrics = {"category": "bottle", "image_auroc": {"crack": 0.8, "hole": 0.6, "mean": 0.7, "all": 0.75},
               "pixel_auroc": None, "au_spro": None, "threshold": {}, "counts": {"good": 2, "crack": 1, "hole": 1},
               "ground_truth": {"anomalous_images": 2, "with_masks": 0, "left_out": {"crack/000": "x", "hole/000": "y"},
                                "region_metrics": "unavailable: no ground-truth masks (test)"}}
    markdown = render_report_md(metrics)
    assert [table_row(markdown, row)[0] for row in ("crack", "hole", "mean", "all")] == ["0.800", "0.600", "0.700",
                                                                                        "0.750"]
    assert table_row(markdown, "all")[1:] == ["–"] * 4
    assert "Pixel AUROC and AU-sPRO: unavailable: no ground-truth masks (test)" in markdown
    assert "| logical |" not in markdown
    summary = render_summary_table([metrics])
    assert table_row(summary, "bottle")[-1] == "–"  # pixel AUROC
