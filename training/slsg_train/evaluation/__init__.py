"""Evaluation outputs: metrics JSON, Markdown report tables, figures and official-layout TIFF maps."""

from slsg_train.evaluation.report import (
    HeatmapItem, overlay_heatmap, plot_heatmap_grid, plot_roc_curves, plot_score_histograms, plot_spro_curves,
    render_report_md, render_summary_table, validate_metrics, write_metrics_json, write_tiff_map,
)

__all__ = [
    "HeatmapItem", "overlay_heatmap", "plot_heatmap_grid", "plot_roc_curves", "plot_score_histograms",
    "plot_spro_curves", "render_report_md", "render_summary_table", "validate_metrics", "write_metrics_json",
    "write_tiff_map",
]
