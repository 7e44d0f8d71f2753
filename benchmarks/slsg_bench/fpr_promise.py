"""The false-alarm promise over categories and seeds: for each (category, seed) a fresh synthetic data
set, a short training run with the calibration it ends with, and an evaluation that counts the good
test images flagged beside the promised rate. Prints one Markdown row per run and a summary line.

Small, fast runs on purpose: the point is the calibration's statistics, not the AUROC. Each run is an
ordinary run directory under ``--out``; a finished one (its metrics.json) is reused.

    python -m slsg_bench.fpr_promise --out runs/fpr_bench --categories tray,cable --seeds 0,1,2,3,4
    python -m slsg_bench.fpr_promise --out runs/fpr_bench --real /work/data/bottle   # an MVTec AD category
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

SLSG = [sys.executable, "-m", "slsg.cli"]


def run(args: list[str], log: Path) -> None:
    """Run an slsg command, its output to ``log``; stop with the log's tail on failure."""
    with log.open("a") as fh:
        proc = subprocess.run(SLSG + args, stdout=fh, stderr=subprocess.STDOUT)
    if proc.returncode:
        sys.exit(f"failed ({proc.returncode}): slsg {' '.join(args)}\n{log.read_text()[-2000:]}")


def bench_run(out: Path, data: Path, category: str, seed: int, settings: argparse.Namespace,
              synthesise: bool) -> dict:
    """One (category, seed): data (if synthetic), training, evaluation; the evaluation's false_alarms."""
    run_dir = out / f"{category}_s{seed}"
    metrics = run_dir / "eval" / "metrics.json"
    if not metrics.is_file():
        run_dir.mkdir(parents=True, exist_ok=True)
        log = run_dir / "bench.log"
        if synthesise and not (data / category).is_dir():
            run(["synth", str(data), "--categories", category, "--image-size", str(settings.image_size),
                 "--train", str(settings.train), "--validation", str(settings.validation),
                 "--test-good", str(settings.test_good), "--test-logical", "5", "--test-structural", "5",
                 "--seed", str(seed)], log)
        extra = ["--global-branch"] if category in settings.global_branch else []
        run(["train", "--data", str(data), "--category", category, "--out", str(run_dir),
             "--image-size", str(settings.image_size), "--steps", str(settings.steps), "--pretrain-steps", "0",
             "--composition-steps", str(settings.composition_steps), "--workers", "1", "--seed", str(seed), *extra],
            log)
        run(["evaluate", "--checkpoint", str(run_dir / "checkpoint.pt"), "--data", str(data),
             "--out", str(run_dir / "eval")], log)
    return json.loads(metrics.read_text())["false_alarms"]


HEADER = ("| category | seed | threshold + scale images | promised | promised 90 % bound | flagged good | "
          "within bound | at most (9 evaluations in 10) | within it | p (this many or more) |\n"
          "|---|---|---|---|---|---|---|---|---|---|")


def with_predictive_bound(fa: dict) -> dict:
    """``fa`` with the predictive bound on the count (``flagged_upper_90``) where an evaluation from
    before it was reported lacks it: computed from the counts it has."""
    if "flagged_upper_90" in fa or not fa.get("threshold_images"):
        return fa
    from slsg.contract import calibration_exceedances
    from slsg_train.metrics.false_alarms import flagged_upper

    n = fa["threshold_images"]
    k = calibration_exceedances(fa.get("target_fpr", 0.01), n)
    upper = flagged_upper(fa["good_images"], k + 1, n - k, 0.9)
    return {**fa, "flagged_upper_90": upper, "within_flagged_upper_90": fa["flagged"] <= upper}


def row(name: str, seed: int, fa: dict) -> str:
    """One Markdown row of :data:`HEADER` for a run's false_alarms report."""
    pct = lambda v: f"{100 * v:.1f} %"  # noqa: E731
    fa = with_predictive_bound(fa)
    return (f"| {name} | {seed} | {fa['threshold_images']} + {fa['scale_images']} | {pct(fa['expected_fpr'])} | "
            f"{pct(fa['fpr_upper_90'])} | {fa['flagged']} / {fa['good_images']} ({pct(fa['observed_fpr'])}) | "
            f"{'yes' if fa['within_upper_90'] else 'no'} | {fa['flagged_upper_90']} / {fa['good_images']} | "
            f"{'yes' if fa['within_flagged_upper_90'] else 'no'} | {fa['p_value_more']:.2f} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--categories", default="tray,cable", help="synthetic categories")
    p.add_argument("--seeds", default="0,1,2,3,4")
    p.add_argument("--real", type=Path, action="append", default=[],
                   help="a real category folder (DATA_ROOT/CATEGORY), trained and evaluated once per seed")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--train", type=int, default=150)
    p.add_argument("--validation", type=int, default=20)
    p.add_argument("--test-good", type=int, default=200)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--composition-steps", type=int, default=100)
    p.add_argument("--global-branch", default="cable", help="categories trained with --global-branch")
    args = p.parse_args()
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    categories = [c for c in args.categories.split(",") if c.strip()]
    args.global_branch = set(args.global_branch.split(","))
    print(HEADER, flush=True)
    results = []
    for category in categories:
        for seed in seeds:
            fa = bench_run(args.out, args.out / f"data_s{seed}", category, seed, args, synthesise=True)
            results.append(fa)
            print(row(category, seed, fa), flush=True)
    for folder in args.real:
        for seed in seeds:
            fa = bench_run(args.out / folder.name, folder.parent, folder.name, seed, args, synthesise=False)
            results.append(fa)
            print(row(folder.name, seed, fa), flush=True)
    results = [with_predictive_bound(fa) for fa in results]
    within = sum(fa["within_upper_90"] for fa in results)
    within_count = sum(fa["within_flagged_upper_90"] for fa in results)
    beyond = sum(fa["beyond_chance"] for fa in results)
    flagged, good = sum(fa["flagged"] for fa in results), sum(fa["good_images"] for fa in results)
    expected = sum(fa["expected_fpr"] * fa["good_images"] for fa in results) / max(good, 1)
    print(f"\n{within} of {len(results)} runs within the promised 90 % bound on the rate, {within_count} within the "
          f"predictive bound on the count; {beyond} beyond chance (p < 0.05); "
          f"pooled: {flagged} of {good} good images flagged ({100 * flagged / max(good, 1):.2f} %), "
          f"promised {100 * expected:.2f} % on average")


if __name__ == "__main__":
    main()
