"""benchmarks/slsg_bench/line_recalibration: recalibrating a tiny trained run on a line's good frames."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from slsg.cli import main

FRAMES = 4


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(data root, checkpoint) of a real SLSG run trained for 2 steps at 64 px with the patch memory and
    the composition check (8 good test images: a line's frames and an evaluation part)."""
    work = tmp_path_factory.mktemp("line_recalibration")
    assert main(["synth", str(work / "data"), "--categories", "tray", "--image-size", "64", "--train", "8",
                 "--validation", "2", "--test-good", "8", "--test-logical", "1", "--test-structural", "1"]) == 0
    assert main(["train", "--data", str(work / "data"), "--category", "tray", "--out", str(work / "run"),
                 "--image-size", "64", "--steps", "2", "--pretrain-steps", "0", "--workers", "0", "--batch-size", "2",
                 "--composition-steps", "5", "--component-check", "off"]) == 0
    return work / "data", work / "run" / "checkpoint.pt"


def _line_data_set(root: Path, category, frames: list[Path], rest: list[Path]) -> None:
    """What `slsg dataset from-reviews --train-good` writes: the run's training images in train/good,
    the reviewed good frames in validation/good (numbered in review order), held-out ones in test/good."""
    for sub, paths in (("validation/good", frames), ("test/good", rest)):
        (root / category.name / sub).mkdir(parents=True)
        for i, path in enumerate(paths):
            shutil.copyfile(path, root / category.name / sub / f"{i:03d}.png")
    shutil.copytree(category.path / "train" / "good", root / category.name / "train" / "good")


def test_the_benchmark_recalibrates_as_slsg_calibrate_does(tiny_run, tmp_path) -> None:
    from slsg_bench import line_recalibration as lr
    from slsg_train.checkpoint import load_checkpoint
    from slsg_train.data.loco import LocoCategory
    from slsg_train.inference import load_model
    from slsg_train.training.calibration import split_for_calibration

    data, checkpoint = tiny_run
    loaded = load_model(checkpoint)
    category = LocoCategory(data, loaded.category)
    good = [s.path for s in category.test_samples(["good"])]
    held = loaded.checkpoint.held_out_train(category)
    split = split_for_calibration(category, 0.01, True, held_out_train=held)
    scored = lr.score_images(loaded, split.scale + split.threshold + good)
    run_cal, run_scores = lr.calibrate(scored, split.scale, split.threshold, 0.01)
    # the run's own calibration, rescored from the components, is the one training stored
    assert run_cal.raw_threshold == pytest.approx(loaded.calibration.raw_threshold, rel=1e-6)
    frames = good[:FRAMES]
    ways = lr.recalibrations(scored, category.train_paths, frames, held, 0.01, True, (split, run_cal, run_scores))

    # the same frames through the CLI, as a line would put them
    _line_data_set(tmp_path / "line", category, frames, good[FRAMES:])
    copy = tmp_path / "recalibrated.pt"
    shutil.copyfile(checkpoint, copy)
    assert main(["calibrate", "--checkpoint", str(copy), "--data", str(tmp_path / "line")]) == 0
    cli = load_checkpoint(copy).calibration
    bench = ways["calibrate"][0]
    assert (bench.num_images, bench.scale_images) == (cli.num_images, cli.scale_images) == (
        round((FRAMES + held) * 2 / 3), round((FRAMES + held) / 3))
    assert bench.raw_threshold == pytest.approx(cli.raw_threshold, rel=1e-6)
    # the other ways: the frames alone, and the run's scales with the threshold on every frame
    assert ways["frames"][0].num_images + ways["frames"][0].scale_images == FRAMES
    assert (ways["frames_threshold"][0].num_images, ways["frames_threshold"][0].scale_images) == (FRAMES, len(split.scale))
    assert ways["training"][0] == run_cal

    # --frames-only: the run's scales kept, the threshold on the frames alone (the frames_threshold rows)
    only = tmp_path / "frames_only.pt"
    shutil.copyfile(checkpoint, only)
    assert main(["calibrate", "--checkpoint", str(only), "--data", str(tmp_path / "line"), "--frames-only"]) == 0
    saved = load_checkpoint(only)
    bench = ways["frames_threshold"][0]
    assert (saved.calibration.num_images, saved.calibration.scale_images) == (FRAMES, len(split.scale))
    assert bench.raw_threshold == pytest.approx(saved.calibration.raw_threshold, rel=1e-6)
    assert saved.held_out_train(category) == held  # a later recalibration still knows what training held out
    assert saved.model_state["patch_memory.scale"].equal(loaded.checkpoint.model_state["patch_memory.scale"])


def test_frames_only_refuses_the_runs_own_data_and_a_missing_frames_folder(tiny_run, tmp_path, capsys) -> None:
    data, checkpoint = tiny_run
    copy = tmp_path / "copy.pt"
    shutil.copyfile(checkpoint, copy)
    assert main(["calibrate", "--checkpoint", str(copy), "--frames-only"]) == 2
    assert "frames the run never saw: give --data" in capsys.readouterr().err
    assert main(["calibrate", "--checkpoint", str(copy), "--frames-only", "--data", str(data)]) == 2
    capsys.readouterr()
    flat = tmp_path / "flat" / "tray"
    shutil.copytree(data / "tray" / "train", flat / "train")
    shutil.copytree(data / "tray" / "test", flat / "test")
    assert main(["calibrate", "--checkpoint", str(copy), "--frames-only", "--data", str(flat.parent)]) == 2
    assert "validation/good: no frames to calibrate on" in capsys.readouterr().err


def test_the_benchmark_reports_each_way_over_resamples(tiny_run, capsys) -> None:
    from slsg_bench.line_recalibration import STRATEGIES, main as bench_main, run_benchmark

    data, checkpoint = tiny_run
    report = run_benchmark(str(checkpoint), str(data), "tray", [3, 5], resamples=20)
    assert (report["good_test_images"], report["defects"]) == (8, 2) and set(report["frames"]) == {3, 5}
    for frames, by_way in report["frames"].items():
        assert set(by_way) == set(STRATEGIES)
        assert by_way["frames_threshold"]["threshold_images"] == frames
        for summary in by_way.values():
            assert 0 <= summary["observed_fpr"] <= 1 and 0 <= summary["within_flagged_upper_90"] <= 1
            assert 0 <= summary["defects_caught"] <= 1
            assert summary["expected_fpr"] <= summary["fpr_upper_90"]
    # the run's own promise does not depend on the frames
    assert report["frames"][3]["training"]["expected_fpr"] == report["training_on_all_good"]["expected_fpr"]

    assert bench_main(["--checkpoint", str(checkpoint), "--data", str(data), "--frames", "8"]) == 2
    assert "--frames [8]: each must leave at least one of the 8 good test images" in capsys.readouterr().err
    assert bench_main(["--checkpoint", str(checkpoint), "--data", str(data), "--category", "cable"]) == 2
    assert "is a 'tray' model, not 'cable'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="no resamples"):
        from slsg_bench.line_recalibration import summarise
        summarise([])
