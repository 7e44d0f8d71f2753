"""Capture shift and the remedy a line has: recalibrating on its own reviewed good frames.

A model calibrated on images held out of its training set promises a false-alarm rate for images drawn
like those; a line whose frames differ (other lighting, another camera, MVTec's test captures against
its training captures) sees more. A line can recalibrate on frames its operators reviewed as good
(``slsg dataset from-reviews`` puts them in ``validation/good``, then ``slsg calibrate --data``). This
benchmark measures that on a category's ``test/good``: many times over it splits those images at random
into the line's reviewed frames (``--frames`` of them) and an evaluation part, recalibrates, and counts
the evaluation part's images flagged against the promise. Each way of calibrating is scored the same:

- ``training``: the checkpoint's own calibration (the run's held-out training and validation images);
- ``calibrate``: what ``slsg calibrate --data D`` does when ``D/CAT/validation/good`` holds the frames and
  ``train/good`` the run's training images (``slsg dataset from-reviews --train-good``): the frames and
  the images the run held out of training, pooled, a third fitting the checks' scales, the rest the
  threshold (:func:`split_for_calibration` with the run's ``held_out_train``);
- ``frames``: the frames alone, a third for the scales, the rest for the threshold;
- ``frames_threshold``: the checks' scales as the run fitted them, the threshold on all the frames
  (``slsg calibrate --data D --frames-only``).

Every image is scored once (each score component apart, :func:`fpr_diagnosis.component_scores`); per
resample only the checks' scales (:func:`fpr_diagnosis.fused_log_odds`, as calibration fits them) and
the threshold (:func:`calibration_from_scores`, calibration's own) are refitted. Each row also says what
the threshold costs: the share of the test set's defective images it still flags. The checks' models
(patch memory, composition autoencoder) are the checkpoint's: ``slsg calibrate`` refits the closed-form
ones on the same training images, which gives them again.

Where the frames and the evaluation images are drawn alike (a random split of one set), a threshold set
on frames alone is split-conformal: its mean rate over resamples equals its mean promise exactly, up to
ties. So ``frames`` and ``frames_threshold`` check the machinery, and ``training`` and ``calibrate``
show how much of the shift each leaves.

    python -m slsg_bench.line_recalibration --checkpoint RUN/checkpoint.pt --data /work/data \
        --category screw --frames 10,20 --resamples 500
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

STRATEGIES = ("training", "calibrate", "frames", "frames_threshold")


@dataclass(frozen=True)
class FrameSet:
    """What :func:`split_for_calibration` reads of a category: train/good and validation/good paths (the
    line's frames stand in validation/good, as ``slsg dataset from-reviews`` writes them)."""

    train_paths: list[Path]
    validation_paths: list[Path]


@dataclass
class ScoredImages:
    """Every image's score components, and where each path is among them."""

    components: dict
    index: dict[Path, int]
    checks: list
    top_k: int

    def idx(self, paths: list[Path]) -> np.ndarray:
        return np.array([self.index[p] for p in paths], dtype=np.int64)

    def scores(self, scale_paths: list[Path]) -> np.ndarray:
        """Every image's raw score (float32, as calibration and evaluation compare it) with the checks'
        scales fitted on ``scale_paths``."""
        import torch

        from slsg_bench.fpr_diagnosis import fused_log_odds

        scale_idx = self.idx(scale_paths) if self.checks else np.arange(1)  # no checks: no scale to fit
        return torch.sigmoid(fused_log_odds(self.components, self.checks, scale_idx, self.top_k)).float().numpy()


def check_supported(checks: list) -> None:
    """Refuse checks whose scale or fusion is their own: :func:`fpr_diagnosis.fused_log_odds` refits and
    fuses the base :class:`Check`'s way (the component check pools its training images' scores into its
    scale, which only a pass over the training images gives)."""
    from slsg_train.models.reference import Check

    own = [c.name for c in checks if type(c).fit_scale is not Check.fit_scale or type(c).log_odds is not Check.log_odds]
    if own:
        raise ValueError(f"check(s) {', '.join(own)} fit or fuse their scale their own way, which this benchmark "
                         f"does not reproduce; switch them off on a copy (`slsg checks --component-check off`)")


def score_images(loaded, paths: list[Path]) -> ScoredImages:
    """Score ``paths`` once with the loaded checkpoint (components apart, no scale applied)."""
    from slsg_bench.fpr_diagnosis import component_scores
    from slsg_train.data.images import load_resized

    check_supported(list(loaded.model.checks))

    unique = list(dict.fromkeys(paths))
    comps = component_scores(loaded, load_resized(unique, loaded.image_size, loaded.resize))
    return ScoredImages(comps, {p: i for i, p in enumerate(unique)}, list(loaded.model.checks), loaded.top_k)


def calibrate(scored: ScoredImages, scale: list[Path], threshold: list[Path], fpr: float,
              scores: np.ndarray | None = None):
    """The calibration ``slsg calibrate`` writes for these scale and threshold images, and every image's
    score under it (``scores``: already computed with the scales fitted on ``scale``)."""
    from slsg_train.training.calibration import calibration_from_scores

    scores = scored.scores(scale) if scores is None else scores
    cal, _ = calibration_from_scores(scores[scored.idx(threshold)], fpr, scale_images=len(scale))
    return cal, scores


def flagged(scored: ScoredImages, scores: np.ndarray, cal, paths: list[Path]) -> int:
    """How many of ``paths`` reach the threshold (the raw float32 score at or above it)."""
    return int((scores[scored.idx(paths)] >= np.float32(cal.raw_threshold)).sum())


def recalibrations(scored: ScoredImages, train_paths: list[Path], frames: list[Path], held_out_train: int,
                   fpr: float, has_checks: bool, training) -> dict[str, Any]:
    """Each strategy's (calibration, scores) for one set of line frames (see the module docstring);
    ``training``: the checkpoint's (split, calibration, scores)."""
    from slsg_train.training.calibration import split_for_calibration

    lines = FrameSet(train_paths, frames)
    run_split, _, run_scores = training
    out = {"training": training[1:]}
    line = split_for_calibration(lines, fpr, has_checks, held_out_train=held_out_train)
    out["calibrate"] = calibrate(scored, line.scale, line.threshold, fpr)
    alone = split_for_calibration(lines, fpr, has_checks, held_out_train=0)
    out["frames"] = calibrate(scored, alone.scale, alone.threshold, fpr)
    out["frames_threshold"] = calibrate(scored, run_split.scale, frames, fpr, run_scores)
    return out


def resample(scored: ScoredImages, train_paths: list[Path], good: list[Path], num_frames: int, held_out_train: int,
             fpr: float, has_checks: bool, training, rng: np.random.Generator,
             defects: list[Path] = ()) -> dict[str, dict]:
    """One random split of ``good`` into the line's frames and the evaluation part; each strategy's
    false-alarm report on the evaluation part, with ``defects_caught``: the share of ``defects`` (the
    test set's anomalous images) at or above its threshold (None without any)."""
    from slsg_train.metrics.false_alarms import false_alarm_report

    order = rng.permutation(len(good))
    frames, evaluation = [good[i] for i in order[:num_frames]], [good[i] for i in order[num_frames:]]
    reports = {}
    for name, (cal, scores) in recalibrations(scored, train_paths, frames, held_out_train, fpr, has_checks,
                                              training).items():
        reports[name] = false_alarm_report(flagged(scored, scores, cal, evaluation), len(evaluation), cal,
                                           has_checks=has_checks)
        reports[name]["defects_caught"] = flagged(scored, scores, cal, list(defects)) / len(defects) if defects else None
    return reports


def summarise(reports: list[dict]) -> dict[str, float]:
    """Over resamples: the mean promise, the mean observed rate, the shares within the predictive bound
    on the count and beyond chance."""
    if not reports:
        raise ValueError("no resamples")
    mean = lambda key: float(np.mean([r[key] for r in reports]))  # noqa: E731
    caught = [r["defects_caught"] for r in reports if r.get("defects_caught") is not None]
    return {"threshold_images": mean("threshold_images"), "expected_fpr": mean("expected_fpr"),
            "fpr_upper_90": mean("fpr_upper_90"), "observed_fpr": mean("observed_fpr"),
            "within_flagged_upper_90": mean("within_flagged_upper_90"), "beyond_chance": mean("beyond_chance"),
            "defects_caught": float(np.mean(caught)) if caught else None}


def run_benchmark(checkpoint: str, data: str | None, category: str | None, frame_counts: list[int], resamples: int,
                  fpr: float | None = None, seed: int = 0) -> dict[str, Any]:
    """The benchmark's report (see the module docstring): the run's calibration on all of test/good, and per
    number of frames each strategy's summary over ``resamples`` random splits."""
    import sys

    from slsg_train.data.loco import GOOD, LocoCategory
    from slsg_train.inference import load_model
    from slsg_train.metrics.false_alarms import false_alarm_report
    from slsg_train.training.calibration import split_for_calibration

    loaded = load_model(checkpoint)
    ckpt = loaded.checkpoint
    if category is not None and category != ckpt.category:
        raise ValueError(f"{checkpoint} is a {ckpt.category!r} model, not {category!r}")
    fpr = fpr if fpr is not None else (ckpt.calibration.target_fpr if ckpt.calibration else 0.01)
    data_set = LocoCategory(data or ckpt.data_root, ckpt.category)
    samples = data_set.test_samples()
    good = [s.path for s in samples if s.anomaly_type == GOOD]
    defects = [s.path for s in samples if s.anomaly_type != GOOD]
    too_many = [f for f in frame_counts if not 0 < f < len(good)]
    if too_many:
        raise ValueError(f"--frames {too_many}: each must leave at least one of the {len(good)} good test images "
                         f"to evaluate on, and be at least 1")
    held_out_train = ckpt.held_out_train(data_set)
    has_checks = ckpt.model_config.uses_reference
    run_split = split_for_calibration(data_set, fpr, has_checks, held_out_train=held_out_train)
    scored = score_images(loaded, run_split.scale + run_split.threshold + good + defects)
    print(f"scored {len(scored.index)} images", file=sys.stderr, flush=True)
    run_cal, run_scores = calibrate(scored, run_split.scale, run_split.threshold, fpr)
    report: dict[str, Any] = {
        "checkpoint": checkpoint, "category": ckpt.category, "good_test_images": len(good),
        "held_out_train": held_out_train, "run_scale_images": len(run_split.scale),
        "run_threshold_images": len(run_split.threshold),
        "stored_threshold": ckpt.calibration.raw_threshold if ckpt.calibration else None,
        "rescored_threshold": run_cal.raw_threshold,
        "training_on_all_good": false_alarm_report(flagged(scored, run_scores, run_cal, good), len(good), run_cal,
                                                   has_checks=has_checks),
        "defects": len(defects),
        "frames": {}}
    rng = np.random.default_rng(seed)
    training = (run_split, run_cal, run_scores)
    for num_frames in frame_counts:
        if has_checks and num_frames < 3:  # the frames-alone split needs 2 scale images and a threshold image
            raise ValueError(f"--frames {num_frames}: a model with reference checks needs at least 3 frames")
        runs = [resample(scored, data_set.train_paths, good, num_frames, held_out_train, fpr, has_checks, training,
                         rng, defects) for _ in range(resamples)]
        print(f"{num_frames} frames: {resamples} resamples done", file=sys.stderr, flush=True)
        report["frames"][num_frames] = {name: summarise([r[name] for r in runs]) for name in STRATEGIES}
    return report


def markdown(report: dict[str, Any]) -> str:
    """The report as a Markdown table: one row per (frames, strategy)."""
    pct = lambda v: f"{100 * v:.1f} %"  # noqa: E731
    lines = ["| frames | calibrated on | threshold images | promised | promised 90 % bound | observed | "
             "within the count bound | beyond chance | defects caught |", "|---|---|---|---|---|---|---|---|---|"]
    for frames, by_strategy in report["frames"].items():
        for name, s in by_strategy.items():
            caught = "–" if s["defects_caught"] is None else pct(s["defects_caught"])
            lines.append(f"| {frames} | {name} | {s['threshold_images']:.0f} | {pct(s['expected_fpr'])} | "
                         f"{pct(s['fpr_upper_90'])} | {pct(s['observed_fpr'])} | {pct(s['within_flagged_upper_90'])} "
                         f"| {pct(s['beyond_chance'])} | {caught} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    import sys

    import torch

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="RUN/checkpoint.pt (read only)")
    p.add_argument("--data", default=None, help="data set root (default: the checkpoint's)")
    p.add_argument("--category", default=None, help="the checkpoint's category (checked)")
    p.add_argument("--frames", default="5,10,20", help="numbers of reviewed good frames a line has")
    p.add_argument("--resamples", type=int, default=500)
    p.add_argument("--fpr", type=float, default=None, help="target rate (default: the checkpoint's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    try:
        frames = [int(v) for v in args.frames.split(",") if v.strip()]
        report = run_benchmark(args.checkpoint, args.data, args.category, frames, args.resamples, args.fpr, args.seed)
    except ValueError as exc:
        print(f"line_recalibration: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(report, indent=2, default=str))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
