"""`slsg info`: a checkpoint's configuration, size and cost."""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="RUN_DIR/checkpoint.pt")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")


def run(args: argparse.Namespace) -> int:
    import dataclasses
    import json

    from slsg_train.inference import load_model
    from slsg_train.models import count_flops, count_parameters
    from slsg_train.models.slsg import CHECKS

    loaded = load_model(args.checkpoint)
    ckpt = loaded.checkpoint
    h, w = loaded.image_size
    info = {
        "checkpoint": str(ckpt.path), "category": loaded.category, "stage": ckpt.stage,
        "step": ckpt.step, "backbone": ckpt.backbone, "image_size": [h, w],
        "top_k": loaded.top_k, **{name: getattr(loaded.model, name) is not None for name in CHECKS},
        "parameters": count_parameters(loaded.model),
        "gflop_per_image": round(count_flops(loaded.model, h, w), 3),
        "fused_parts": fused_parts(loaded.model),
        "fusion_left_out": ckpt.fusion.get("left_out", {}),
        "calibration": dataclasses.asdict(ckpt.calibration) if ckpt.calibration else None, "data_hash": ckpt.data_hash,
    }
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        for key, value in info.items():
            print(f"{key:>17}: {value}")
    return 0


def fused_parts(model) -> list[str]:
    """The parts whose scores the fused score takes the maximum of ("slsg_map": SLSG's own map)."""
    from slsg_train.training.fusion import SLSG_MAP

    return [SLSG_MAP] * bool(model.config.fuse_slsg_map) + [c.name for c in model.checks if bool(c.fitted)]
