"""`slsg train`: generative pre-training, SLSG training and calibration for one category."""

from __future__ import annotations

import argparse

_DEFAULTS = {"steps": 3500, "pretrain_steps": 1000, "batch_size": 4, "lr": 0.04, "workers": 2,
             "checkpoint_every": 250, "log_every": 10, "device": "auto", "seed": 0}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, help="data set root (MVTec LOCO AD layout)")
    p.add_argument("--category", required=True, help="category folder under --data")
    p.add_argument("--out", required=True, help="run directory (checkpoint.pt, train_log.jsonl)")
    p.add_argument("--preset", default="default", help="'default' (EfficientNet-Lite0) or 'paper' (ResNet-18)")
    p.add_argument("--backbone", default=None, help="override the preset's backbone (efficientnet_lite0, resnet18)")
    p.add_argument("--backbone-weights", default="imagenet",
                   help="'imagenet' (bundled / official weights), a .pth path, or 'none' for random init")
    p.add_argument("--allow-download", action="store_true",
                   help="let --backbone-weights imagenet fetch the official resnet18 file when online")
    p.add_argument("--image-size", default="256", help="model input, '256' or 'WxH'; multiples of 32")
    p.add_argument("--steps", type=int, help=f"detector training steps (default {_DEFAULTS['steps']})")
    p.add_argument("--pretrain-steps", type=int, help=f"generative pre-training steps, 0 to skip (default {_DEFAULTS['pretrain_steps']})")
    p.add_argument("--batch-size", type=int, help="normal images per step; as many simulated ones are added (default 4)")
    p.add_argument("--lr", type=float, help="SGD learning rate (default 0.04)")
    p.add_argument("--device", help="auto, cpu, cuda, cuda:N (default auto)")
    p.add_argument("--seed", type=int, help="random seed (default 0)")
    p.add_argument("--workers", type=int, help="DataLoader worker processes for the simulation (default 2)")
    p.add_argument("--anomaly-source", default=None, help="DTD texture folder for structural simulation (default: built-in textures)")
    p.add_argument("--checkpoint-every", type=int, help="steps between checkpoints (default 250)")
    p.add_argument("--log-every", type=int, help="steps between log lines (default 10)")
    p.add_argument("--calibration-fpr", type=float, default=0.01, help="target false-positive rate of the threshold")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    p.add_argument("--until-step", type=int, default=None,
                   help="stop after this step of the current stage (checkpoint saved; continue later with --resume)")


def _value(args: argparse.Namespace, name: str):
    value = getattr(args, name)
    return _DEFAULTS[name] if value is None else value


def run(args: argparse.Namespace) -> int:
    import dataclasses
    import sys

    from slsg_train.checkpoint import CheckpointError
    from slsg_train.data.loco import DataSetError
    from slsg_train.models import BackboneWeightsError
    from slsg_train.training.config import PretrainConfig, TrainConfig, parse_image_size
    from slsg_train.training.trainer import TrainingRun

    try:
        weights = None if args.backbone_weights in ("none", "None", "") else args.backbone_weights
        cfg = TrainConfig(
            category=args.category, preset=args.preset, backbone=args.backbone, backbone_weights=weights,
            allow_download=args.allow_download,
            image_size=parse_image_size(args.image_size), steps=_value(args, "steps"),
            batch_size=_value(args, "batch_size"), seed=_value(args, "seed"), workers=_value(args, "workers"),
            device=_value(args, "device"), checkpoint_every=_value(args, "checkpoint_every"),
            log_every=_value(args, "log_every"), anomaly_source=args.anomaly_source,
            calibration_fpr=args.calibration_fpr,
            pretrain=PretrainConfig(steps=_value(args, "pretrain_steps")),
        )
        cfg.optim = dataclasses.replace(cfg.optim, lr=_value(args, "lr"))
        # on --resume, only the options given explicitly change the stored configuration
        overrides = {k: getattr(args, k) for k in ("steps", "workers", "device", "checkpoint_every", "log_every")
                     if getattr(args, k) is not None}
        run_ = TrainingRun(cfg, args.data, args.out, resume=args.resume, until_step=args.until_step, overrides=overrides)
        path = run_.run()
    except (DataSetError, CheckpointError, BackboneWeightsError, ValueError, FileNotFoundError) as exc:
        print(f"slsg train: {exc}", file=sys.stderr)
        return 2
    print(f"checkpoint: {path}")
    return 0
