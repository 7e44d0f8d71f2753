"""`slsg score`: raw and calibrated score of image files with a checkpoint, no server (the seed's
``run_inference.py`` for scripts). Each image is resized the way the model expects (the checkpoint's
filter, aspect ratio ignored); the raw score is SLSG's mean of the top-K anomaly probabilities."""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="RUN_DIR/checkpoint.pt (trained or imported)")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files (PNG, JPEG, ...)")
    p.add_argument("--json", action="store_true", help="print one JSON list instead of a table")
    p.add_argument("--heatmap", default=None, metavar="DIR",
                   help="also write DIR/<image stem>.png: the anomaly map at the image's size (the calibrated map "
                        "where the checkpoint is calibrated, else the probability; blue 0 .. red 1)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch-size", type=int, default=8)


def run(args: argparse.Namespace) -> int:
    import json
    import sys

    from slsg_train.checkpoint import CheckpointError
    from slsg_train.data.loco import load_rgb

    try:
        from slsg_train.inference import load_model

        loaded = load_model(args.checkpoint, args.device)
        originals = [load_rgb(path) for path in args.images]
    except (CheckpointError, FileNotFoundError, ValueError, OSError) as exc:
        print(f"slsg score: {exc}", file=sys.stderr)
        return 2
    rows = score_images(loaded, originals, args.images, args.device, args.batch_size, args.heatmap)
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        for row in rows:
            calibrated = "uncalibrated" if row["score"] is None else f"score {row['score']:.4f} ({row['verdict']})"
            print(f"{row['image']}\traw {row['raw_score']:.7f}\t{calibrated}")
    return 0


def score_images(loaded, originals, names, device: str, batch_size: int, heatmap_dir: str | None) -> list[dict]:
    """One row per image: raw score, calibrated score and verdict (None without a calibration), heat map path."""
    from pathlib import Path

    from slsg.contract import DECISION_THRESHOLD
    from slsg_train.inference import predict
    from slsg_train.data.images import resize_rgb

    frames = [resize_rgb(image, loaded.image_size, loaded.resize) for image in originals]
    pred = predict(loaded.model, frames, loaded.top_k, device, batch_size)
    cal = loaded.calibration
    rows = []
    for i, name in enumerate(names):
        score = None if cal is None else float(cal.calibrated_score(pred.log_odds[i]))
        row = {"image": str(name), "raw_score": float(pred.scores[i]), "score": score,
               "verdict": None if score is None else ("anomalous" if score >= DECISION_THRESHOLD else "good")}
        if heatmap_dir:
            heat = pred.maps[i] if cal is None else cal.calibrated_score(pred.map_log_odds[i])
            row["heatmap"] = str(write_heatmap(Path(heatmap_dir) / f"{Path(name).stem}.png", heat,
                                               originals[i].shape[:2]))
        rows.append(row)
    return rows


def write_heatmap(path, values, size: tuple[int, int]):
    """PNG of a [0, 1] map resized (bilinear) to ``size`` = (height, width), coloured blue -> cyan -> yellow -> red."""
    import numpy as np
    from PIL import Image

    h, w = size
    resized = np.asarray(Image.fromarray(np.clip(values, 0, 1).astype(np.float32), mode="F").resize((w, h),
                                                                                                     Image.BILINEAR))
    x = resized[..., None]
    rgb = np.clip(1.5 - np.abs(4 * x - np.array([3.0, 2.0, 1.0])), 0, 1)  # red, green, blue ramps
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((rgb * 255).astype(np.uint8), mode="RGB").save(path)
    return path
