"""`slsg train`: generative pre-training, SLSG training and calibration for one category."""

from __future__ import annotations

import argparse

def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, help="data set root (MVTec LOCO AD layout)")
    p.add_argument("--category", required=True, help="category folder under --data")
    p.add_argument("--out", required=True, help="run directory (checkpoint.pt, train_log.jsonl)")
    p.add_argument("--config", default=None,
                   help="JSON or YAML file of training settings (TrainConfig fields, nested: simulation, optim, "
                        "loss, pretrain, model); flags given on the command line win")
    p.add_argument("--preset", default=None, help="'default' (EfficientNet-Lite0) or 'paper' (ResNet-18)")
    p.add_argument("--backbone", default=None, help="override the preset's backbone (efficientnet_lite0, resnet18)")
    p.add_argument("--backbone-weights", default=None,
                   help="'imagenet' (bundled / official weights), a .pth path, or 'none' for random init")
    p.add_argument("--allow-download", action="store_true",
                   help="let --backbone-weights imagenet fetch the official resnet18 file when online")
    p.add_argument("--global-branch", action="store_true",
                   help="add the global check (pooled-feature distance to the normal images; not in the paper) "
                        "for products whose rules span the whole image")
    p.add_argument("--patch-memory", choices=("on", "off"), default=None,
                   help="the patch-memory check (each patch's distance to the normal patches, fused into the map; "
                        "not in the paper). Default: the preset's (on in 'default', off in 'paper')")
    p.add_argument("--composition-check", choices=("on", "off"), default=None,
                   help="the composition check (an autoencoder of the whole image's features, trained after "
                        "SLSG, for rules that join parts; not in the paper). Default: the preset's")
    p.add_argument("--component-check", choices=("on", "off"), default=None,
                   help="the component check (parts segmented, counted and measured against the normal images'; "
                        "closed form, fitted after SLSG)")
    p.add_argument("--composition-steps", type=int,
                   help="the composition check's autoencoder training steps (default 8000: about 4 min on 2 cores)")
    p.add_argument("--composition-restoration", type=float,
                   help="the share of the composition check's training batches that are simulated logical anomalies "
                        "it learns to undo (default 0.5; 0: normal images only, as EfficientAD)")
    p.add_argument("--image-size", default=None, help="model input, '256' or 'WxH'; multiples of 32 (default 256)")
    p.add_argument("--steps", type=int, help="detector training steps (default 3500)")
    p.add_argument("--pretrain-steps", type=int, help="generative pre-training steps, 0 to skip (default 1000)")
    p.add_argument("--batch-size", type=int, help="normal images per step; as many simulated ones are added (default 4)")
    p.add_argument("--lr", type=float, help="SGD learning rate (default 0.04)")
    p.add_argument("--device", help="auto, cpu, cuda, cuda:N (default auto)")
    from slsg_train.training.config import PRECISIONS

    p.add_argument("--precision", choices=PRECISIONS,
                   help="training's forward passes: bf16 autocast (weights stay float32) or fp32; default auto: "
                        "bf16 where the device has it natively (CUDA from Ampere on, CPUs with AVX512-BF16 or AMX)")
    p.add_argument("--seed", type=int, help="random seed (default 0)")
    p.add_argument("--workers", type=int, help="DataLoader worker processes for the simulation (default 2)")
    p.add_argument("--anomaly-source", default=None, help="DTD texture folder for structural simulation (default: built-in textures)")
    p.add_argument("--checkpoint-every", type=int, help="steps between checkpoints (default 250)")
    p.add_argument("--log-every", type=int, help="steps between log lines (default 10)")
    p.add_argument("--calibration-fpr", type=float, help="target false-positive rate of the threshold (default 0.01)")
    p.add_argument("--calibration-holdout", type=float,
                   help="at most this share of train/good is held out of training for calibration when "
                        "validation/good is short of the images the target rate needs (default 0.2)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    p.add_argument("--until-step", type=int, default=None,
                   help="stop after this step of the current stage (checkpoint saved; continue later with --resume)")


def _flag_settings(args: argparse.Namespace) -> dict:
    """The settings given as flags (None = not given), in TrainConfig's nested form."""
    from slsg_train.training.config import parse_image_size

    flat = {name: getattr(args, name) for name in (
        "preset", "backbone", "steps", "batch_size", "seed", "workers", "device", "precision", "checkpoint_every",
        "log_every", "anomaly_source", "calibration_fpr", "calibration_holdout")}
    settings = {k: v for k, v in flat.items() if v is not None}
    if args.allow_download:
        settings["allow_download"] = True
    if args.backbone_weights is not None:
        settings["backbone_weights"] = None if args.backbone_weights in ("none", "None", "") else args.backbone_weights
    if args.image_size is not None:
        settings["image_size"] = parse_image_size(args.image_size)
    if args.pretrain_steps is not None:
        settings["pretrain"] = {"steps": args.pretrain_steps}
    if args.lr is not None:
        settings["optim"] = {"lr": args.lr}
    model = {}
    if args.global_branch:
        model["global_branch"] = True
    if args.patch_memory is not None:
        model["patch_memory"] = args.patch_memory == "on"
    if args.composition_check is not None:
        model["composition_check"] = args.composition_check == "on"
    if args.component_check is not None:
        model["component_check"] = args.component_check == "on"
    if args.composition_steps is not None:
        model["composition_steps"] = args.composition_steps
    if args.composition_restoration is not None:
        model["composition_restoration"] = args.composition_restoration
    if model:
        settings["model"] = model
    return settings


def load_settings_file(path: str) -> dict:
    """A JSON or YAML mapping of training settings; errors name the file and the problem."""
    import json
    from pathlib import Path

    text = Path(path).read_text()
    try:
        if path.endswith((".yaml", ".yml")):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as exc:  # noqa: BLE001 - any parse failure is the file's fault
        raise ValueError(f"--config {path}: cannot parse: {exc}") from exc
    if not isinstance(data, dict):
        raise ValueError(f"--config {path}: expected a mapping of settings, got {type(data).__name__}")
    return data


def merge_settings(base: dict, overrides: dict) -> dict:
    """``base`` updated by ``overrides``, nested mappings merged key by key."""
    out = dict(base)
    for key, value in overrides.items():
        out[key] = merge_settings(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def run(args: argparse.Namespace) -> int:
    import sys

    from slsg_train.checkpoint import CheckpointError
    from slsg_train.data.loco import DataSetError
    from slsg_train.models import BackboneWeightsError
    from slsg_train.training.config import TrainConfig
    from slsg_train.training.trainer import TrainingRun

    try:
        settings = TrainConfig().to_dict()
        if args.config:
            settings = merge_settings(settings, load_settings_file(args.config))
        settings = merge_settings(settings, _flag_settings(args))
        settings["category"] = args.category
        cfg = TrainConfig.from_dict(settings)
        # on --resume, only the options given explicitly change the stored configuration
        overrides = {k: getattr(args, k) for k in ("steps", "workers", "device", "precision", "checkpoint_every", "log_every")
                     if getattr(args, k) is not None}
        run_ = TrainingRun(cfg, args.data, args.out, resume=args.resume, until_step=args.until_step, overrides=overrides)
        path = run_.run()
    except (DataSetError, CheckpointError, BackboneWeightsError, ValueError, FileNotFoundError) as exc:
        print(f"slsg train: {exc}", file=sys.stderr)
        return 2
    print(f"checkpoint: {path}")
    return 0
