"""`slsg checks`: add, refit or remove a checkpoint's reference checks, then recalibrate it.

Each ``--<check> on|off`` switches one check; every check the checkpoint then has is refitted (the
composition check's trained autoencoder kept unless asked otherwise), and the threshold is chosen
again with `slsg calibrate`'s step, so a checkpoint whose checks changed never keeps a stale threshold
(its target false-positive rate is kept unless ``--fpr`` says otherwise)."""

from __future__ import annotations

import argparse

SWITCHES = ("global_branch", "patch_memory", "composition_check", "component_check")
COMPOSITION_SETTINGS = ("composition_steps", "composition_restoration")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="RUN_DIR/checkpoint.pt")
    p.add_argument("--data", default=None, help="data set root (default: the one the run was trained on)")
    p.add_argument("--fpr", type=float, default=None,
                   help="target false-positive rate of the new threshold (default: the checkpoint's)")
    p.add_argument("--global-branch", choices=("on", "off"), default=None,
                   help="add or remove the global check; closed form, no retraining")
    p.add_argument("--patch-memory", choices=("on", "off"), default=None,
                   help="add or remove the patch-memory check; closed form, no retraining")
    p.add_argument("--composition-check", choices=("on", "off"), default=None,
                   help="add or remove the composition check; trains its autoencoder "
                        "(a few minutes), keeps the SLSG weights")
    p.add_argument("--component-check", choices=("on", "off"), default=None,
                   help="add or remove the component check; closed form, no retraining")
    p.add_argument("--composition-steps", type=int, default=None,
                   help="with --composition-check on: its autoencoder's training steps (default: the checkpoint's)")
    p.add_argument("--composition-restoration", type=float, default=None,
                   help="with --composition-check on: the share of its batches that are simulated logical anomalies "
                        "to undo (default: the checkpoint's; 0 before this setting existed)")
    p.add_argument("--reference-padding", choices=("same", "symmetric"), default=None,
                   help="how the checks' frozen ImageNet encoder pads: 'same', as its weights were trained (the "
                        "default of new runs), or 'symmetric' (runs from before the setting); refits every check "
                        "and retrains the composition check's autoencoder, whose input it changes")
    p.add_argument("--device", default="cpu")


def run(args: argparse.Namespace) -> int:
    import sys

    from slsg_train.commands.calibrate import recalibrate

    try:
        switches = check_switches(args)
    except ValueError as exc:
        print(f"slsg checks: {exc}", file=sys.stderr)
        return 2
    return recalibrate(args.checkpoint, args.data, args.fpr, args.device, switches, "checks")


def check_switches(args: argparse.Namespace) -> dict[str, object]:
    """The ``SLSGConfig`` fields the command line changes: each check switched on or off, and the
    composition check's settings, which only a composition check being (re)trained can take."""
    switches: dict[str, object] = {name: getattr(args, name) == "on" for name in SWITCHES
                                   if getattr(args, name) is not None}
    if getattr(args, "reference_padding", None) is not None:
        switches["reference_padding"] = args.reference_padding
    for name in COMPOSITION_SETTINGS:
        if getattr(args, name) is not None:
            if args.composition_check != "on":
                raise ValueError(f"--{name.replace('_', '-')} needs --composition-check on")
            switches[name] = getattr(args, name)
    return switches


def refit_checks(loaded, switches: dict[str, object], train_paths, scale_images, device: str):
    """The checkpoint's network with reference checks added or removed per ``switches`` and every
    remaining one (re)fitted; the reference encoder gets the backbone's ImageNet weights, not the
    pre-trained encoder's. The SLSG weights are kept, and so is a trained composition check unless
    ``switches`` asks for it (only its scale is refitted: retraining would take minutes and change it).
    A check that finds nothing to model in the normal images is left out, and the command says why."""
    import dataclasses

    import torch

    from slsg_train.models import SLSG
    from slsg_train.models.slsg import CHECK_PREFIXES, CHECKS, build_checks
    from slsg_train.simulation.config import SimulationConfig
    from slsg_train.data.images import load_resized
    from slsg_train.training.calibration import fit_checks, left_out_messages
    from slsg_train.training.config import TrainConfig
    from slsg_train.training.fusion import fusion_messages
    from slsg_train.training.precision import channels_last, resolve_precision

    config = dataclasses.replace(loaded.checkpoint.model_config, **switches)
    model = SLSG(dataclasses.replace(config, backbone_weights=None, **{name: False for name in CHECKS}))
    state = loaded.model.state_dict()
    model.load_state_dict({k: v for k, v in state.items() if not k.startswith(CHECK_PREFIXES)})
    model.config = config
    model.set_checks(*build_checks(config))
    trained = loaded.model.composition_check
    # a trained autoencoder is kept unless asked for anew, or its input features change with the padding
    repadded = config.reference_padding != loaded.checkpoint.model_config.reference_padding
    keep = (model.composition_check is not None and trained is not None and bool(trained.fitted)
            and not {"composition_check", "composition_steps"} & set(switches) and not repadded)
    if keep:
        model.composition_check.load_state_dict(trained.state_dict())
    channels_last(model.to(device))
    # the run's seed, as training used it: a new autoencoder's initialisation and the coreset's picks;
    # imported weights have no run: the defaults, in float32
    train_config = loaded.checkpoint.train_config or TrainConfig(precision="fp32")
    seed = train_config.seed
    torch.manual_seed(seed)
    simulation = train_config.simulation
    # a new autoencoder trains in the run's precision on this device
    precision = resolve_precision(train_config.precision, torch.device(device))
    report = fit_checks(model, load_resized(train_paths, loaded.image_size, loaded.resize), scale_images, loaded.top_k,
                        device, seed=seed, keep_trained=keep, precision=precision, select=True,
                        simulation=SimulationConfig.from_dict(simulation) if simulation else None)
    for message in left_out_messages(report) + fusion_messages(report.get("fusion", {})):
        print(message)
    loaded.checkpoint.model_config = model.config  # a check left out is recorded off
    loaded.checkpoint.checks_left_out = report.get("left_out", {})
    loaded.checkpoint.fusion = report.get("fusion", {})
    return model.eval()
