"""The seed's table from per-category metrics: ours beside the published numbers."""

from __future__ import annotations

import pytest

from slsg_train.evaluation.seed_table import PUBLISHED_IMAGE_AUROC, PUBLISHED_MEAN, render_seed_table, seed_table


def _metrics(category: str, structural: float, logical: float) -> dict:
    return {"category": category,
            "image_auroc": {"structural": structural, "logical": logical, "mean": (structural + logical) / 2}}


def test_all_five_loco_categories_get_the_published_mean_too():
    metrics = [_metrics(c, 0.5 + i / 10, 0.9 - i / 10) for i, c in enumerate(PUBLISHED_IMAGE_AUROC)]
    table = seed_table(metrics)
    assert table["ours"]["structural"]["mean"] == pytest.approx(0.7)
    assert table["ours"]["logical"]["mean"] == pytest.approx(0.7)
    assert table["published"]["mean"] == {**{c: v["mean"] for c, v in PUBLISHED_IMAGE_AUROC.items()},
                                          "mean": PUBLISHED_MEAN["mean"]}
    text = render_seed_table(table)
    assert "| Logical | 0.900 (paper 0.944) | 0.800 (paper 0.991) |" in text
    assert text.splitlines()[-1].endswith("| 0.700 (paper 0.905) |")


def test_a_category_without_a_type_shows_a_dash_and_the_mean_skips_it():
    metrics = [_metrics("tray", 0.8, 0.6), {"category": "bottle", "image_auroc": {"structural": 1.0, "mean": 1.0}}]
    table = seed_table(metrics)
    assert table["ours"]["logical"] == {"tray": 0.6, "bottle": None, "mean": 0.6}
    assert "| Logical | 0.600 | - | 0.600 |" in render_seed_table(table)
    with pytest.raises(ValueError, match="no category metrics"):
        seed_table([])
