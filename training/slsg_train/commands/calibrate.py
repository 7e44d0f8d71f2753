"""`slsg calibrate`: re-choose a checkpoint's image-score threshold for a target false-positive rate."""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="RUN_DIR/checkpoint.pt")
    p.add_argument("--data", default=None, help="data set root (default: the one the run was trained on)")
    p.add_argument("--fpr", type=float, default=0.01, help="target false-positive rate on normal images (default 0.01)")
    p.add_argument("--device", default="cpu")


def run(args: argparse.Namespace) -> int:
    import dataclasses
    import sys

    from slsg_train.checkpoint import CheckpointError, save_checkpoint
    from slsg_train.data.loco import DataSetError, LocoCategory
    from slsg_train.inference import load_model
    from slsg_train.training.calibration import calibrate_threshold, split_for_calibration
    from slsg_train.training.dataset import load_resized

    try:
        loaded = load_model(args.checkpoint, args.device)
        payload = loaded.payload
        category = LocoCategory(args.data or payload["data_root"], payload["category"])
        _, paths = split_for_calibration(category)
        cal, stats = calibrate_threshold(loaded.model, load_resized(paths, loaded.image_size), loaded.top_k,
                                         args.fpr, args.device)
    except (CheckpointError, DataSetError, ValueError) as exc:
        print(f"slsg calibrate: {exc}", file=sys.stderr)
        return 2
    payload["calibration"], payload["calibration_stats"] = dataclasses.asdict(cal), stats
    path = payload.pop("path")
    save_checkpoint(path, {k: v for k, v in payload.items() if k != "format"})
    print(f"raw threshold {cal.raw_threshold:.5f} for FPR {args.fpr:.2%} on {stats['num_images']} normal images "
          f"(scores {stats['min']:.4f}..{stats['max']:.4f}); saved to {path}")
    return 0
