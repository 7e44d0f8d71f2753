"""The `default` and `paper` presets trained and evaluated side by side (`slsg bench presets`).

The target it measures: `default` costs at most a quarter of `paper`'s GFLOP per image and detects
at least as well on the same data. Both presets get the same data, schedule and seeds, and each run
is an ordinary run directory (``train_log.jsonl``, ``checkpoint.pt``, ``eval/``) that can be
inspected, exported or resumed. A finished run with the same settings is reused, an unfinished one
resumed, and a run directory trained with other settings is refused rather than overwritten.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from slsg_train.checkpoint import load_checkpoint
from slsg_train.data.loco import LocoCategory
from slsg_train.evaluation.report import plot_roc_comparison
from slsg_train.metrics.roc import GOOD, type_key
from slsg_train.training.config import TrainConfig

COMPARED_PRESETS = ("default", "paper")
ANOMALY_TYPES = ("logical", "structural")
# what a reused run must match; the rest (workers, device, logging) does not change the model
_MATCHED = ("category", "preset", "backbone_weights", "image_size", "steps", "batch_size", "seed", "model")


@dataclass(frozen=True)
class PresetComparison:
    """What to train and where: one run per preset and seed under ``out``."""

    data: Path
    category: str
    out: Path
    paper_weights: str = "imagenet"          # a torchvision resnet18 .pth, or "imagenet" (cache / download)
    allow_download: bool = False
    eval_data: Path | None = None            # default: ``data``
    image_size: tuple[int, int] = (256, 256)
    steps: int = 900
    pretrain_steps: int = 200
    batch_size: int = 4
    seeds: tuple[int, ...] = (0,)
    workers: int = 2
    device: str = "auto"
    precision: str = "auto"
    default_model: dict[str, Any] = field(default_factory=dict)  # SLSGConfig fields for `default` only

    def run_dir(self, preset: str, seed: int) -> Path:
        return self.out / f"{preset}-seed{seed}"

    def train_config(self, preset: str, seed: int) -> TrainConfig:
        cfg = TrainConfig(category=self.category, preset=preset, image_size=self.image_size, steps=self.steps,
                          batch_size=self.batch_size, seed=seed, workers=self.workers, device=self.device,
                          precision=self.precision)
        cfg.pretrain.steps = self.pretrain_steps
        if preset == "paper":
            cfg.backbone_weights, cfg.allow_download = self.paper_weights, self.allow_download
        else:
            cfg.model = dict(self.default_model)
        return cfg


def _finished(run_dir: Path) -> bool:
    ckpt = run_dir / "checkpoint.pt"
    return ckpt.is_file() and load_checkpoint(ckpt).stage == "done"


def check_paper_weights(spec: PresetComparison) -> None:
    """Fail before any training when the paper's ResNet-18 weights cannot be had and a paper run still
    needs them: a finished run holds its encoder, so re-evaluating finished runs needs no file."""
    if all(_finished(spec.run_dir("paper", seed)) for seed in spec.seeds):
        return
    from slsg_train.models import BackboneWeightsError, create_backbone

    try:
        create_backbone("resnet18", spec.paper_weights, spec.allow_download)
    except (BackboneWeightsError, FileNotFoundError, ValueError) as exc:
        offline = spec.paper_weights == "imagenet" and not spec.allow_download
        reason = "none in torch.hub's cache, and downloading is not allowed" if offline else str(exc)
        raise BackboneWeightsError(
            f"the paper preset needs ResNet-18 ImageNet weights ({reason}): pass --paper-weights PATH to "
            f"torchvision's resnet18-f37072fd.pth, or --allow-download when online") from exc


def _mismatch(stored: dict[str, Any], wanted: dict[str, Any]) -> list[str]:
    stored, wanted = json.loads(json.dumps(stored)), json.loads(json.dumps(wanted))  # tuples -> lists
    diffs = [k for k in _MATCHED if stored.get(k) != wanted.get(k)]
    if stored.get("pretrain", {}).get("steps") != wanted["pretrain"]["steps"]:
        diffs.append("pretrain.steps")
    return diffs


def ensure_trained(cfg: TrainConfig, data: Path, data_hash: str, run_dir: Path) -> tuple[Path, str]:
    """Train the run, resume it, or reuse it when finished (``data_hash``: the training data's, which a
    reused run must match); returns (checkpoint, what was done)."""
    from slsg_train.training.trainer import TrainingRun

    ckpt = run_dir / "checkpoint.pt"
    if not ckpt.is_file():
        return TrainingRun(cfg, data, run_dir).run(), "trained"
    stored = load_checkpoint(ckpt)
    diffs = _mismatch(stored.train_config.to_dict() if stored.train_config else {}, cfg.to_dict())
    if stored.data_hash != data_hash:
        diffs.append("data")
    if diffs:
        raise ValueError(f"{run_dir} holds a run with other settings ({', '.join(diffs)}); choose another --out "
                         f"or delete that run directory")
    if stored.stage == "done":
        return ckpt, "reused"
    return TrainingRun(cfg, data, run_dir, resume=True).run(), "resumed"


def _training_summary(run_dir: Path) -> dict[str, Any]:
    """Cost figures from the run's log: GFLOP and parameters at the start, wall time to calibration."""
    records = [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines() if line.strip()]
    start = next(r for r in reversed(records) if r["event"] == "start")  # a restarted run logs a new start
    done = next((r for r in reversed(records) if r["event"] == "calibrated"), None)
    return {"gflop_per_image": round(start["gflop_per_image"], 3), "parameters": start["parameters"],
            "precision": start.get("precision"),
            "train_minutes": round((done["time"] - start["time"]) / 60, 2) if done else None,
            "resumed": any(r["event"] == "resume" for r in records)}


def _evaluate(ckpt: Path, data: Path, category: str, out: Path, device: str) -> tuple[dict, list[dict]]:
    from slsg_train.evaluation.runner import evaluate_category
    from slsg_train.inference import load_model
    from slsg_train.training.trainer import resolve_device

    device = str(resolve_device(device))
    result = evaluate_category(load_model(ckpt, device), LocoCategory(data, category), out, device=device)
    return result.metrics, json.loads((out / "scores.json").read_text())


def _run_row(preset: str, seed: int, run_dir: Path, how: str, metrics: dict) -> dict[str, Any]:
    flagged = metrics["threshold"].get("flagged_share_by_type", {})
    return {"preset": preset, "seed": seed, "run_dir": str(run_dir), "training": how,
            "backbone": metrics["checkpoint"]["backbone"], **_training_summary(run_dir),
            "image_auroc": metrics["image_auroc"], "au_spro_0.05": (metrics["au_spro"] or {}).get("0.05", {}),
            "flagged_share": {type_key(t): v for t, v in flagged.items()}}


def _mean(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return round(float(np.mean(present)), 4) if present else None


def summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per preset: means over the seeds; then default against paper (cost ratio, AUROC differences)."""
    by_preset: dict[str, dict[str, Any]] = {}
    for preset in COMPARED_PRESETS:
        runs = [r for r in rows if r["preset"] == preset]
        if not runs:
            continue
        by_preset[preset] = {
            "seeds": [r["seed"] for r in runs], "gflop_per_image": runs[0]["gflop_per_image"],
            "train_minutes": _mean([r["train_minutes"] for r in runs]),
            "image_auroc": {k: _mean([r["image_auroc"].get(k) for r in runs]) for k in (*ANOMALY_TYPES, "mean")},
            "au_spro_0.05": {k: _mean([r["au_spro_0.05"].get(k) for r in runs]) for k in (*ANOMALY_TYPES, "mean")},
        }
    summary: dict[str, Any] = {"presets": by_preset}
    if len(by_preset) == len(COMPARED_PRESETS):
        d, p = by_preset["default"], by_preset["paper"]
        gap = {k: None if d["image_auroc"][k] is None or p["image_auroc"][k] is None
               else round(d["image_auroc"][k] - p["image_auroc"][k], 4) for k in (*ANOMALY_TYPES, "mean")}
        cost = round(p["gflop_per_image"] / d["gflop_per_image"], 3)
        summary["default_vs_paper"] = {
            "gflop_ratio_paper_over_default": cost, "at_least_4x_cheaper": cost >= 4.0,
            "image_auroc_default_minus_paper": gap,
            "at_least_as_good": {k: v is not None and v >= 0 for k, v in gap.items()},
        }
    return summary


def _pair_matrix(good: np.ndarray, anomalous: np.ndarray) -> np.ndarray:
    """1 where an anomalous image outscores a good one, 1/2 on a tie: image AUROC is its mean."""
    return (anomalous[:, None] > good[None, :]) + 0.5 * (anomalous[:, None] == good[None, :])


def auroc_gap_interval(scores: dict[tuple[str, int], list[dict]], kind: str, resamples: int = 2000,
                       seed: int = 0) -> tuple[float, float] | None:
    """95 % paired-bootstrap interval of default's image AUROC minus paper's, seeds averaged.

    Both presets score the same test images, so the good and the ``kind`` images are resampled together
    for every run. It covers the test set's sampling noise (at 60 images a type AUROC moves by about
    0.02), not the seeds' spread, which the per-seed rows show.
    """
    seeds = sorted({s for p, s in scores if p == "default"} & {s for p, s in scores if p == "paper"})
    if not seeds:
        return None
    first = scores[("default", seeds[0])]
    good = [x["image"] for x in first if x["type"] == GOOD]
    anomalous = [x["image"] for x in first if type_key(x["type"]) == kind]
    if not good or not anomalous:
        return None
    gap = np.zeros((len(anomalous), len(good)))
    for s in seeds:
        for preset, sign in (("default", 1.0), ("paper", -1.0)):
            by_name = {x["image"]: x["score"] for x in scores[(preset, s)]}
            gap += sign * _pair_matrix(np.array([by_name[n] for n in good]), np.array([by_name[n] for n in anomalous]))
    gap /= len(seeds)
    rng = np.random.default_rng(seed)
    # a resample is a count per image; the resampled AUROC gap is a weighted mean of the pair matrix
    count_a = rng.multinomial(len(anomalous), np.full(len(anomalous), 1 / len(anomalous)), size=resamples)
    count_g = rng.multinomial(len(good), np.full(len(good), 1 / len(good)), size=resamples)
    gaps = ((count_a @ gap) * count_g).sum(axis=1) / (len(anomalous) * len(good))
    low, high = np.percentile(gaps, [2.5, 97.5])
    return round(float(low), 4), round(float(high), 4)


def compare_presets(spec: PresetComparison) -> dict[str, Any]:
    """Train (or reuse) and evaluate every preset for every seed; write comparison.json and the ROC figure."""
    check_paper_weights(spec)
    eval_data = spec.eval_data or spec.data
    data_hash = LocoCategory(spec.data, spec.category).data_hash()  # reads every training image: once
    rows, scores = [], {}
    for seed in spec.seeds:  # preset pairs seed by seed, so a stopped comparison leaves paired runs
        for preset in COMPARED_PRESETS:
            run_dir = spec.run_dir(preset, seed)
            ckpt, how = ensure_trained(spec.train_config(preset, seed), spec.data, data_hash, run_dir)
            metrics, scores[(preset, seed)] = _evaluate(ckpt, eval_data, spec.category, run_dir / "eval", spec.device)
            rows.append(_run_row(preset, seed, run_dir, how, metrics))
    summary = summarise(rows)
    if "default_vs_paper" in summary:
        intervals = {kind: auroc_gap_interval(scores, kind) for kind in ANOMALY_TYPES}
        summary["default_vs_paper"]["image_auroc_gap_ci95"] = intervals
        summary["default_vs_paper"]["worse_beyond_test_noise"] = {
            kind: ci is not None and ci[1] < 0 for kind, ci in intervals.items()}
    report = {"benchmark": "presets", "category": spec.category, "data": str(spec.data), "eval_data": str(eval_data),
              "image_size": list(spec.image_size), "steps": spec.steps, "pretrain_steps": spec.pretrain_steps,
              "runs": rows, **summary}
    curves = [(f"{preset}, seed {seed}", preset, [x["score"] for x in images], [x["type"] for x in images])
              for (preset, seed), images in scores.items()]
    report["roc_figure"] = str(plot_roc_comparison(curves, spec.out / "roc_presets.png"))
    (spec.out / "comparison.json").write_text(json.dumps(report, indent=2) + "\n")
    return report
