"""``slsg dataset from-reviews``: a data set in the training layout from operators' reviews.

What goes where is in :mod:`slsg_gateway.feedback.dataset`; docs/operations.md has the loop.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="dataset_command", metavar="SUBCOMMAND", required=True)
    p = sub.add_parser("from-reviews", help="reviewed inspections -> a data set (normal: false alarms; "
                                            "test: defects with coarse masks)")
    p.add_argument("--records", required=True,
                   help="the record store: the gateway's records folder or a postgresql:// URL (SLSG_RECORDS)")
    p.add_argument("--model", required=True, help="the model whose reviewed inspections to take")
    p.add_argument("--out", required=True, type=Path, help="data set root; the category is written under it")
    p.add_argument("--category", help="category folder name (default: the category on the model's card in "
                                      "--repository, else the model name); `slsg calibrate` needs the "
                                      "checkpoint's category")
    p.add_argument("--repository", type=Path, default=Path("model_repository"),
                   help="model repository to read the card's category from (default model_repository)")
    p.add_argument("--holdout", type=float, default=0.3,
                   help="share of confirmed false alarms kept in test/good for `slsg promote` instead of "
                        "validation/good (default 0.3)")
    p.add_argument("--train-good", type=Path,
                   help="the model's training images (its data set's <category>/train/good), copied to train/good "
                        "so `slsg calibrate` keeps the reference checks fitted on them; without it train/good "
                        "holds the reviewed false alarms and a recalibration refits the checks on those")
    p.add_argument("--overwrite", action="store_true", help="write into a non-empty category folder")


def run(args: argparse.Namespace) -> int:
    from slsg_gateway.feedback.dataset import DatasetError, from_reviews
    from slsg_gateway.records import open_store
    from slsg_gateway.records.store import is_postgres_url

    if not is_postgres_url(args.records) and not Path(args.records).is_dir():
        print(f"slsg dataset from-reviews: no record store at {args.records} (a gateway's records folder or a "
              f"postgresql:// URL)", file=sys.stderr)
        return 2
    category = args.category or _card_category(args.repository, args.model) or args.model
    store = open_store(args.records)
    try:
        summary = from_reviews(store, args.model, args.out, category, args.holdout, args.overwrite,
                               args.train_good)
    except DatasetError as exc:
        print(f"slsg dataset from-reviews: {exc}", file=sys.stderr)
        return 2
    finally:
        store.close()
    print(summary.describe())
    if args.train_good is None:
        print("note: train/good holds the reviewed false alarms; `slsg calibrate --data` on this data set refits "
              "the reference checks on them (pass --train-good <the model's train/good> to keep its own)",
              file=sys.stderr)
    return 0


def _card_category(repository: Path, model: str) -> str | None:
    """The category on the model's card in the repository's config.pbtxt, if there is one."""
    from slsg.contract import CONFIG_FILENAME
    from slsg.triton_config import card_from_config, load_config

    config = repository / model / CONFIG_FILENAME
    return card_from_config(load_config(config)).category if config.is_file() else None
