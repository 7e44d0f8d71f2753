"""INT8 export: ONNX Runtime static quantization (QDQ, per-channel weights) of the contract graph, its
threshold calibrated on the INT8 graph's own scores, and a guard on the decisions it changes.

Steps (:func:`export_int8`): the float32 graph is exported and verified against PyTorch as usual; its
convolutions and matrix products are quantized with activation ranges measured on normal training
images, except in the blocks listed in :data:`FLOAT_BLOCKS` (docs/int8.md says why each stays float32;
of those in :data:`PARTIAL_BLOCKS` only the first layers stay float32);
the INT8 graph scores the held-out threshold images through ONNX Runtime and its threshold is set on
those scores (quantization shifts scores); the graph is written again with that calibration and
quantized with the same ranges. Last, the INT8 graph is compared with the float32 one on the threshold
images and anomalous copies of them: each at its own threshold, the two must take the same decision on
all but ``max_decision_change`` of them, else :class:`~slsg_train.export.onnx_export.ExportError`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from collections.abc import Iterator, Sequence

import numpy as np
import onnx
from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static

from slsg.contract import DECISION_THRESHOLD, INPUT_IMAGE, MODEL_CARD_KEY, PRECISION_INT8, Calibration, ModelCard
from slsg_train.export.onnx_export import ExportError, InferenceGraph, _write_onnx, export_onnx, score_gain
from slsg_train.onnx_inference import OnnxModel
from slsg_train.training.calibration import calibration_from_scores

# ONNX node-name prefixes of the TorchScript exporter (module scopes of InferenceGraph) -> block name.
# Nodes outside every prefix (normalisation, fusing the checks' maps, top-K, calibration) form "score_tail".
BLOCKS: dict[str, tuple[str, ...]] = {
    "encoder": ("/model/encoder/",),
    "skip_attention": ("/model/skip_attention",),
    "graph": ("/model/graph/",),
    "decoder": ("/model/decoder", "/model/segmentation_head/", "/model/aux_features/", "/model/aux_classifier/"),
    "reference_encoder": ("/model/reference_encoder/",),
    "patch_memory": ("/model/patch_memory/",),
    "composition_check": ("/model/composition_check/",),
    "component_check": ("/model/component_check/",),
}
SCORE_TAIL = "score_tail"
# The heavy operators, and Relu/Clip (ReLU6) so that a convolution's output is quantized over its
# activation's range (the quantizer then folds the activation into the convolution's output range);
# quantizing the element-wise rest (Resize, Concat, Add) only adds error and quantize/dequantize pairs.
QUANTIZED_OPS = ("Conv", "MatMul", "Relu", "Clip")
ACTIVATIONS = ("Relu", "Clip")
# Blocks kept in float32 (measured per block, docs/int8.md): the SLSG encoder (its features are what the
# decoder was trained on; quantized, normal images reorder), the skip attention (multiplies features by
# their own attention), the graph block (ranks neighbours by similarity and softmaxes over all node
# pairs) and the score tail (log-odds -> decision). The decoder, 80 % of the arithmetic, the composition
# check's autoencoder and the patch memory's neighbour search are quantized; so is the reference encoder
# but for its first layers (PARTIAL_BLOCKS).
FLOAT_BLOCKS = ("encoder", "skip_attention", "graph", "reference_encoder", "component_check", SCORE_TAIL)
# Blocks of FLOAT_BLOCKS quantized all the same but for their first layers (PARTIAL_FLOAT): the reference
# encoder, whose stem and first block are what moved scores when the whole encoder was quantized.
PARTIAL_BLOCKS: tuple[str, ...] = ("reference_encoder",)
# Node-name parts of the encoders' stem and first block: they see the image's own statistics at full
# resolution (and the SLSG encoder's feed the skip attention); little of the arithmetic.
PARTIAL_FLOAT = ("/_conv_stem/", "/_blocks.0/")
# The patch memory's MatMul only picks each patch's nearest memory vector (its distance is recomputed in
# float32 from the picked vector): integer inputs, float output (MatMulIntegerToFloat), so that near
# neighbours are not merged by an 8-bit output.
FLOAT_OUTPUT_OPS = ("MatMul",)
CALIBRATION_METHODS = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
                       "percentile": CalibrationMethod.Percentile}
MAX_DECISION_CHANGE = 0.01  # share of the verification images whose decision INT8 may change
# Least rank correlation of INT8 and float32 scores of the normal threshold images: the decoder-only
# INT8 graph keeps 0.99-1.00, a whole quantized encoder gave 0.1-0.6 (docs/int8.md).
MIN_RANK_CORRELATION = 0.95
CALIBRATION_IMAGES = 32  # normal training images the activation ranges are measured on (at most)


@dataclass
class Int8Options:
    """What the quantizer quantizes, how, and the guard's limits."""

    name: str = "custom"  # the preset's name (PRESETS), recorded in the card
    float_blocks: tuple[str, ...] = FLOAT_BLOCKS
    op_types: tuple[str, ...] | None = QUANTIZED_OPS  # None: every operator ONNX Runtime can quantize
    max_decision_change: float = MAX_DECISION_CHANGE
    min_rank_correlation: float = MIN_RANK_CORRELATION  # -1 turns the order check off
    per_channel: bool = True
    partial_blocks: tuple[str, ...] = PARTIAL_BLOCKS  # of float_blocks: quantized but for partial_float
    partial_float: tuple[str, ...] = PARTIAL_FLOAT  # node-name parts of their convolutions kept float32
    partial_depthwise: bool = True  # False: only their point-wise (1x1) convolutions are quantized
    float_output_ops: tuple[str, ...] = FLOAT_OUTPUT_OPS  # operator types with integer inputs and a float output
    calibration: str = "minmax"  # CALIBRATION_METHODS: how activation ranges are set from the images


# The export's presets, fastest first. Each is tried in turn and the first whose INT8 graph passes the
# guard is written: the SLSG encoder past its first block quantized too kept bottle's decisions but
# reordered its normal images (rank correlation 0.93); the reference encoder past its first block changed
# one decision on the synthetic tray (docs/int8.md); the patch memory's neighbour search and the decoder
# were harmless on both. The last preset is the decoder alone (the first INT8 default).
PRESETS: tuple[Int8Options, ...] = (
    Int8Options(name="encoders", partial_blocks=("encoder", "reference_encoder")),
    Int8Options(name="reference-encoder"),
    Int8Options(name="patch-memory", partial_blocks=()),
    Int8Options(name="decoder", float_blocks=(*FLOAT_BLOCKS, "patch_memory"), partial_blocks=(), float_output_ops=()),
)


@dataclass
class Int8Check:
    """INT8 against float32 on the verification images, each at its own threshold."""

    images: int
    anomalous_images: int
    decisions_changed: int
    fp32_flagged: int
    int8_flagged: int
    max_score_diff: float  # max |raw score INT8 - float32| times the float32 calibration's slope (score_gain)
    median_score_diff: float
    normal_rank_correlation: float  # Spearman, INT8 against float32 scores of the (normal) threshold images
    fp32_raw_threshold: float
    int8_raw_threshold: float
    quantized_nodes: int
    float_nodes: dict[str, int] = field(default_factory=dict)  # kept float32: QUANTIZED_OPS nodes per block
    preset: str = "custom"  # the Int8Options.name written
    refused: list[dict[str, Any]] = field(default_factory=list)  # presets tried before it and refused

    @property
    def changed_share(self) -> float:
        return self.decisions_changed / self.images if self.images else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "changed_share": self.changed_share}


@dataclass
class Int8Images:
    """The normal and anomalous frames (uint8, model size) an INT8 export needs."""

    train: list[np.ndarray]  # activation ranges
    threshold: list[np.ndarray]  # the held-out images the threshold is set on
    anomalous: list[np.ndarray]  # anomalous copies: decisions that can change in both directions
    scale_images: int | None = None  # what the card's calibration records


def block_of(node_name: str) -> str:
    """The block (:data:`BLOCKS` key, or :data:`SCORE_TAIL`) an exported node belongs to."""
    return next((block for block, prefixes in BLOCKS.items() if node_name.startswith(prefixes)), SCORE_TAIL)


def unknown_blocks(names: tuple[str, ...]) -> list[str]:
    return [b for b in names if b not in BLOCKS and b != SCORE_TAIL]


def partial_convs(model: Any, left_out: tuple[str, ...] = PARTIAL_FLOAT, depthwise: bool = True) -> set[str]:
    """Names of the point-wise convolutions (1x1 kernel over all input channels, ``group`` 1) of an
    ``onnx.ModelProto``, and with ``depthwise`` its grouped ones, but for those whose name contains one of
    ``left_out``. (Quantizing the point-wise ones alone leaves a dequantize and a layout change in front
    of every float32 depth-wise convolution, which costs what the integer kernels save.)"""
    kernels = {init.name: tuple(init.dims) for init in model.graph.initializer}
    names = set()
    for node in model.graph.node:
        if node.op_type != "Conv" or any(part in node.name for part in left_out):
            continue
        group = next((a.i for a in node.attribute if a.name == "group"), 1)
        kernel = kernels.get(node.input[1], ())
        if (group == 1 and len(kernel) == 4 and kernel[2:] == (1, 1)) or (depthwise and group > 1):
            names.add(node.name)
    return names


def with_activations(model: Any, convs: set[str]) -> set[str]:
    """``convs`` and the activations (:data:`ACTIVATIONS`) that read their outputs: quantized together, the
    activation's range becomes the convolution's output range."""
    outputs = {out for node in model.graph.node if node.name in convs for out in node.output}
    return convs | {n.name for n in model.graph.node if n.op_type in ACTIVATIONS and n.input[0] in outputs}


def float_nodes(model: Any, options: Int8Options) -> dict[str, list[str]]:
    """{block: names of its quantizable nodes kept in float32} of an ``onnx.ModelProto``."""
    partial = (with_activations(model, partial_convs(model, options.partial_float, options.partial_depthwise))
               if options.partial_blocks else set())
    kept: dict[str, list[str]] = {}
    for node in model.graph.node:
        block = block_of(node.name)
        if block not in options.float_blocks or (options.op_types is not None and node.op_type not in options.op_types):
            continue
        if block in options.partial_blocks and node.name in partial:
            continue
        kept.setdefault(block, []).append(node.name)
    return kept


def check_options(options: Int8Options) -> None:
    """ValueError naming what is wrong with ``options``."""
    if not 0.0 <= options.max_decision_change <= 1.0:
        raise ValueError(f"the share of decisions INT8 may change must be in [0, 1], got {options.max_decision_change}")
    bad = unknown_blocks(options.float_blocks) + unknown_blocks(options.partial_blocks)
    if bad:
        raise ValueError(f"unknown block(s) {bad}: the blocks are {', '.join([*BLOCKS, SCORE_TAIL])}")
    if not -1.0 <= options.min_rank_correlation <= 1.0:
        raise ValueError(f"the least rank correlation must be in [-1, 1], got {options.min_rank_correlation}")
    if options.calibration not in CALIBRATION_METHODS:
        raise ValueError(f"unknown calibration method {options.calibration!r}: one of {', '.join(CALIBRATION_METHODS)}")


class _FrameReader(CalibrationDataReader):
    """The quantizer's feed: uint8 frames, one per run (the ranges are the extremes over all runs)."""

    def __init__(self, frames: list[np.ndarray]) -> None:
        self._items = iter([{INPUT_IMAGE: f[None]} for f in frames])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._items, None)


def quantize_graph(src: Path, dst: Path, frames: list[np.ndarray], options: Int8Options,
                   ranges_cache: Path | None = None) -> int:
    """Quantize the float32 contract graph ``src`` into ``dst`` (QDQ, uint8 activations, int8 weights per
    output channel), ranges measured on ``frames`` (or read from ``ranges_cache`` when it exists); returns
    the number of quantized nodes."""
    reader = _FrameReader(frames)
    model = onnx.load(str(src))
    excluded = [name for names in float_nodes(model, options).values() for name in names]
    quantizable = [n for n in model.graph.node if options.op_types is None or n.op_type in options.op_types]
    with _quiet_root_logger():  # the quantizer logs its pre-processing advice on every call
        quantize_static(
            str(src), str(dst), reader, quant_format=QuantFormat.QDQ,
            op_types_to_quantize=list(options.op_types) if options.op_types is not None else None,
            per_channel=options.per_channel, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
            nodes_to_exclude=excluded, calibrate_method=CALIBRATION_METHODS[options.calibration],
            calibration_cache_path=str(ranges_cache) if ranges_cache is not None else None,
            # uint8 x int8 is the fast pair on x86 (VNNI's vpdpbusd); symmetric weights keep the zero point 0
            extra_options={"WeightSymmetric": True, "ActivationSymmetric": False,
                           "OpTypesToExcludeOutputQuantization": list(options.float_output_ops)},
        )
    return len(quantizable) - len(excluded)


@contextlib.contextmanager
def _quiet_root_logger() -> Iterator[None]:
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def _set_card(path: Path, card: ModelCard) -> None:
    model = onnx.load(str(path))
    del model.metadata_props[:]
    onnx.helper.set_model_props(model, {MODEL_CARD_KEY: card.to_json()})
    onnx.save(model, str(path))


def recalibrate(int8: OnnxModel, threshold_images: list[np.ndarray], calibration: Calibration,
                scale_images: int | None) -> tuple[Calibration, dict]:
    """The calibration of the INT8 graph: the float32 one's target rate, set on the INT8 graph's scores
    of the threshold images (and its pixel threshold on the calibrated map)."""
    scores = int8.predict(threshold_images).scores
    cal, stats = calibration_from_scores(scores, calibration.target_fpr, scale_images)
    return cal.on_calibrated_map(), stats


def rank_correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rank correlation of two score vectors (1: same order; ties broken by position)."""
    if len(a) != len(b):
        raise ValueError(f"rank correlation needs two score vectors of one length, got {len(a)} and {len(b)}")
    if len(a) < 2:
        return 1.0
    ranks = [np.argsort(np.argsort(x, kind="stable")).astype(np.float64) for x in (a, b)]
    return float(np.corrcoef(*ranks)[0, 1])


def compare(fp32: OnnxModel, int8: OnnxModel, images: Int8Images) -> dict[str, Any]:
    """Decisions (each graph at its own threshold) and raw-score differences over threshold + anomalous images."""
    frames = images.threshold + images.anomalous
    a, b = fp32.predict(frames), int8.predict(frames)
    cal_a, cal_b = fp32.card.calibration, int8.card.calibration
    flagged_a = np.asarray(cal_a.calibrated_score(a.log_odds)) >= DECISION_THRESHOLD
    flagged_b = np.asarray(cal_b.calibrated_score(b.log_odds)) >= DECISION_THRESHOLD
    diff = np.abs(a.scores.astype(np.float64) - b.scores.astype(np.float64)) * score_gain(cal_a)
    normal = len(images.threshold)  # the threshold images come first
    return {"images": len(frames), "anomalous_images": len(images.anomalous),
            "decisions_changed": int((flagged_a != flagged_b).sum()), "fp32_flagged": int(flagged_a.sum()),
            "int8_flagged": int(flagged_b.sum()), "max_score_diff": float(diff.max(initial=0.0)),
            "median_score_diff": float(np.median(diff)) if diff.size else 0.0,
            "normal_rank_correlation": rank_correlation(a.scores[:normal], b.scores[:normal]),
            "fp32_raw_threshold": cal_a.raw_threshold, "int8_raw_threshold": cal_b.raw_threshold}


def export_int8(model: Any, card: ModelCard, path: str | Path, images: Int8Images,
                options: Int8Options | Sequence[Int8Options] | None = None,
                verify_images: list[np.ndarray] | None = None) -> tuple[ModelCard, Int8Check]:
    """Write the INT8 graph of ``model`` (a calibrated SLSG whose float32 card is ``card``) to ``path``.

    ``options``: one :class:`Int8Options`, or several tried in order until one passes the decision
    guard (default :data:`PRESETS`). Returns the INT8 card (``precision: int8``, its own calibration)
    and the comparison with float32 (with the preset written and those refused before it).
    Raises ExportError, and leaves nothing at ``path``, when the float32 export fails its verification,
    or every option's INT8 graph changes the decision on more than its ``max_decision_change`` of the
    images or ranks the normal threshold images below its ``min_rank_correlation`` with float32.
    """
    ladder = list(PRESETS) if options is None else [options] if isinstance(options, Int8Options) else list(options)
    if not ladder:
        raise ValueError("no INT8 options to try")
    for each in ladder:
        check_options(each)
    if not images.train or not images.threshold:
        raise ExportError("INT8 export needs normal training images (activation ranges) and the held-out "
                          "threshold images (the INT8 graph's own threshold); none were found")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".int8-", dir=path.parent) as tmp_dir:
        tmp = Path(tmp_dir)
        fp32 = export_onnx(model, card, tmp / "fp32.onnx", verify_images=verify_images)
        card = fp32.card or card
        refused: list[dict[str, Any]] = []
        for i, each in enumerate(ladder):
            int8_card, check, graph = _quantize_and_check(model, card, tmp, i, images, each)
            if not _refusal(check, each):
                break
            refused.append({"preset": each.name, "decisions_changed": check.decisions_changed,
                            "images": check.images, "reason": _refusal(check, each)})
        else:
            tried = "; ".join(f"{r['preset']}: {r['reason']}" for r in refused) if len(refused) > 1 else refused[0]["reason"]
            raise ExportError(f"{tried}; {path} was not written")
        check = dataclasses.replace(check, preset=each.name, refused=refused)
        int8_card = dataclasses.replace(int8_card, extra={**int8_card.extra, "int8_check": check.to_dict()})
        _set_card(graph, int8_card)
        graph.chmod(0o644)
        os.replace(graph, path)
    return int8_card, check


def _refusal(check: Int8Check, options: Int8Options) -> str:
    """Why the guard refuses an INT8 graph ('' when it does not): too many decisions changed, or the
    normal images reordered."""
    if check.changed_share > options.max_decision_change:
        return (f"INT8 changes the decision on {check.decisions_changed} of {check.images} verification images "
                f"({check.changed_share:.1%} > {options.max_decision_change:.1%}; float32 flags "
                f"{check.fp32_flagged}, INT8 {check.int8_flagged}; max raw-score difference x slope "
                f"{check.max_score_diff:.3g})")
    if check.normal_rank_correlation < options.min_rank_correlation:
        return (f"INT8 reorders the normal threshold images: rank correlation with float32 "
                f"{check.normal_rank_correlation:.3f} < {options.min_rank_correlation:.3f}")
    return ""


def _quantize_and_check(model: Any, card: ModelCard, tmp: Path, attempt: int, images: Int8Images,
                        options: Int8Options) -> tuple[ModelCard, Int8Check, Path]:
    """Quantize ``tmp/fp32.onnx`` with ``options``, set the INT8 threshold on its own scores, write the
    recalibrated graph quantized with the same ranges, and compare it with float32; returns its card (no
    check yet), the comparison and the INT8 file."""
    work = tmp / str(attempt)
    work.mkdir()
    # activation ranges depend only on the images and the operators measured: shared between attempts
    ranges = tmp / f"ranges-{options.calibration}-{'+'.join(options.op_types or ('all',))}"
    quantize_graph(tmp / "fp32.onnx", work / "probe.onnx", images.train, options, ranges)
    cal, stats = recalibrate(OnnxModel(work / "probe.onnx"), images.threshold, card.calibration, images.scale_images)
    int8_card = dataclasses.replace(card, calibration=cal, precision=PRECISION_INT8,
                                    extra={**card.extra, "calibration_stats": stats,
                                           "fp32_calibration": dataclasses.asdict(card.calibration)})
    graph = InferenceGraph(model, int8_card.top_k, cal).eval()
    _write_onnx(graph, int8_card, work / "recalibrated.onnx", opset=17, dynamo=False)
    quantized = quantize_graph(work / "recalibrated.onnx", work / "int8.onnx", images.train, options, ranges)
    kept = {b: len(n) for b, n in float_nodes(onnx.load(str(work / "recalibrated.onnx")), options).items()}
    result = compare(OnnxModel(tmp / "fp32.onnx"), OnnxModel(work / "int8.onnx"), images)
    return int8_card, Int8Check(**result, quantized_nodes=quantized, float_nodes=kept), work / "int8.onnx"
