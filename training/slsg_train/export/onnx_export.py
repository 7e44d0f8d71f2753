"""Export a trained SLSG network (arXiv 2305.00398) as the ONNX graph of the model-repository
contract (``slsg.contract``), and prove it computes what PyTorch computes.

The graph takes uint8 RGB NHWC ``image`` and does the cast, scaling, ImageNet normalisation and
transpose itself, so clients send raw pixels. Outputs: ``score`` ([N, 1], the top-K mean calibrated
with the card's ``Calibration``: 0.5 at the threshold, in [0, 1], from the top-K mean's log-odds,
which the graph takes from the logits so that clear anomalies do not all round to 1) and
``anomaly_map`` ([N, 1, H, W], each pixel's anomaly probability through the same calibration, from
its log-odds: 0.5 at the threshold, and strong anomalies, whose probabilities are all 1.0 in
float32, keep their order). A model with a fitted component check that found part kinds has a third
output, ``part_counts`` ([N, K]: the parts found per kind, in the card's ``part_kinds`` order), which
must equal the check's counts exactly.

After the export, ONNX Runtime runs the file on random images (batch 1 and 3) and on any real
images given; if an output differs from PyTorch by more than the tolerance, or anything fails,
:class:`ExportError` is raised and nothing is left at the target path (the file is written to
a temporary name in the target folder and renamed only on success).
"""

from __future__ import annotations

import copy
import dataclasses
import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from slsg.contract import (
    ANOMALY_MAP_CALIBRATED, IMAGENET_MEAN, IMAGENET_STD, INPUT_IMAGE, MODEL_CARD_KEY, OUTPUT_ANOMALY_MAP,
    OUTPUT_PART_COUNTS, OUTPUT_SCORE, Calibration, ModelCard,
)
from slsg_train.models.slsg import SLSG, check_input_size

DEFAULT_TOLERANCE = 1e-4  # max abs difference ONNX Runtime vs PyTorch
# Graph k-NN near-ties: candidate pairs ranked within this much of each other (float64) may be ranked
# the other way by another float32 kernel library; the verification tries each such flip (closest first).
NEAR_TIE_MARGIN = 1e-5
MAX_NEAR_TIE_FLIPS = 32
RANDOM_BATCHES = (1, 3)  # batch sizes checked with random images (the batch axis is dynamic)


class ExportError(RuntimeError):
    """The ONNX export failed or its outputs do not match PyTorch's."""


@dataclass
class ExportCheck:
    path: Path
    max_map_diff: float  # largest |ORT - torch| of anomaly_map over all checked batches / score_gain
    max_score_diff: float  # ... and of the score
    checked_images: int  # random + real images compared
    opset: int
    near_tie_images: int = 0  # images accepted under the near-tie rule (see verify_onnx)
    card: ModelCard | None = None  # the card written into the file (with the part kinds it counts)


def calibrate(log_odds: Tensor, calibration: Calibration) -> Tensor:
    """Torch version of ``Calibration.calibrated_score``: raw scores' log-odds -> [0, 1], 0.5 at the threshold."""
    # folded into as few elementwise ops as the formula allows: the graph runs it on every map pixel
    floor, threshold, scale = calibration.score_floor(), calibration.log_odds_threshold(), calibration.log_odds_scale()
    slope = 0.5 / (calibration.raw_threshold - floor)
    below = torch.relu(torch.sigmoid(log_odds) * slope - floor * slope)  # <= 0.5 where it is taken
    above = 1.0 - (0.5 * scale) / (torch.relu(log_odds - threshold) + scale)  # in [0.5, 1)
    return torch.where(log_odds < threshold, below, above)


def part_columns(model: SLSG) -> list[int]:
    """The component check's part-kind clusters (the ``part_counts`` columns); [] without a fitted check."""
    check = getattr(model, "component_check", None)
    return check.part_columns() if check is not None and bool(check.fitted) else []


def with_part_kinds(card: ModelCard, model: SLSG) -> ModelCard:
    """``card`` listing the part kinds ``model`` counts (kept when it lists them already, the same number)."""
    columns = part_columns(model)
    if card.part_kinds and len(card.part_kinds) != len(columns):
        raise ExportError(f"the card lists {len(card.part_kinds)} part kinds, the model's component check counts "
                          f"{len(columns)}")
    if card.part_kinds or not columns:
        return card
    return dataclasses.replace(card, part_kinds=model.component_check.part_kinds())


class InferenceGraph(nn.Module):
    """uint8 [N, H, W, 3] RGB -> (anomaly_map [N, 1, H, W], score [N, 1]), both float32 and calibrated,
    and with counted part kinds (:func:`part_columns`) part_counts [N, K]."""

    def __init__(self, model: SLSG, top_k: int, calibration: Calibration) -> None:
        super().__init__()
        self.model = model
        self.top_k = top_k
        self.calibration = calibration
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1) * 255.0)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) * 255.0)
        columns = part_columns(model)
        self.counts_parts = bool(columns)
        self.register_buffer("columns", torch.tensor(columns, dtype=torch.long))

    def output_names(self) -> list[str]:
        return [OUTPUT_ANOMALY_MAP, OUTPUT_SCORE] + ([OUTPUT_PART_COUNTS] if self.counts_parts else [])

    def forward(self, image: Tensor) -> tuple[Tensor, ...]:
        # (x/255 - mean)/std == (x - 255*mean)/(255*std): one subtraction and one division.
        # the buffers' dtype (float32 when exported; float64 for the verification reference)
        x = ((image.permute(0, 3, 1, 2).to(self.mean.dtype) - self.mean) / self.std).contiguous()
        out = self.model(x)
        fused = self.model.anomaly_log_odds(out)
        log_odds = self.model.score_log_odds(out, self.top_k, fused).unsqueeze(1)  # [N, 1]
        outputs = (calibrate(fused, self.calibration), calibrate(log_odds, self.calibration))
        if not self.counts_parts:
            return outputs
        # the reference encoder and the segmentation run again here; ONNX Runtime's common subexpression
        # elimination merges them with the check's own (same inputs, same nodes)
        counts = self.model.component_check.counts(x, self.model.reference_encoder(x))
        return (*outputs, counts.index_select(1, self.columns))


def _maps_and_scores(graph: InferenceGraph, frames: np.ndarray) -> tuple[Tensor, Tensor]:
    """The graph's (anomaly_map, score) for uint8 ``frames``, without the part counts."""
    out = graph(torch.from_numpy(frames))
    return out[0], out[1]


def _check_inputs(card: ModelCard, verify_images: list[np.ndarray]) -> None:
    check_input_size(card.input_height, card.input_width)
    expected = (card.input_height, card.input_width, 3)
    for i, img in enumerate(verify_images):
        if not isinstance(img, np.ndarray) or img.dtype != np.uint8 or img.shape != expected:
            got = (getattr(img, "shape", None), getattr(img, "dtype", type(img).__name__))
            raise ExportError(f"verify image {i}: expected a uint8 array of shape {expected}, got shape/dtype {got}")


def _write_onnx(graph: InferenceGraph, card: ModelCard, path: Path, opset: int, dynamo: bool) -> None:
    """Export to one self-contained file and put the card into the metadata.

    Both torch 2.13 exporters produce matching graphs; the TorchScript one (dynamo=False) is
    the default because it takes about 0.5 s against about 10 s for torch.export.
    """
    import onnx

    # torch.export specialises a batch of 1, so the dynamo path traces a batch of 2.
    dummy = torch.zeros(2 if dynamo else 1, card.input_height, card.input_width, 3, dtype=torch.uint8)
    names = dict(input_names=[INPUT_IMAGE], output_names=graph.output_names())
    batch = {0: "batch"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer / deprecation chatter
        if dynamo:
            torch.onnx.export(
                graph, (dummy,), str(path), dynamo=True, opset_version=opset, external_data=False,
                dynamic_shapes=({0: torch.export.Dim("batch")},), **names,
            )
        else:
            torch.onnx.export(
                graph, (dummy,), str(path), dynamo=False, opset_version=opset, do_constant_folding=True,
                dynamic_axes={name: batch for name in [INPUT_IMAGE, *graph.output_names()]}, **names,
            )
    model = onnx.load(str(path))
    onnx.helper.set_model_props(model, {MODEL_CARD_KEY: card.to_json()})
    onnx.checker.check_model(model)
    onnx.save(model, str(path), save_as_external_data=False)


def _verify_batches(card: ModelCard, verify_images: list[np.ndarray]) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    shape = (card.input_height, card.input_width, 3)
    batches = [rng.integers(0, 256, size=(n, *shape), dtype=np.uint8) for n in RANDOM_BATCHES]
    if verify_images:
        batches.append(np.stack(verify_images))
    return batches


def score_gain(calibration: Calibration) -> float:
    """The calibrated score's steepest slope over the raw score below the threshold, at least 1 (above
    it, the slope over the raw score's log-odds is at most 0.5). Normal calibration scores that lie
    close together (a few images, or all on one check's value) make it steep: a float32 rounding of
    the raw score then moves the calibrated one by thousands of times as much."""
    return max(1.0, 0.5 / (calibration.raw_threshold - calibration.score_floor()))


def _image_diffs(onnx_out: list[np.ndarray], reference: tuple[Tensor, Tensor], size: int,
                 gain: float) -> np.ndarray:
    """[N, 2]: per image, max |ORT - reference| of the anomaly map and of the score, both divided by
    ``gain`` (:func:`score_gain`): in the units of the raw probabilities they were calibrated from."""
    (onnx_map, onnx_score), (torch_map, torch_score) = onnx_out, reference
    if onnx_map.shape != tuple(torch_map.shape) or onnx_score.shape != tuple(torch_score.shape):
        raise ExportError(
            f"ONNX output shapes {onnx_map.shape}, {onnx_score.shape} differ from PyTorch's "
            f"{tuple(torch_map.shape)}, {tuple(torch_score.shape)} for a batch of {size}"
        )
    map_diff = np.abs(onnx_map - torch_map.double().numpy()).reshape(size, -1).max(axis=1) / gain
    score_diff = np.abs(onnx_score - torch_score.double().numpy()).reshape(size, -1).max(axis=1) / gain
    return np.stack([map_diff, score_diff], axis=1)


def _run_capturing_graph_input(reference64: InferenceGraph, frame: np.ndarray) -> tuple[tuple[Tensor, Tensor], Tensor]:
    """The float64 graph's outputs for one ``frame``, and the graph block's input on the way."""
    captured: dict[str, Tensor] = {}
    # the hook returns None: a hook that returns a value replaces the block's output with it
    hook = reference64.model.graph.register_forward_hook(lambda m, args, out: captured.update(x=args[0]))
    try:
        outputs = _maps_and_scores(reference64, frame[None])
    finally:
        hook.remove()
    return outputs, captured["x"]


def _matches_a_near_tie_flip(reference64: InferenceGraph, onnx_out: list[np.ndarray], frame: np.ndarray,
                             graph_input: Tensor, tolerance: float, gain: float) -> bool:
    """Whether ONNX Runtime's outputs for one ``frame`` equal (within ``tolerance``) the float64 graph's
    with one near-tie of the graph's neighbour ranking (for block input ``graph_input``) resolved the
    other way."""
    graph_block = reference64.model.graph
    nodes = graph_input.shape[2] * graph_input.shape[3]
    try:
        for tie in graph_block.near_ties(graph_input, NEAR_TIE_MARGIN)[:MAX_NEAR_TIE_FLIPS]:
            offset = torch.zeros(1, nodes, nodes, dtype=graph_input.dtype)
            offset[0, tie.node, tie.lower] = 2 * tie.gap + 1e-12  # the lower candidate now ranks just above
            graph_block.similarity_offset = offset
            flipped = _image_diffs(onnx_out, _maps_and_scores(reference64, frame[None]), 1, gain)
            if flipped.max() <= tolerance:
                return True
    finally:
        graph_block.similarity_offset = None
    return False


def verify_onnx(path: Path, graph: InferenceGraph, batches: list[np.ndarray],
                tolerance: float = DEFAULT_TOLERANCE) -> ExportCheck:
    """Compare ONNX Runtime with PyTorch over ``batches``, image by image; raise ExportError on a mismatch.

    The graph block picks neighbours by ranking similarities, and a trained model has candidate pairs
    whose similarities differ by less than float32 rounding (~1e-6), so two kernel libraries may pick
    another neighbour for a node and move a patch of the map (seen: up to ~4e-3). An image counts as
    matching when ONNX Runtime agrees within ``tolerance`` with float32 PyTorch, or with float64
    PyTorch (which settles ties float32 got wrong), or with float64 PyTorch after one near-tie
    (gap < ``NEAR_TIE_MARGIN``) is resolved the other way: then the only difference is that choice.
    Both outputs' differences are divided by the calibration's slope (:func:`score_gain`), so the
    tolerance is in raw probability wherever the calibration is steep.
    """
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    gain = score_gain(graph.calibration)
    reference64: InferenceGraph | None = None
    worst, near_ties = np.zeros(2), 0
    for batch in batches:
        onnx_out = session.run([OUTPUT_ANOMALY_MAP, OUTPUT_SCORE], {INPUT_IMAGE: batch})
        with torch.no_grad():
            diffs = _image_diffs(onnx_out, _maps_and_scores(graph, batch), len(batch), gain)
            for i in np.flatnonzero(~(diffs.max(axis=1) <= tolerance)):  # also catches NaN
                reference64 = reference64 or copy.deepcopy(graph).double()
                one = [out[i:i + 1] for out in onnx_out]
                outputs64, graph_input = _run_capturing_graph_input(reference64, batch[i])
                diffs64 = _image_diffs(one, outputs64, 1, gain)[0]
                if diffs64.max() <= tolerance:
                    diffs[i] = diffs64
                elif _matches_a_near_tie_flip(reference64, one, batch[i], graph_input, tolerance, gain):
                    near_ties += 1
                    diffs[i] = 0.0  # counted separately: the outputs match once that tie is flipped
                else:
                    raise ExportError(
                        f"ONNX Runtime differs from PyTorch by {diffs[i].max():.3g} (anomaly_map {diffs[i, 0]:.3g}, "
                        f"score {diffs[i, 1]:.3g}, over the calibration's slope) > tolerance {tolerance:g}")
        worst = np.maximum(worst, diffs.max(axis=0))
    if graph.counts_parts:
        _verify_counts(session, graph, batches)
    return ExportCheck(path, float(worst[0]), float(worst[1]), sum(len(b) for b in batches), 0, near_ties)


def _verify_counts(session, graph: InferenceGraph, batches: list[np.ndarray]) -> None:
    """ONNX Runtime's part counts must equal PyTorch's exactly: they are whole numbers the answer shows.
    Where float32 PyTorch differs, float64 PyTorch decides, as for the maps: a part whose area or
    cluster lies within float32 rounding of a boundary may fall either way in two kernel libraries."""
    reference64: InferenceGraph | None = None
    for batch in batches:
        (onnx_counts,) = session.run([OUTPUT_PART_COUNTS], {INPUT_IMAGE: batch})
        with torch.no_grad():
            torch_counts = graph(torch.from_numpy(batch))[2].numpy()
            if onnx_counts.shape == torch_counts.shape and not np.array_equal(onnx_counts, torch_counts):
                reference64 = reference64 or copy.deepcopy(graph).double()
                torch_counts = reference64(torch.from_numpy(batch))[2].numpy()
        if onnx_counts.shape != torch_counts.shape or not np.array_equal(onnx_counts, torch_counts):
            raise ExportError(f"ONNX Runtime's part counts {onnx_counts.tolist()} differ from PyTorch's "
                              f"{torch_counts.tolist()} for a batch of {len(batch)}")


def export_onnx(
    model: SLSG,
    card: ModelCard,
    path: str | Path,
    verify_images: list[np.ndarray] | None = None,
    opset: int = 17,
    tolerance: float = DEFAULT_TOLERANCE,
    dynamo: bool = False,
) -> ExportCheck:
    """Export ``model`` with ``card`` as metadata to ``path`` (a single .onnx file) and verify it.

    ``verify_images``: real uint8 RGB images of the card's input size, checked in addition to
    random ones. Raises :class:`ExportError` (and leaves nothing at ``path``) if ONNX Runtime
    differs from PyTorch by more than ``tolerance`` (max abs) or any step fails.
    ``dynamo`` selects torch.export instead of the (faster) TorchScript exporter.
    A fitted component check adds ``part_counts`` and the part kinds to the card (:func:`with_part_kinds`);
    the returned check's ``card`` is the card written.
    """
    path = Path(path)
    verify_images = list(verify_images or [])
    _check_inputs(card, verify_images)
    if card.anomaly_map_scale != ANOMALY_MAP_CALIBRATED:
        raise ExportError(f"the card says anomaly_map_scale {card.anomaly_map_scale!r}, but the graph writes a "
                          f"{ANOMALY_MAP_CALIBRATED!r} map (and the card's pixel threshold on it: "
                          "Calibration.on_calibrated_map)")
    for check in model.checks:
        if not bool(check.fitted):
            raise ExportError(f"the model's {check.name.replace('_', ' ')} was never fitted (training fits it before "
                              "calibration); export a checkpoint of a finished run")
    card = with_part_kinds(card, model)
    graph = InferenceGraph(model, card.top_k, card.calibration).eval()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".onnx.tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    was_training = model.training
    try:
        model.eval()
        batches = _verify_batches(card, verify_images)
        try:
            _write_onnx(graph, card, tmp, opset, dynamo)
            check = verify_onnx(tmp, graph, batches, tolerance)
        except ExportError as exc:
            raise ExportError(f"{exc}; {path} was not written") from None
        except Exception as exc:
            raise ExportError(f"ONNX export of {path} failed: {type(exc).__name__}: {exc}") from exc
        tmp.chmod(0o644)  # mkstemp makes 0600; a serving container may run as another user
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
        model.train(was_training)
    return dataclasses.replace(check, path=path, opset=opset, card=card)
