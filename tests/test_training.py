"""Training runs at tiny sizes through the real `slsg` console script: resume, DDP, errors."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import SLSG_BIN as SLSG, run_slsg as slsg

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
TINY = ["--category", "tray", "--image-size", "64", "--batch-size", "2", "--workers", "0",
        "--checkpoint-every", "100", "--log-every", "1", "--composition-steps", "5"]




@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    slsg("synth", str(root), "--categories", "tray", "--image-size", "64", "--train", "8", "--validation", "4",
         "--test-good", "3", "--test-logical", "3", "--test-structural", "3", "--seed", "1")
    return root


def state(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "checkpoint.pt", map_location="cpu", weights_only=False)["model_state"]


def test_resumed_run_equals_uninterrupted_run(tiny_data, tmp_path):
    common = ["--data", str(tiny_data), *TINY, "--steps", "4", "--pretrain-steps", "2"]
    slsg("train", *common, "--out", str(tmp_path / "full"))
    # stop inside pre-training, resume, stop inside detector training, resume again
    slsg("train", *common, "--out", str(tmp_path / "parts"), "--until-step", "1")
    ckpt = torch.load(tmp_path / "parts" / "checkpoint.pt", map_location="cpu", weights_only=False)
    assert (ckpt["stage"], ckpt["step"]) == ("pretrain", 1)
    slsg("train", "--data", str(tiny_data), "--category", "tray", "--out", str(tmp_path / "parts"), "--resume",
         "--until-step", "2")
    ckpt = torch.load(tmp_path / "parts" / "checkpoint.pt", map_location="cpu", weights_only=False)
    assert (ckpt["stage"], ckpt["step"]) == ("train", 2)
    slsg("train", "--data", str(tiny_data), "--category", "tray", "--out", str(tmp_path / "parts"), "--resume")

    full, parts = state(tmp_path / "full"), state(tmp_path / "parts")
    assert full.keys() == parts.keys()
    for name in full:
        torch.testing.assert_close(parts[name], full[name], rtol=1e-5, atol=1e-6, msg=name)
    done = torch.load(tmp_path / "parts" / "checkpoint.pt", map_location="cpu", weights_only=False)
    assert done["stage"] == "done" and done["calibration"]["num_images"] == 4
    assert done["image_size"] == [64, 64] and done["backbone"] == "efficientnet_lite0"
    log = (tmp_path / "parts" / "train_log.jsonl").read_text().splitlines()
    train_steps = [line for line in log if '"stage": "train"' in line]
    assert len(train_steps) == 4  # steps 1..4 logged exactly once across the three invocations


def test_ddp_two_cpu_ranks_end_with_identical_weights(tiny_data, tmp_path):
    run_dir = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", SLSG, "train",
           "--data", str(tiny_data), *TINY, "--steps", "3", "--pretrain-steps", "2", "--out", str(run_dir)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    digests = [(run_dir / f"weights_digest.rank{r}.txt").read_text() for r in (0, 1)]
    assert len(digests[0]) == 64 and digests[0] == digests[1]
    assert torch.load(run_dir / "checkpoint.pt", map_location="cpu", weights_only=False)["stage"] == "done"


def test_train_reports_a_wrong_data_root_clearly(tmp_path):
    proc = slsg("train", "--data", str(tmp_path / "nowhere"), "--category", "tray", "--out", str(tmp_path / "r"),
                check=False)
    assert proc.returncode == 2
    assert "nowhere" in proc.stderr and "Traceback" not in proc.stderr


def test_resume_without_checkpoint_names_the_missing_file(tiny_data, tmp_path):
    proc = slsg("train", "--data", str(tiny_data), "--category", "tray", "--out", str(tmp_path / "empty"),
                "--resume", check=False)
    assert proc.returncode == 2 and "checkpoint.pt" in proc.stderr


def test_bench_pipeline_reports_both_variants(tiny_data):
    import json

    proc = slsg("bench", "pipeline", "--data", str(tiny_data), "--category", "tray", "--image-size", "64",
                "--steps", "2", "--warmup", "1", "--batch-size", "2", "--workers", "1", "--threads", "1", "--json")
    report = json.loads(proc.stdout)
    assert report["step_s_live_simulation"] > 0 and report["step_s_pregenerated"] > 0
    assert report["ratio"] == report["step_s_live_simulation"] / report["step_s_pregenerated"]
    assert "simulation in workers" in proc.stderr  # the table goes to stderr with --json
