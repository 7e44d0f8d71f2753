"""`slsg bench presets`: both presets trained and evaluated side by side on tiny synthetic data.

No ImageNet ResNet-18 weights can be had offline, so the paper preset loads a torchvision-keyed
file of random weights: these tests check the plumbing (the user's file is what the paper preset
starts from, the figures come from the runs, stored runs are reused or protected), not quality.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from support import run_slsg as slsg
from slsg_train.models.backbones import ResNet18Features

SCHEDULE = ("--image-size", "64", "--steps", "3", "--pretrain-steps", "0", "--batch-size", "2", "--workers", "0",
            "--composition-steps", "10", "--threads", "1")


@pytest.fixture(scope="module")
def compared(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("presets")
    data, weights, out = root / "data", root / "resnet18-random.pth", root / "cmp"
    slsg("synth", data, "--categories", "tray", "--image-size", "96x64", "--train", "8", "--validation", "4",
         "--test-good", "3", "--test-logical", "3", "--test-structural", "3")
    torch.manual_seed(0)
    state = ResNet18Features().state_dict()
    state |= {"fc.weight": torch.zeros(1000, 512), "fc.bias": torch.zeros(1000)}  # as torchvision's file has
    torch.save(state, weights)
    args = ("bench", "presets", "--data", data, "--category", "tray", "--out", out, "--paper-weights", weights,
            *SCHEDULE)
    proc = slsg(*args, "--json")
    return {"root": root, "data": data, "weights": weights, "out": out, "args": args,
            "report": json.loads(proc.stdout), "tables": proc.stderr}


def test_both_presets_are_trained_evaluated_and_compared(compared):
    report, out = compared["report"], compared["out"]
    runs = {r["preset"]: r for r in report["runs"]}
    assert set(runs) == {"default", "paper"} and all(r["training"] == "trained" for r in runs.values())
    assert runs["default"]["backbone"] == "efficientnet_lite0" and runs["paper"]["backbone"] == "resnet18"
    for preset, run in runs.items():
        ckpt = out / f"{preset}-seed0" / "checkpoint.pt"
        info = json.loads(slsg("info", "--checkpoint", ckpt, "--json").stdout)
        assert info["stage"] == "done" and run["gflop_per_image"] == pytest.approx(info["gflop_per_image"], abs=1e-3)
        metrics = json.loads((out / f"{preset}-seed0" / "eval" / "metrics.json").read_text())
        assert run["image_auroc"] == metrics["image_auroc"] and run["train_minutes"] > 0
    versus = report["default_vs_paper"]
    ratio = runs["paper"]["gflop_per_image"] / runs["default"]["gflop_per_image"]
    assert versus["gflop_ratio_paper_over_default"] == pytest.approx(ratio, abs=1e-3)
    assert versus["at_least_4x_cheaper"] == (ratio >= 4)
    for kind in ("logical", "structural", "mean"):
        gap = runs["default"]["image_auroc"][kind] - runs["paper"]["image_auroc"][kind]
        assert versus["image_auroc_default_minus_paper"][kind] == pytest.approx(gap, abs=1e-4)
        assert versus["at_least_as_good"][kind] == (versus["image_auroc_default_minus_paper"][kind] >= 0)
    for kind in ("logical", "structural"):
        low, high = versus["image_auroc_gap_ci95"][kind]
        assert -1 <= low <= high <= 1 and versus["worse_beyond_test_noise"][kind] == (high < 0)
    stored = json.loads((out / "comparison.json").read_text())
    assert stored["runs"] == report["runs"] and "GFLOP paper / default" in compared["tables"]
    with Image.open(out / "roc_presets.png") as im:
        assert im.format == "PNG" and im.width > 600


def test_the_paper_preset_starts_from_the_users_resnet18_file(compared):
    # no generative pre-training here, so the frozen encoder still holds the file's weights
    state = torch.load(compared["out"] / "paper-seed0" / "checkpoint.pt", weights_only=False)["model_state"]
    weights = torch.load(compared["weights"])
    for key in ("conv1.weight", "layer2.0.downsample.0.weight", "layer4.1.conv2.weight"):
        assert torch.equal(state[f"encoder.{key}"].float(), weights[key])


def test_a_second_run_reuses_finished_runs_and_refuses_other_settings(compared):
    ckpt = compared["out"] / "paper-seed0" / "checkpoint.pt"
    before = ckpt.read_bytes()
    moved = compared["weights"].rename(compared["root"] / "elsewhere.pth")
    try:  # finished runs hold their encoders: re-evaluating them needs no weights file
        again = json.loads(slsg(*compared["args"], "--json").stdout)
        args = [a if a != "3" else "4" for a in compared["args"]]  # --steps 4
        proc = slsg(*args, check=False)
    finally:
        moved.rename(compared["weights"])
    assert [r["training"] for r in again["runs"]] == ["reused", "reused"]
    assert again["runs"][1]["image_auroc"] == compared["report"]["runs"][1]["image_auroc"]
    assert proc.returncode == 2 and "default-seed0 holds a run with other settings (steps)" in proc.stderr
    assert ckpt.read_bytes() == before


def test_missing_paper_weights_fail_before_any_training(compared, tmp_path):
    out = tmp_path / "cmp"
    proc = slsg("bench", "presets", "--data", compared["data"], "--category", "tray", "--out", out, *SCHEDULE,
                check=False)
    assert proc.returncode == 2
    assert "the paper preset needs ResNet-18 ImageNet weights" in proc.stderr and "--paper-weights PATH" in proc.stderr
    assert not out.exists()
    proc = slsg("bench", "presets", "--data", compared["data"], "--category", "tray", "--out", out,
                "--paper-weights", tmp_path / "absent.pth", *SCHEDULE, check=False)
    assert proc.returncode == 2 and "absent.pth" in proc.stderr and not out.exists()


def test_the_summary_averages_seeds_before_comparing():
    from slsg_bench.presets import summarise

    def row(preset, seed, gflop, logical, structural):
        auroc = {"logical": logical, "structural": structural, "mean": (logical + structural) / 2}
        return {"preset": preset, "seed": seed, "gflop_per_image": gflop, "train_minutes": 1.0 + seed,
                "image_auroc": auroc, "au_spro_0.05": auroc}

    summary = summarise([row("default", 0, 11.5, 0.90, 1.0), row("paper", 0, 46.0, 0.96, 1.0),
                         row("default", 1, 11.5, 0.98, 0.98), row("paper", 1, 46.0, 0.88, 1.0)])
    assert summary["presets"]["default"]["image_auroc"]["logical"] == pytest.approx(0.94)
    assert summary["presets"]["paper"]["train_minutes"] == pytest.approx(1.5)
    versus = summary["default_vs_paper"]
    assert versus["gflop_ratio_paper_over_default"] == pytest.approx(4.0) and versus["at_least_4x_cheaper"]
    assert versus["image_auroc_default_minus_paper"]["logical"] == pytest.approx(0.02)
    assert versus["image_auroc_default_minus_paper"]["structural"] == pytest.approx(-0.01)
    assert versus["at_least_as_good"] == {"logical": True, "structural": False, "mean": True}
    assert "default_vs_paper" not in summarise([row("default", 0, 11.5, 0.9, 1.0)])


def test_seeds_are_distinct_non_negative_integers():
    proc = slsg("bench", "presets", "--data", "d", "--category", "c", "--out", "o", "--seeds", "0,0", check=False)
    assert proc.returncode == 2 and "each seed once" in proc.stderr


def _scored(good: list[float], logical: list[float]) -> list[dict]:
    return ([{"image": f"good/{i:03d}", "type": "good", "score": s} for i, s in enumerate(good)]
            + [{"image": f"logical_anomalies/{i:03d}", "type": "logical_anomalies", "score": s}
               for i, s in enumerate(logical)])


def test_the_auroc_gap_interval_pairs_the_test_images():
    from slsg_bench.presets import auroc_gap_interval
    from slsg_train.metrics.roc import auroc

    rng = np.random.default_rng(0)
    good, logical = rng.normal(0, 1, 60), rng.normal(1, 1, 60)
    # the same scores for both presets: every resample gives a gap of exactly 0
    same = {("default", 0): _scored(good, logical), ("paper", 0): _scored(good, logical)}
    assert auroc_gap_interval(same, "logical") == (0.0, 0.0)
    # paper's scores are default's plus noise: the interval holds the gap and is narrower than unpaired
    noisy = {("default", 0): _scored(good, logical),
             ("paper", 0): _scored(good + rng.normal(0, 1, 60), logical + rng.normal(0, 1, 60))}
    labels = [0] * 60 + [1] * 60
    gap = auroc(np.r_[good, logical], labels) - auroc([x["score"] for x in noisy[("paper", 0)]], labels)
    low, high = auroc_gap_interval(noisy, "logical")
    assert low < gap < high and high - low < 0.2
    # images are matched by name, not by position in the list
    shuffled = dict(noisy)
    shuffled[("paper", 0)] = noisy[("paper", 0)][::-1]
    assert auroc_gap_interval(shuffled, "logical") == (low, high)
    assert auroc_gap_interval(noisy, "structural") is None  # no structural test images
