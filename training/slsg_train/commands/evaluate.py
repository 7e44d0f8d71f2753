"""`slsg evaluate`: LOCO metrics (image AUROC, AU-sPRO, pixel AUROC), report and figures for a checkpoint, or
for an exported model file run by ONNX Runtime (``--onnx``, or a repository version): the quality of what
is served, INT8 included."""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", default=None,
                   help="RUN_DIR/checkpoint.pt; with --all-categories a folder holding <category>/checkpoint.pt")
    p.add_argument("--onnx", default=None, metavar="PATH",
                   help="evaluate this exported model.onnx through ONNX Runtime instead of a checkpoint")
    p.add_argument("--model-repository", default=None, metavar="ROOT",
                   help="with --name and --version: evaluate that repository version through ONNX Runtime")
    p.add_argument("--name", default=None, help="model name in --model-repository")
    p.add_argument("--version", type=int, default=None, help="version in --model-repository (default: newest)")
    p.add_argument("--data", required=True, help="data set root (MVTec LOCO AD layout)")
    p.add_argument("--category", default=None, help="category to evaluate (default: the checkpoint's)")
    p.add_argument("--out", required=True, help="output folder (metrics.json, report.md, figures)")
    p.add_argument("--maps-dir", default=None, help="also write float32 TIFF maps in the official layout here")
    p.add_argument("--all-categories", action="store_true",
                   help="evaluate every category folder under --data that has CHECKPOINT/<category>/checkpoint.pt; "
                        "writes OUT/summary.md and the seed's table (OUT/seed_table.md, .json) with the published "
                        "numbers beside ours for MVTec LOCO AD's categories")
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch-size", type=int, default=8)


def _warn_about_ground_truth(metrics: dict) -> None:
    """Name on stderr each anomalous image the region metrics left out, or say that there were none to compute."""
    import sys

    truth = metrics.get("ground_truth") or {}
    if metrics["pixel_auroc"] is None:
        print(f"slsg evaluate: {metrics['category']}: pixel AUROC and AU-sPRO {truth.get('region_metrics')}; "
              "image metrics computed from the test folders' labels", file=sys.stderr)
        return
    for name, reason in (truth.get("left_out") or {}).items():
        print(f"slsg evaluate: warning: {metrics['category']}: {name} left out of the region metrics: {reason}",
              file=sys.stderr)


def _onnx_path(args: argparse.Namespace):
    """The model file given by --onnx or --model-repository/--name/--version; None for a checkpoint."""
    from pathlib import Path

    from slsg.contract import list_versions, model_path

    sources = [s for s in (args.checkpoint, args.onnx, args.model_repository) if s]
    if len(sources) != 1:
        raise ValueError("give exactly one of --checkpoint, --onnx, --model-repository (with --name)")
    if args.onnx:
        return Path(args.onnx)
    if args.model_repository is None:
        return None
    if args.all_categories or not args.name:
        raise ValueError("--model-repository needs --name (and evaluates one category)")
    versions = list_versions(args.model_repository, args.name)
    version = args.version if args.version is not None else (versions[-1] if versions else None)
    if version not in versions:
        raise FileNotFoundError(f"no version {version} of model {args.name!r} under {args.model_repository} "
                                f"(has {versions})")
    return model_path(args.model_repository, args.name, version)


def run(args: argparse.Namespace) -> int:
    import sys
    from pathlib import Path

    from slsg_train.checkpoint import CheckpointError
    from slsg_train.data.loco import DataSetError, LocoCategory, list_categories
    from slsg_train.evaluation.report import render_summary_table
    from slsg_train.evaluation.runner import evaluate_category
    from slsg_train.inference import load_model
    from slsg_train.onnx_inference import OnnxModelError, load_onnx_model

    try:
        onnx_path = _onnx_path(args)
        if onnx_path is not None and args.all_categories:
            raise ValueError("--all-categories takes --checkpoint (a folder of checkpoints)")
        if onnx_path is not None:
            jobs = [(onnx_path, args.category, Path(args.out))]
        elif args.all_categories:
            jobs = [(Path(args.checkpoint) / c / "checkpoint.pt", c, Path(args.out) / c) for c in list_categories(args.data)]
            jobs = [j for j in jobs if j[0].is_file()]
            if not jobs:
                raise CheckpointError(f"no <category>/checkpoint.pt under {args.checkpoint} for the categories in {args.data}")
        else:
            jobs = [(Path(args.checkpoint), args.category, Path(args.out))]
        results = []
        for ckpt, category, out in jobs:
            loaded = load_onnx_model(ckpt) if onnx_path is not None else load_model(ckpt, args.device)
            result = evaluate_category(loaded, LocoCategory(args.data, category or loaded.category), out,
                                       args.maps_dir, args.device, args.batch_size)
            results.append(result.metrics)
            _warn_about_ground_truth(result.metrics)
            print((out / "report.md").read_text().split("\n## Figures")[0])
            print(f"\nwritten to {out} in {result.metrics['evaluation_seconds']:.1f} s")
    except (CheckpointError, DataSetError, OnnxModelError, ValueError, FileNotFoundError) as exc:
        print(f"slsg evaluate: {exc}", file=sys.stderr)
        return 2
    if args.all_categories:
        table = render_summary_table(results)
        Path(args.out, "summary.md").write_text(table + "\n")
        print(table)
        print(_write_seed_table(results, Path(args.out)))
    return 0


def _write_seed_table(results: list[dict], out) -> str:
    """OUT/seed_table.md and .json: the seed's layout of the image AUROCs; returns the markdown."""
    import json

    from slsg_train.evaluation.seed_table import render_seed_table, seed_table

    table = seed_table(results)
    text = render_seed_table(table)
    (out / "seed_table.md").write_text(text)
    (out / "seed_table.json").write_text(json.dumps(table, indent=2) + "\n")
    return text
