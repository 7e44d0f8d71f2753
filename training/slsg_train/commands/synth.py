"""``slsg synth OUT``: write a synthetic data set in the MVTec LOCO AD layout (see slsg_train.data.synth)."""

from __future__ import annotations

import argparse
import sys


def parse_image_size(text: str) -> tuple[int, int]:
    """(H, W) of ``N`` or ``WxH``, as an argparse type."""
    from slsg.sizes import parse_size

    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("out", help="data set root; one folder per category is written under it")
    parser.add_argument("--categories", default=None,
                        help="comma-separated categories (default: all, i.e. tray,cable,box)")
    parser.add_argument("--image-size", type=parse_image_size, default=(256, 256), metavar="N|WxH",
                        help="image size, N for square or WxH (default 256)")
    from dataclasses import fields

    from slsg_train.data.synth import SplitCounts

    for field in fields(SplitCounts):  # the defaults are LOCO's split sizes, rounded
        parser.add_argument(f"--{field.name.replace('_', '-')}", type=int, default=field.default, metavar="N",
                            help=f"images in that split (default {field.default})")
    parser.add_argument("--seed", type=int, default=0, help="random seed; same seed, same bytes (default 0)")
    parser.add_argument("--overwrite", action="store_true", help="replace existing category folders")


def run(args: argparse.Namespace) -> int:
    from slsg_train.data.synth import SplitCounts, write_synthetic_dataset

    categories = [c.strip() for c in args.categories.split(",") if c.strip()] if args.categories else None
    counts = SplitCounts(args.train, args.validation, args.test_good, args.test_logical, args.test_structural)
    try:
        folders = write_synthetic_dataset(args.out, categories, args.image_size, counts, args.seed, args.overwrite)
    except (ValueError, OSError) as exc:
        print(f"slsg synth: {exc}", file=sys.stderr)
        return 2
    height, width = args.image_size
    for folder in folders:
        print(f"wrote {folder} ({width}x{height})")
    return 0
