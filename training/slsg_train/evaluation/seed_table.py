"""The seed's results table: image AUROC with rows Structural, Logical, Mean and a column per category plus
their mean, as the SLSG README publishes it; for MVTec LOCO AD's five categories the published number
stands beside ours (``0.812 (paper 0.829)``)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

# image AUROC of the authors' released weights (shared/design/SLSG.md)
PUBLISHED_IMAGE_AUROC: dict[str, dict[str, float]] = {
    "breakfast_box": {"structural": 0.829, "logical": 0.944, "mean": 0.884},
    "juice_bottle": {"structural": 0.977, "logical": 0.991, "mean": 0.985},
    "pushpins": {"structural": 0.941, "logical": 0.967, "mean": 0.955},
    "screw_bag": {"structural": 0.932, "logical": 0.734, "mean": 0.808},
    "splicing_connectors": {"structural": 0.935, "logical": 0.862, "mean": 0.894},
}
PUBLISHED_MEAN = {"structural": 0.923, "logical": 0.899, "mean": 0.905}  # over the five categories
ROWS = ("structural", "logical", "mean")


def seed_table(all_metrics: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """{"categories": [...], "ours": {row: {category | "mean": AUROC}}, "published": {...}} from the
    per-category metrics of ``slsg evaluate`` (a row absent from a category's test set is None)."""
    if not all_metrics:
        raise ValueError("no category metrics for the table")
    categories = [str(m["category"]) for m in all_metrics]
    ours: dict[str, dict[str, float | None]] = {}
    for row in ROWS:
        values = {c: m["image_auroc"].get(row) for c, m in zip(categories, all_metrics)}
        present = [v for v in values.values() if v is not None]
        ours[row] = {**values, "mean": float(np.mean(present)) if present else None}
    published = {row: {c: PUBLISHED_IMAGE_AUROC[c][row] for c in categories if c in PUBLISHED_IMAGE_AUROC}
                 for row in ROWS}
    if set(PUBLISHED_IMAGE_AUROC) <= set(categories):  # the published mean is over exactly these five
        for row in ROWS:
            published[row]["mean"] = PUBLISHED_MEAN[row]
    return {"categories": categories, "ours": ours, "published": published}


def render_seed_table(table: Mapping[str, Any]) -> str:
    """Markdown of :func:`seed_table`: ours, and the paper's in brackets where it published one."""
    columns = [*table["categories"], "mean"]

    def cell(row: str, column: str) -> str:
        value = table["ours"][row][column]
        text = "-" if value is None else f"{value:.3f}"
        paper = table["published"][row].get(column)
        return text if paper is None else f"{text} (paper {paper:.3f})"

    lines = ["| image AUROC | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    lines += [f"| {row.capitalize()} | " + " | ".join(cell(row, c) for c in columns) + " |" for row in ROWS]
    return "\n".join(lines) + "\n"
