"""`python -m slsg_bench.border_reach --checkpoint RUN/checkpoint.pt --data ROOT [--category C]`: how often
each side of the image border lights up in a checkpoint's maps, per test folder.

For every test image it takes the outer strip of each side (1/16 of the image's height or width) and
counts the images where a map there reaches the calibrated threshold: the patch memory's map alone
and the fused map the gateway thresholds. A map that answers a defect more strongly on one side of it
(docs/backbone-padding.md) shows as counts on that side only; a defect that itself touches the border
counts on its own side. Also prints each side's mean (over images) of the patch memory's largest
log-odds in the strip. Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import torch

SIDES = ("top", "bottom", "left", "right")


def strips(height: int, width: int) -> dict[str, tuple[slice, slice]]:
    """Each side's outer strip, 1/16 of the side across."""
    b, c = max(1, height // 16), max(1, width // 16)
    return {"top": (slice(0, b), slice(None)), "bottom": (slice(height - b, height), slice(None)),
            "left": (slice(None), slice(0, c)), "right": (slice(None), slice(width - c, width))}


@torch.no_grad()
def border_maxima(model, images: list[np.ndarray], size: tuple[int, int]) -> dict[str, dict[str, np.ndarray]]:
    """Per map ("patch_memory", "fused") and side: each image's largest log-odds in that side's strip."""
    from slsg_train.data.images import to_tensor

    sides = strips(*size)
    out: dict[str, dict[str, list]] = {m: {s: [] for s in SIDES} for m in ("patch_memory", "fused")}
    for start in range(0, len(images), 8):
        x = torch.stack([to_tensor(im) for im in images[start:start + 8]])
        result = model(x)
        maps = {"fused": model.anomaly_log_odds(result)[:, 0]}
        if "patch_memory" in (result.checks or {}):
            maps["patch_memory"] = model.patch_memory.log_odds(result.checks["patch_memory"], size)[:, 0]
        for name, log_odds in maps.items():
            for side, (ys, xs) in sides.items():
                out[name][side].append(log_odds[:, ys, xs].amax(dim=(1, 2)).numpy())
    return {m: {s: np.concatenate(v) for s, v in per.items() if v} for m, per in out.items() if per["top"]}


def main(checkpoint: str, data: str, category: str | None) -> dict:
    from slsg_train.data.images import load_resized
    from slsg_train.inference import load_model

    torch.set_num_threads(1)
    loaded = load_model(checkpoint)
    if loaded.calibration is None:
        raise SystemExit(f"{checkpoint} has no calibration: run `slsg calibrate` first")
    p = loaded.calibration.raw_threshold
    threshold = math.log(p) - math.log1p(-p)
    test = Path(data) / (category or loaded.category) / "test"
    report: dict = {"checkpoint": checkpoint, "threshold_log_odds": round(threshold, 3), "folders": {}}
    for folder in sorted(f for f in test.iterdir() if f.is_dir()):
        paths = sorted(folder.glob("*.png"))
        maxima = border_maxima(loaded.model, load_resized(paths, loaded.image_size, loaded.resize), loaded.image_size)
        report["folders"][folder.name] = {"images": len(paths)} | {
            name: {side: {"reach": int((v > threshold).sum()), "mean_max": round(float(v.mean()), 2)}
                   for side, v in per.items()} for name, per in maxima.items()}
    return report


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--category", default=None)
    args = parser.parse_args()
    print(json.dumps(main(args.checkpoint, args.data, args.category), indent=1))
