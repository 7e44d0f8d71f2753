"""`python -m slsg_bench.closed_form_checks DATA/CATEGORY on|off`: the closed-form reference checks of a
default-preset model on one LOCO-layout category, without training SLSG.

Fits the patch memory (and with ``on`` the component check) on train/good, scales them on
validation/good, and prints as JSON the image AUROC (logical / structural) of each check alone and of
their fusion as the model fuses them (pixelwise max of the log-odds maps, top-K mean). SLSG's own map
and the composition check are left out: they need training.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from slsg_train.models import SLSG, preset, top_k_for_size
from slsg_train.models.slsg import image_score_log_odds
from slsg_train.training.calibration import fit_checks
from slsg_train.training.dataset import to_tensor


def load(folder: Path) -> list[np.ndarray]:
    return [np.asarray(Image.open(p).convert("RGB")) for p in sorted(folder.glob("*.png"))]


def auroc(negatives: np.ndarray, positives: np.ndarray) -> float:
    above = positives[:, None] > negatives[None]
    return float((above + 0.5 * (positives[:, None] == negatives[None])).mean())


@torch.no_grad()
def image_log_odds(model: SLSG, images: list[np.ndarray], size: tuple[int, int], k: int) -> dict[str, np.ndarray]:
    """Per check and fused: the image score's log-odds of every image."""
    out: dict[str, list] = {check.name: [] for check in model.checks} | {"fused": []}
    for i in range(0, len(images), 16):
        x = torch.stack([to_tensor(im) for im in images[i:i + 16]])
        maps = model.reference_encoder(x)
        per_check = []
        for check in model.checks:
            log_odds = check.log_odds(check(x, maps), size)
            per_check.append(log_odds)
            out[check.name].append(image_score_log_odds(log_odds, k))
        out["fused"].append(image_score_log_odds(torch.stack(per_check).amax(0), k))
    return {name: torch.cat(values).numpy() for name, values in out.items()}


def main(root: Path, component: bool) -> dict:
    torch.manual_seed(0)
    train, calib = load(root / "train/good"), load(root / "validation/good")
    model = SLSG(preset("default", composition_check=False, component_check=component))
    size = train[0].shape[:2]
    k = top_k_for_size(*size)
    start = time.time()
    report = fit_checks(model, train, calib, top_k=k, progress=False)
    fit_s = time.time() - start
    model.eval()
    good = image_log_odds(model, load(root / "test/good"), size, k)
    logical = image_log_odds(model, load(root / "test/logical_anomalies"), size, k)
    structural = image_log_odds(model, load(root / "test/structural_anomalies"), size, k)
    result = {name: {"logical": round(auroc(good[name], logical[name]), 3),
                     "structural": round(auroc(good[name], structural[name]), 3)} for name in good}
    return {"data": str(root), "component_check": component, "fit_s": round(fit_s), "auroc": result,
            "component_report": report.get("component_check")}


if __name__ == "__main__":
    print(json.dumps(main(Path(sys.argv[1]), sys.argv[2] == "on")))
