"""`slsg import-authors`: the SLSG authors' released weights (``<category>.tch``) -> RUN_DIR/checkpoint.pt."""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("weights", help="their weight file, model_data/<category>.tch (a plain state dict)")
    p.add_argument("--category", required=True, help="the category the weights were trained on")
    p.add_argument("--out", required=True, help="new run directory; the checkpoint goes to OUT/checkpoint.pt")
    p.add_argument("--data", default=None,
                   help="data set root (MVTec LOCO AD layout): calibrate the threshold on the category's normal "
                        "images. Without it the checkpoint is uncalibrated and `slsg calibrate` must run before export")
    p.add_argument("--fpr", type=float, default=0.01, help="target false-positive rate of the threshold (default 0.01)")
    p.add_argument("--device", default="cpu")


def run(args: argparse.Namespace) -> int:
    import sys

    from slsg_train.authors_import import import_authors
    from slsg_train.data.loco import DataSetError
    from slsg_train.models.authors import AuthorsWeightsError

    try:
        result = import_authors(args.weights, args.category, args.out, args.data, args.fpr, args.device)
    except (AuthorsWeightsError, DataSetError, FileNotFoundError, FileExistsError, ValueError) as exc:
        print(f"slsg import-authors: {exc}", file=sys.stderr)
        return 2
    c = result.conversion.summary()
    print(f"{c['tensors']} tensors: {c['renamed']} loaded into the paper preset, {c['aliases']} aliases of the "
          f"graph's key/query (f_query.* in effect), {c['unused']} unused by their forward pass")
    if c["aliases_differ"]:
        print("note: their f_key.* and f_query.* copies differ; f_query.* is in effect, as in their strict load")
    stats = result.calibration_stats
    if stats is None:
        print(f"checkpoint: {result.checkpoint} (uncalibrated: run `slsg calibrate --checkpoint {result.checkpoint} "
              "--data ROOT` before `slsg export`)")
    else:
        print(f"calibrated on {stats['num_images']} normal images (scores {stats['min']:.4f}..{stats['max']:.4f}); "
              f"checkpoint: {result.checkpoint}")
    return 0
