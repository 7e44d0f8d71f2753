"""`slsg train`: generative pre-training, SLSG training and calibration for one category (or every one)."""

from __future__ import annotations

import argparse

def _defaults() -> dict:
    """TrainConfig's defaults with the default preset's network fields, for the help texts."""
    from slsg_train.models import preset
    from slsg_train.training.config import TrainConfig

    cfg = TrainConfig()
    return {**cfg.to_dict(), "pretrain_steps": cfg.pretrain.steps, "lr": cfg.optim.lr,
            **{f"model.{k}": v for k, v in preset(cfg.preset).to_dict().items()}}


def add_arguments(p: argparse.ArgumentParser) -> None:
    from slsg_train.training.config import PRECISIONS

    d = _defaults()
    p.add_argument("--data", help="data set root (MVTec LOCO AD layout); required unless --print-config")
    p.add_argument("--category", help="category folder under --data (required unless --all-categories)")
    p.add_argument("--out", help="run directory (checkpoint.pt, train_log.jsonl); with --all-categories the folder of "
                                 "one run directory per category; required unless --print-config")
    p.add_argument("--all-categories", action="store_true",
                   help="train every category under --data in turn into OUT/<category>: finished runs are skipped, "
                        "unfinished ones resumed (run the same command again after an interruption)")
    p.add_argument("--config", action="append", metavar="FILE",
                   help="YAML or JSON file of training settings (TrainConfig fields, nested: simulation, optim, "
                        "loss, pretrain, model), e.g. configs/default.yaml; repeatable, later files win, flags win "
                        "over files")
    p.add_argument("--print-config", action="store_true",
                   help="print the resolved settings (defaults < preset < category prior < files < flags) and exit")
    p.add_argument("--preset", help=f"'default' (EfficientNet-Lite0) or 'paper' (ResNet-18) (default {d['preset']})")
    p.add_argument("--backbone", help="override the preset's backbone (efficientnet_lite0, resnet18)")
    p.add_argument("--backbone-weights",
                   help="'imagenet' (bundled / official weights), a .pth path, or 'none' for random init "
                        f"(default {d['backbone_weights']})")
    p.add_argument("--allow-download", action="store_true",
                   help="let --backbone-weights imagenet fetch the official resnet18 file when online")
    p.add_argument("--global-branch", action="store_true",
                   help="add the global check (pooled-feature distance to the normal images; not in the paper) "
                        "for products whose rules span the whole image")
    p.add_argument("--patch-memory", choices=("on", "off"),
                   help="the patch-memory check (each patch's distance to the normal patches, fused into the map; "
                        "not in the paper); default: the preset's")
    p.add_argument("--composition-check", choices=("on", "off"),
                   help="the composition check (an autoencoder of the whole image's features, trained after "
                        "SLSG, for rules that join parts; not in the paper); default: the preset's")
    p.add_argument("--component-check", choices=("on", "off"),
                   help="the component check (parts segmented, counted and measured against the normal images'; "
                        "closed form, fitted after SLSG); default: the preset's")
    p.add_argument("--composition-steps", type=int,
                   help=f"the composition check's autoencoder training steps (default {d['model.composition_steps']})")
    p.add_argument("--composition-restoration", type=float,
                   help="the share of the composition check's training batches that are simulated logical anomalies "
                        f"it learns to undo (0: normal images only) (default {d['model.composition_restoration']})")
    p.add_argument("--image-size",
                   help="model input: 'N' or 'WxH' (multiples of 32), or 'auto': the training images' aspect ratio "
                        "within 256x256 pixels, e.g. 416x160 for 500x1250 strips and 256x256 for square images; "
                        f"'auto:N' sets an N x N pixel budget (default {d['image_size']})")
    p.add_argument("--steps", type=int, help=f"detector training steps (default {d['steps']})")
    p.add_argument("--pretrain-steps", type=int, help=f"generative pre-training steps, 0 to skip (default {d['pretrain_steps']})")
    p.add_argument("--batch-size", type=int,
                   help=f"normal images per step; as many simulated ones are added (default {d['batch_size']})")
    p.add_argument("--lr", type=float, help=f"SGD learning rate (default {d['lr']})")
    p.add_argument("--device", help=f"auto, cpu, cuda, cuda:N (default {d['device']})")
    p.add_argument("--precision", choices=PRECISIONS,
                   help="training's forward passes: bf16 autocast (weights stay float32) or fp32; auto: bf16 where "
                        f"the device has it natively (CUDA from Ampere on, AVX512-BF16 or AMX) (default {d['precision']})")
    p.add_argument("--seed", type=int, help=f"random seed (default {d['seed']})")
    p.add_argument("--workers", type=int, help=f"DataLoader worker processes for the simulation (default {d['workers']})")
    p.add_argument("--anomaly-source", help="DTD texture folder for structural simulation (default: built-in textures)")
    p.add_argument("--checkpoint-every", type=int, help=f"steps between checkpoints (default {d['checkpoint_every']})")
    p.add_argument("--log-every", type=int, help=f"steps between log lines (default {d['log_every']})")
    p.add_argument("--calibration-fpr", type=float,
                   help=f"target false-positive rate of the threshold (default {d['calibration_fpr']})")
    p.add_argument("--calibration-holdout", type=float,
                   help="at most this share of train/good is held out of training for calibration when "
                        f"validation/good is short of the images the target rate needs (default {d['calibration_holdout']})")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    p.add_argument("--until-step", type=int,
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


def run(args: argparse.Namespace) -> int:
    import sys

    from slsg_train.checkpoint import CheckpointError
    from slsg_train.data.loco import DataSetError
    from slsg_train.models import BackboneWeightsError
    import yaml

    from slsg_train.training.config import load_settings_file, resolve_train_config
    from slsg_train.training.trainer import TrainingRun

    try:
        if bool(args.category) == args.all_categories:
            raise ValueError("give either --category or --all-categories")
        files = [load_settings_file(path) for path in args.config or []]
        if args.all_categories:
            return _train_all_categories(args, files)
        cfg = resolve_train_config(args.category, [*files, _flag_settings(args)])
        if args.print_config:
            print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
            return 0
        if not (args.data and args.out):
            raise ValueError("--data and --out are required (only --print-config runs without them)")
        run_ = TrainingRun(cfg, args.data, args.out, resume=args.resume, until_step=args.until_step,
                           overrides=_resume_overrides(args))
        path = run_.run()
    except (DataSetError, CheckpointError, BackboneWeightsError, ValueError, FileNotFoundError) as exc:
        print(f"slsg train: {exc}", file=sys.stderr)
        return 2
    print(f"checkpoint: {path}")
    return 0


def _resume_overrides(args: argparse.Namespace) -> dict:
    """On a resume, only the options given explicitly change the stored configuration."""
    return {k: getattr(args, k) for k in ("steps", "workers", "device", "precision", "checkpoint_every", "log_every")
            if getattr(args, k) is not None}


def _train_all_categories(args: argparse.Namespace, files: list[dict]) -> int:
    """Every category under --data into --out/<category>, finished ones skipped, unfinished ones resumed."""
    from slsg_train.training.all_categories import train_all_categories
    from slsg_train.training.config import resolve_train_config

    if args.print_config or args.resume:
        raise ValueError("--all-categories resumes unfinished runs by itself and has no --print-config; "
                         "drop --resume / --print-config")
    if not (args.data and args.out):
        raise ValueError("--data and --out are required")
    flags = _flag_settings(args)
    runs = train_all_categories(args.data, args.out, lambda category: resolve_train_config(category, [*files, flags]),
                                until_step=args.until_step, overrides=_resume_overrides(args))
    for r in runs:
        print(f"{r.category}: {'finished' if r.finished else 'unfinished'} ({r.run_dir / 'checkpoint.pt'})")
    return 0
