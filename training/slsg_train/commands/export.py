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
    p.add_argument("--precision", choices=("fp32", "int8"), default="fp32",
                   help="int8: ONNX Runtime static quantization (QDQ) of the graph, its threshold set on its own "
                        "scores; refused when it changes more than 1%% of decisions (docs/int8.md)")
    p.add_argument("--calibration-data", default=None, metavar="ROOT",
                   help="int8: data set root for the activation ranges and the threshold (default: the run's)")
    p.add_argument("--category", default=None, help="int8: category under --calibration-data (default: the run's)")
    p.add_argument("--max-decision-change", type=float, default=None, metavar="SHARE",
                   help="int8: refuse the export when INT8 and float32 decide differently on more than this share "
                        "of the verification images (default 0.01)")
    p.add_argument("--min-rank-correlation", type=float, default=None, metavar="R",
                   help="int8: refuse the export when the INT8 scores of the normal threshold images rank them "
                        "with less than this rank correlation with float32 (default 0.95; -1: off)")


def run(args: argparse.Namespace) -> int:
    import sys

    from slsg_train.checkpoint import CheckpointError
    from slsg_train.data.loco import DataSetError
    from slsg_train.export.model_export import ExportRequest, export_checkpoint
    from slsg_train.export.onnx_export import ExportError

    try:
        result = export_checkpoint(ExportRequest(
            checkpoint=args.checkpoint, repository=args.repository, name=args.name, version=args.version,
            metrics=args.metrics, max_batch_size=args.max_batch_size, tensorrt=args.tensorrt, gpu=not args.cpu_config,
            precision=args.precision, calibration_data=args.calibration_data, calibration_category=args.category,
            max_decision_change=args.max_decision_change, min_rank_correlation=args.min_rank_correlation,
        ))
    except (CheckpointError, ExportError, DataSetError, ValueError, FileExistsError, FileNotFoundError) as exc:
        print(f"slsg export: {exc}", file=sys.stderr)
        return 2
    print(f"exported {result.model_path} (version {result.version}); config {result.config_path}")
    if result.int8 is not None:
        _print_int8(result)
        return 0
    print(f"verified against PyTorch: max |diff| anomaly_map {result.max_map_diff:.2e}, "
          f"score {result.max_score_diff:.2e} (both over the calibration's slope)")
    if result.near_tie_images:
        print(f"{result.near_tie_images} image(s) matched once a near-tie in the graph's neighbour ranking was "
              "resolved the other way (float32 rounding; see verify_onnx)")
    return 0


def _print_int8(result) -> None:
    check, cal = result.int8, result.card.calibration
    for refused in check.refused:
        print(f"INT8 preset {refused['preset']!r} refused: {refused['reason']}")
    print(f"INT8 (QDQ, preset {check.preset!r}): {check.quantized_nodes} nodes quantized; kept in float32 "
          f"(quantizable nodes per block): {check.float_nodes}")
    print(f"threshold set on the INT8 graph's own scores: raw {check.int8_raw_threshold:.6g} (float32 graph: "
          f"{check.fp32_raw_threshold:.6g}) on {cal.num_images} normal images")
    print(f"against float32 on {check.images} images ({check.anomalous_images} simulated anomalies): decisions "
          f"changed {check.decisions_changed} ({check.changed_share:.1%}); flagged float32 {check.fp32_flagged}, "
          f"INT8 {check.int8_flagged}; raw-score difference x slope: max {check.max_score_diff:.3g}, "
          f"median {check.median_score_diff:.3g}; rank correlation on the normal images "
          f"{check.normal_rank_correlation:.3f}")
