"""`slsg calibrate`: re-choose a checkpoint's image-score threshold for a target false-positive rate.

The checks the checkpoint has stay as they are; only their scales are refitted, on one part of the
normal images the run held out of training, and the threshold is chosen on the other (see
``training/calibration.py``), so an older checkpoint whose checks were scaled on its threshold's own
images gets a promise that holds. Adding, refitting or removing checks is `slsg checks`, which ends
with the same calibration step (:func:`recalibrate`).

``--frames-only`` is for a line's own reviewed good frames (``--data``'s validation/good, docs/calibration.md):
the threshold is set on those frames alone and the checks keep the scales the run fitted on its own
held-out images, so where the line's frames score higher than the run's held-out images (capture shift)
those cannot dilute the threshold, and every frame counts towards the promise."""

from __future__ import annotations

import argparse

# `slsg checks` flags: accepted here only to point at that command instead of argparse's bare refusal
CHECK_FLAGS = ("--patch-memory", "--composition-check", "--global-branch", "--component-check",
               "--composition-steps", "--composition-restoration")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="RUN_DIR/checkpoint.pt")
    p.add_argument("--data", default=None, help="data set root (default: the one the run was trained on)")
    p.add_argument("--fpr", type=float, default=0.01, help="target false-positive rate on normal images (default 0.01)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--frames-only", action="store_true",
                   help="set the threshold on --data's validation/good alone (a line's reviewed good frames), "
                        "keeping the checks' scales as the run fitted them")
    for flag in CHECK_FLAGS:
        p.add_argument(flag, nargs="?", const="", default=None, help=argparse.SUPPRESS)


def run(args: argparse.Namespace) -> int:
    import sys

    given = [flag for flag in CHECK_FLAGS if getattr(args, flag[2:].replace("-", "_")) is not None]
    if given:
        print(f"slsg calibrate: {', '.join(given)}: calibrate re-chooses the threshold only; add, refit or "
              f"remove checks with `slsg checks --checkpoint {args.checkpoint} {given[0]} ...`", file=sys.stderr)
        return 2
    if args.frames_only:
        return calibrate_on_frames(args.checkpoint, args.data, args.fpr, args.device)
    return recalibrate(args.checkpoint, args.data, args.fpr, args.device, {}, "calibrate")


def calibrate_on_frames(checkpoint: str, data: str | None, fpr: float, device: str) -> int:
    """``--frames-only``: the threshold on ``data``'s validation/good alone, the checks' scales kept (the run
    fitted them on its own held-out images, which never include a line's frames). Returns the exit status."""
    import dataclasses
    import sys
    from pathlib import Path

    from slsg_train.checkpoint import CheckpointError, save_checkpoint
    from slsg_train.data.images import load_resized
    from slsg_train.data.loco import DataSetError, LocoCategory
    from slsg_train.inference import load_model
    from slsg_train.training.calibration import calibrate_threshold

    try:
        loaded = load_model(checkpoint, device)
        ckpt = loaded.checkpoint
        if data is None or Path(data).resolve() == Path(ckpt.data_root).resolve():
            raise ValueError("--frames-only sets the threshold on frames the run never saw: give --data, a data set "
                             "whose validation/good holds the line's reviewed good frames (not the run's own)")
        if ckpt.calibration is None:
            raise ValueError(f"{checkpoint} was never calibrated: its checks have no scales to keep "
                             f"(run `slsg calibrate` without --frames-only first)")
        frames = LocoCategory(data, ckpt.category).validation_paths
        if not frames:
            raise ValueError(f"{Path(data) / ckpt.category / 'validation' / 'good'}: no frames to calibrate on")
        kept = ckpt.calibration.scale_images  # None: an older card's checks were scaled on its threshold images
        scale_images = 0 if not loaded.model.checks else (kept if kept is not None else ckpt.calibration.num_images)
        cal, stats = calibrate_threshold(loaded.model, load_resized(frames, loaded.image_size, loaded.resize),
                                         loaded.top_k, fpr, device, scale_images=scale_images)
    except (CheckpointError, DataSetError, ValueError) as exc:
        print(f"slsg calibrate: {exc}", file=sys.stderr)
        return 2
    held = ckpt.calibration_split["held_out_train"] if ckpt.calibration_split else None
    stats.update(held_out_train=held, threshold_on="frames")
    split = {**(ckpt.calibration_split or {}), "threshold_images": cal.num_images}
    save_checkpoint(ckpt.path, dataclasses.replace(ckpt, calibration=cal, calibration_stats=stats,
                                                   calibration_split=split if ckpt.calibration_split else None))
    _report(cal, stats, "calibrate", ckpt.path, f"; the checks' scales kept ({scale_images} images)")
    return 0


def _report(cal, stats: dict, command: str, path, scales: str) -> None:
    """What a calibration prints: the threshold, the promise, and a warning where the images were too few."""
    import sys

    from slsg_train.training.calibration import small_calibration_warning

    print(f"raw threshold {cal.raw_threshold:.5f} for FPR {cal.target_fpr:.2%} on {stats['num_images']} normal images "
          f"(scores {stats['min']:.4f}..{stats['max']:.4f}{scales}); saved to {path}")
    print(f"normal images expected at or above it: {stats['expected_fpr']:.2%} on average, under "
          f"{stats['fpr_upper_90']:.2%} for nine calibration sets in ten")
    warning = small_calibration_warning(cal)
    if warning:
        print(f"slsg {command}: warning: {warning}", file=sys.stderr)


def recalibrate(checkpoint: str, data: str | None, fpr: float | None, device: str,
                switches: dict[str, object], command: str) -> int:
    """Load ``checkpoint``, apply the check ``switches`` (none: keep its checks) while refitting every
    check's scale, choose the threshold for ``fpr`` (None: the checkpoint's target) and save it in
    place. Returns the exit status; errors are printed prefixed with `slsg <command>`."""
    import dataclasses
    import sys

    from slsg_train.checkpoint import CheckpointError, save_checkpoint
    from slsg_train.commands.checks import refit_checks
    from slsg_train.data.images import load_resized
    from slsg_train.data.loco import DataSetError, LocoCategory
    from slsg_train.inference import load_model
    from slsg_train.models import BackboneWeightsError
    from slsg_train.training.calibration import calibrate_threshold, split_for_calibration

    try:
        loaded = load_model(checkpoint, device)
        ckpt = loaded.checkpoint
        if fpr is None:
            fpr = ckpt.calibration.target_fpr if ckpt.calibration is not None else 0.01
        category = LocoCategory(data or ckpt.data_root, ckpt.category)
        model = loaded.model
        has_checks = dataclasses.replace(ckpt.model_config, **switches).uses_reference
        # the images the run held out of training, and only those, may calibrate it
        split = split_for_calibration(category, fpr, has_checks, held_out_train=ckpt.held_out_train(category))
        if has_checks or switches:  # every check's scale is refitted on the scale images, never the threshold's
            model = refit_checks(loaded, switches, split.train,
                                 load_resized(split.scale, loaded.image_size, loaded.resize), device)
        cal, stats = calibrate_threshold(model, load_resized(split.threshold, loaded.image_size, loaded.resize),
                                         loaded.top_k, fpr, device, scale_images=len(split.scale))
    except (CheckpointError, DataSetError, BackboneWeightsError, ValueError) as exc:
        print(f"slsg {command}: {exc}", file=sys.stderr)
        return 2
    stats["held_out_train"] = split.held_out_train
    path = ckpt.path
    save_checkpoint(path, dataclasses.replace(ckpt, calibration_split=split.summary(), model_state=model.state_dict(),
                                              calibration=cal, calibration_stats=stats))
    scales = f"; the checks' scales on {len(split.scale)} others" if split.scale else ""
    _report(cal, stats, command, path, scales)
    return 0
