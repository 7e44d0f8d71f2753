"""The seed's run_training.py and table: `slsg train --all-categories` trains each category in turn (finished
runs skipped, unfinished ones resumed) and `slsg evaluate --all-categories` writes the seed's table."""

from __future__ import annotations

import json

import pytest
import torch

from support import run_slsg as slsg

TRAIN = ("--image-size", "64", "--steps", "2", "--pretrain-steps", "0", "--batch-size", "2", "--workers", "0",
         "--composition-steps", "5", "--checkpoint-every", "1")


def _stage(run_dir) -> tuple[str, int]:
    payload = torch.load(run_dir / "checkpoint.pt", weights_only=False)
    return payload["stage"], payload["step"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("categories") / "data"
    slsg("synth", root, "--categories", "tray,cable", "--image-size", "96x64", "--train", "4", "--validation", "2",
         "--test-good", "2", "--test-logical", "2", "--test-structural", "2")
    (root / "tray").rename(root / "breakfast_box")  # a LOCO category name: the table shows the paper's number
    return root


def test_train_all_categories_resumes_skips_and_the_seed_table_is_written(data, tmp_path):
    runs = tmp_path / "runs"
    slsg("train", "--all-categories", "--data", data, "--out", runs, *TRAIN, "--until-step", "1")
    assert [_stage(runs / c) for c in ("breakfast_box", "cable")] == [("train", 1), ("train", 1)]

    proc = slsg("train", "--all-categories", "--data", data, "--out", runs, *TRAIN)
    assert proc.stdout.count("resuming") == 2
    assert [_stage(runs / c) for c in ("breakfast_box", "cable")] == [("done", 2), ("done", 2)]
    finished = {c: (runs / c / "checkpoint.pt").stat().st_mtime_ns for c in ("breakfast_box", "cable")}

    proc = slsg("train", "--all-categories", "--data", data, "--out", runs, *TRAIN)
    assert proc.stdout.count("finished, skipped") == 2
    assert finished == {c: (runs / c / "checkpoint.pt").stat().st_mtime_ns for c in finished}

    out = tmp_path / "eval"
    proc = slsg("evaluate", "--all-categories", "--checkpoint", runs, "--data", data, "--out", out)
    text = (out / "seed_table.md").read_text()
    assert text in proc.stdout
    lines = text.splitlines()
    assert lines[0] == "| image AUROC | breakfast_box | cable | mean |"
    assert [line.split(" | ")[0] for line in lines[2:]] == ["| Structural", "| Logical", "| Mean"]
    table = json.loads((out / "seed_table.json").read_text())
    metrics = {c: json.loads((out / c / "metrics.json").read_text())["image_auroc"] for c in ("breakfast_box", "cable")}
    for row in ("structural", "logical", "mean"):
        assert table["ours"][row]["breakfast_box"] == metrics["breakfast_box"][row]
        assert table["ours"][row]["mean"] == pytest.approx((metrics["breakfast_box"][row] + metrics["cable"][row]) / 2)
    assert table["published"]["structural"] == {"breakfast_box": 0.829}  # cable: none; mean: not all five
    assert f"{metrics['breakfast_box']['structural']:.3f} (paper 0.829)" in lines[2]


def test_train_all_categories_refuses_a_category_beside_it(data, tmp_path):
    proc = slsg("train", "--all-categories", "--category", "cable", "--data", data, "--out", tmp_path, check=False)
    assert proc.returncode == 2 and "either --category or --all-categories" in proc.stderr
