"""`slsg calibrate`: re-choose a checkpoint's image-score threshold for a target false-positive rate.

The reference checks are refitted too (the composition check's trained autoencoder kept unless asked
otherwise), their scales on one part of the normal images the run held out of training and the
threshold on the other (see ``training/calibration.py``), so an older checkpoint whose checks were
scaled on its threshold's own images gets a promise that holds."""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="RUN_DIR/checkpoint.pt")
    p.add_argument("--data", default=None, help="data set root (default: the one the run was trained on)")
    p.add_argument("--fpr", type=float, default=0.01, help="target false-positive rate on normal images (default 0.01)")
    p.add_argument("--global-branch", choices=("on", "off"), default=None,
                   help="add or remove the global check before calibrating; closed form, no retraining")
    p.add_argument("--patch-memory", choices=("on", "off"), default=None,
                   help="add or remove the patch-memory check before calibrating; closed form, no retraining")
    p.add_argument("--composition-check", choices=("on", "off"), default=None,
                   help="add or remove the composition check before calibrating; trains its autoencoder "
                        "(a few minutes), keeps the SLSG weights")
    p.add_argument("--component-check", choices=("on", "off"), default=None,
                   help="add or remove the component check before calibrating; closed form, no retraining")
    p.add_argument("--composition-steps", type=int, default=None,
                   help="with --composition-check on: its autoencoder's training steps (default: the checkpoint's)")
    p.add_argument("--composition-restoration", type=float, default=None,
                   help="with --composition-check on: the share of its batches that are simulated logical anomalies "
                        "to undo (default: the checkpoint's; 0 before this setting existed)")
    p.add_argument("--device", default="cpu")


def run(args: argparse.Namespace) -> int:
    import dataclasses
    import sys

    from slsg_train.checkpoint import CheckpointError, save_checkpoint
    from slsg_train.data.loco import DataSetError, LocoCategory
    from slsg_train.inference import load_model
    from slsg_train.models import BackboneWeightsError, SLSGConfig
    from slsg_train.training.calibration import (calibrate_threshold, legacy_held_out_train, small_calibration_warning,
                                                 split_for_calibration)
    from slsg_train.data.images import load_resized

    try:
        loaded = load_model(args.checkpoint, args.device)
        payload = loaded.payload
        category = LocoCategory(args.data or payload["data_root"], payload["category"])
        model = loaded.model
        switches = {name: value == "on" for name, value in
                    (("global_branch", args.global_branch), ("patch_memory", args.patch_memory),
                     ("composition_check", args.composition_check), ("component_check", args.component_check))
                    if value is not None}
        for name in ("composition_steps", "composition_restoration"):
            if getattr(args, name) is not None:
                if args.composition_check != "on":
                    raise ValueError(f"--{name.replace('_', '-')} needs --composition-check on")
                switches[name] = getattr(args, name)
        has_checks = SLSGConfig.from_dict({**payload["model_config"], **switches}).uses_reference
        # the images the run held out of training, and only those, may calibrate it
        split_record = payload.get("calibration_split")
        held = split_record["held_out_train"] if split_record else legacy_held_out_train(category)
        split = split_for_calibration(category, args.fpr, has_checks, held_out_train=held)
        if has_checks or switches:  # every check's scale is refitted on the scale images, never the threshold's
            model = _switch_reference_checks(loaded, switches, split.train,
                                             load_resized(split.scale, loaded.image_size, loaded.resize), args.device)
        cal, stats = calibrate_threshold(model, load_resized(split.threshold, loaded.image_size, loaded.resize), loaded.top_k,
                                         args.fpr, args.device, scale_images=len(split.scale))
    except (CheckpointError, DataSetError, BackboneWeightsError, ValueError) as exc:
        print(f"slsg calibrate: {exc}", file=sys.stderr)
        return 2
    stats["held_out_train"] = split.held_out_train
    payload["calibration_split"] = split.summary()
    payload["model_state"] = model.state_dict()
    payload["calibration"], payload["calibration_stats"] = dataclasses.asdict(cal), stats
    path = payload.pop("path")
    save_checkpoint(path, {k: v for k, v in payload.items() if k != "format"})
    scales = f"; the checks' scales on {len(split.scale)} others" if split.scale else ""
    print(f"raw threshold {cal.raw_threshold:.5f} for FPR {args.fpr:.2%} on {stats['num_images']} normal images "
          f"(scores {stats['min']:.4f}..{stats['max']:.4f}{scales}); saved to {path}")
    print(f"normal images expected at or above it: {stats['expected_fpr']:.2%} on average, under "
          f"{stats['fpr_upper_90']:.2%} for nine calibration sets in ten")
    warning = small_calibration_warning(cal)
    if warning:
        print(f"slsg calibrate: warning: {warning}", file=sys.stderr)
    return 0


def _switch_reference_checks(loaded, switches: dict[str, bool], train_paths, scale_images, device: str):
    """The checkpoint's network with reference checks added or removed per ``switches`` and every
    remaining one (re)fitted; the reference encoder gets the backbone's ImageNet weights, not the
    pre-trained encoder's. The SLSG weights are kept, and so is a trained composition check unless
    ``switches`` asks for it (only its scale is refitted: retraining would take minutes and change it)."""
    import dataclasses

    import torch

    from slsg_train.models import SLSG, SLSGConfig
    from slsg_train.models.slsg import CHECK_PREFIXES, CHECKS, build_checks
    from slsg_train.simulation.config import SimulationConfig
    from slsg_train.data.images import load_resized
    from slsg_train.training.calibration import fit_checks
    from slsg_train.training.precision import channels_last, resolve_precision

    config = dataclasses.replace(SLSGConfig.from_dict(loaded.payload["model_config"]), **switches)
    model = SLSG(dataclasses.replace(config, backbone_weights=None, **{name: False for name in CHECKS}))
    state = loaded.model.state_dict()
    model.load_state_dict({k: v for k, v in state.items() if not k.startswith(CHECK_PREFIXES)})
    model.config = config
    model.set_checks(*build_checks(config))
    trained = loaded.model.composition_check
    keep = (model.composition_check is not None and trained is not None and bool(trained.fitted)
            and not {"composition_check", "composition_steps"} & set(switches))
    if keep:
        model.composition_check.load_state_dict(trained.state_dict())
    channels_last(model.to(device))
    # the run's seed, as training used it: a new autoencoder's initialisation and the coreset's picks
    train_config = loaded.payload.get("train_config", {})
    seed = train_config.get("seed", 0)
    torch.manual_seed(seed)
    simulation = train_config.get("simulation")
    # a new autoencoder trains in the run's precision on this device (runs from before it existed: fp32)
    precision = resolve_precision(train_config.get("precision", "fp32"), torch.device(device))
    fit_checks(model, load_resized(train_paths, loaded.image_size, loaded.resize), scale_images, loaded.top_k, device,
               seed=seed, keep_trained=keep, precision=precision,
               simulation=SimulationConfig.from_dict(simulation) if simulation else None)
    loaded.payload["model_config"] = config.to_dict()
    return model.eval()
