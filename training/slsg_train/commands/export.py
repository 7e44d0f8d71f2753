"""`slsg export`: a calibrated checkpoint -> model_repository/NAME/N/model.onnx + config.pbtxt."""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="RUN_DIR/checkpoint.pt (calibrated: a finished `slsg train`)")
    p.add_argument("--repository", default="model_repository", help="Triton model repository root")
    p.add_argument("--name", required=True, help="model name in the repository (e.g. the product)")
    p.add_argument("--version", type=int, default=None, help="version number (default: next free one)")
    p.add_argument("--metrics", default=None,
                   help="metrics.json from `slsg evaluate` (default: RUN_DIR/eval/metrics.json if present)")
    p.add_argument("--max-batch-size", type=int, default=8)
    p.add_argument("--tensorrt", action="store_true", help="enable Triton's TensorRT FP16 accelerator in config.pbtxt")
    p.add_argument("--cpu-config", action="store_true", help="instance group on CPU instead of GPU in config.pbtxt")


def run(args: argparse.Namespace) -> int:
    import sys

    from slsg_train.checkpoint import CheckpointError
    from slsg_train.export.model_export import ExportRequest, export_checkpoint
    from slsg_train.export.onnx_export import ExportError

    try:
        result = export_checkpoint(ExportRequest(
            checkpoint=args.checkpoint, repository=args.repository, name=args.name, version=args.version,
            metrics=args.metrics, max_batch_size=args.max_batch_size, tensorrt=args.tensorrt, gpu=not args.cpu_config,
        ))
    except (CheckpointError, ExportError, ValueError, FileExistsError, FileNotFoundError) as exc:
        print(f"slsg export: {exc}", file=sys.stderr)
        return 2
    print(f"exported {result.model_path} (version {result.version}); config {result.config_path}")
    print(f"verified against PyTorch: max |diff| anomaly_map {result.max_map_diff:.2e}, "
          f"score {result.max_score_diff:.2e} (both over the calibration's slope)")
    if result.near_tie_images:
        print(f"{result.near_tie_images} image(s) matched once a near-tie in the graph's neighbour ranking was "
              "resolved the other way (float32 rounding; see verify_onnx)")
    return 0
