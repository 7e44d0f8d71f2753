"""Training runs at tiny sizes through the real `slsg` console script: resume, DDP, errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from checkpoint_fixtures import rewrite_as_version_1
from slsg_train.checkpoint import load_checkpoint
from support import SLSG_BIN as SLSG, run_slsg as slsg

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
    ckpt = load_checkpoint(tmp_path / "parts")
    assert (ckpt.stage, ckpt.step) == ("pretrain", 1)
    slsg("train", "--data", str(tiny_data), "--category", "tray", "--out", str(tmp_path / "parts"), "--resume",
         "--until-step", "2")
    ckpt = load_checkpoint(tmp_path / "parts")
    assert (ckpt.stage, ckpt.step) == ("train", 2)
    slsg("train", "--data", str(tiny_data), "--category", "tray", "--out", str(tmp_path / "parts"), "--resume")

    full, parts = state(tmp_path / "full"), state(tmp_path / "parts")
    assert full.keys() == parts.keys()
    for name in full:
        torch.testing.assert_close(parts[name], full[name], rtol=1e-5, atol=1e-6, msg=name)
    done = load_checkpoint(tmp_path / "parts")
    assert done.stage == "done" and done.calibration.num_images == 3  # 4 validation + 1 held out - 2 scale
    assert done.image_size == (64, 64) and done.backbone == "efficientnet_lite0"
    log = (tmp_path / "parts" / "train_log.jsonl").read_text().splitlines()
    train_steps = [line for line in log if '"event": "step"' in line and '"stage": "train"' in line]
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
    proc = slsg("bench", "pipeline", "--data", str(tiny_data), "--category", "tray", "--image-size", "64",
                "--steps", "2", "--warmup", "1", "--batch-size", "2", "--workers", "1", "--threads", "1", "--json")
    report = json.loads(proc.stdout)
    assert report["step_s_live_simulation"] > 0 and report["step_s_pregenerated"] > 0
    assert report["ratio"] == report["step_s_live_simulation"] / report["step_s_pregenerated"]
    assert report["precision"] in ("fp32", "bf16")  # "auto" resolved, as training resolves it
    assert "simulation in workers" in proc.stderr  # the table goes to stderr with --json


@pytest.mark.skipif(torch.cuda.is_available(), reason="the error is for machines without CUDA")
def test_bench_pipeline_on_a_missing_gpu_says_so(tiny_data):
    proc = slsg("bench", "pipeline", "--data", str(tiny_data), "--category", "tray", "--device", "cuda", check=False)
    assert proc.returncode == 2 and "CUDA is not available" in proc.stderr and "Traceback" not in proc.stderr


def test_precision_setting_is_validated_and_auto_follows_the_hardware():
    from slsg_train.training.config import TrainConfig
    from slsg_train.training.precision import native_bf16, resolve_precision

    with pytest.raises(ValueError, match="precision must be one of auto, fp32, bf16; got 'fp16'"):
        TrainConfig(precision="fp16")
    cpu = torch.device("cpu")
    assert resolve_precision("auto", cpu) == ("bf16" if native_bf16(cpu) else "fp32")
    assert [resolve_precision(p, cpu) for p in ("fp32", "bf16")] == ["fp32", "bf16"]


def test_bf16_training_step_runs_in_bfloat16_and_updates_float32_weights():
    from slsg_train.models import SLSG, preset
    from slsg_train.training.config import LossConfig
    from slsg_train.training.losses import slsg_loss
    from slsg_train.training.precision import autocast

    torch.manual_seed(0)
    # the ImageNet encoder: random weights at N(0, 0.02) carry too little signal to measure rounding against
    model = SLSG(preset("default", patch_memory=False, composition_check=False)).train()
    x, mask = torch.randn(2, 3, 64, 64), (torch.rand(2, 1, 64, 64) > 0.8).float()
    cpu = torch.device("cpu")
    with torch.no_grad(), autocast("fp32", cpu):
        reference = model(x).logits
    with autocast("bf16", cpu):
        out = model(x)
    assert reference.dtype == torch.float32 and out.logits.dtype == torch.bfloat16
    # bfloat16 keeps about 3 significant digits: the same map, within a hundredth of probability
    probability = torch.softmax(out.logits.float(), dim=1)[:, 1]
    torch.testing.assert_close(probability, torch.softmax(reference, dim=1)[:, 1], atol=0.03, rtol=0)
    loss, _ = slsg_loss(out.logits.float(), out.aux_logits.float(), mask, LossConfig())
    loss.backward()
    trained = [p for p in model.parameters() if p.requires_grad]
    assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32 for p in trained)
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in trained)


def test_a_run_from_before_mixed_precision_resumes_in_fp32(tiny_data, tmp_path):
    run_dir = tmp_path / "old"
    slsg("train", "--data", str(tiny_data), *TINY, "--steps", "3", "--pretrain-steps", "2", "--out", str(run_dir),
         "--until-step", "1")
    rewrite_as_version_1(run_dir / "checkpoint.pt", oldest=True)  # no precision setting, among others
    slsg("train", "--data", str(tiny_data), "--category", "tray", "--out", str(run_dir), "--resume", "--until-step", "2")
    slsg("train", "--data", str(tiny_data), "--category", "tray", "--out", str(run_dir), "--resume",
         "--precision", "bf16")
    resumes = [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()
               if '"event": "resume"' in line]
    assert [(r["stage"], r["precision"]) for r in resumes] == [("pretrain", "fp32"), ("train", "bf16")]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_run_resumes_and_scores_like_its_checkpoint_on_cpu(tiny_data, tmp_path):
    run_dir = tmp_path / "cuda"
    slsg("train", "--data", str(tiny_data), *TINY, "--steps", "4", "--pretrain-steps", "2", "--out", str(run_dir),
         "--device", "cuda", "--until-step", "3")
    slsg("train", "--data", str(tiny_data), "--category", "tray", "--out", str(run_dir), "--resume")
    ckpt = torch.load(run_dir / "checkpoint.pt", map_location="cpu", weights_only=False)
    assert ckpt["stage"] == "done" and ckpt["train_config"]["device"] == "cuda"
    scores = {}
    for device in ("cuda", "cpu"):
        slsg("evaluate", "--checkpoint", str(run_dir / "checkpoint.pt"), "--data", str(tiny_data),
             "--out", str(tmp_path / device), "--device", device)
        scores[device] = [row["score"] for row in json.loads((tmp_path / device / "scores.json").read_text())]
    assert len(scores["cpu"]) == 9
    torch.testing.assert_close(torch.tensor(scores["cuda"]), torch.tensor(scores["cpu"]), rtol=1e-3, atol=1e-4)


def test_threshold_leaves_the_allowed_calibration_images_above_it_and_warns_when_too_few():
    import numpy as np

    from slsg.contract import Calibration
    from slsg_train.training.calibration import calibration_from_scores, small_calibration_warning

    scores = np.random.default_rng(0).permutation(np.arange(1000) / 1000)
    cal, stats = calibration_from_scores(scores, 0.01)
    assert stats["at_or_above_threshold"] == 9 and 0.990 < cal.raw_threshold < 0.991  # 9 of 1000, k = 9
    assert stats["expected_fpr"] == pytest.approx(10 / 1001) and small_calibration_warning(cal) is None
    assert cal.score_min == 0.0 and cal.score_median == pytest.approx(0.4995)  # the score's unit above the threshold
    cal, stats = calibration_from_scores(scores[:60], 0.01)
    assert stats["at_or_above_threshold"] == 0 and cal.raw_threshold > scores[:60].max()
    warning = small_calibration_warning(cal)
    assert "60 normal threshold images" in warning and "1.64%" in warning and "at least 99" in warning
    assert small_calibration_warning(Calibration(target_fpr=0.0, num_images=60)) is None  # asked for the strictest
