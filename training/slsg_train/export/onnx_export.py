"""Export a trained SLSG network (arXiv 2305.00398) as the ONNX graph of the model-repository
contract (``slsg.contract``), and prove it computes what PyTorch computes.

The graph takes uint8 RGB NHWC ``image`` and does the cast, scaling, ImageNet normalisation and
transpose itself, so clients send raw pixels. Outputs: ``anomaly_map`` (anomaly-class
probability, [N, 1, H, W]) and ``score`` ([N, 1], the top-K mean calibrated with the card's
``Calibration``: piecewise linear, 0.5 at the threshold, clipped to [0, 1]).

After the export, ONNX Runtime runs the file on random images (batch 1 and 3) and on any real
images given; if an output differs from PyTorch by more than the tolerance, or anything fails,
:class:`ExportError` is raised and nothing is left at the target path (the file is written to
a temporary name in the target folder and renamed only on success).
"""

from __future__ import annotations

import copy
import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from slsg.contract import (
    IMAGENET_MEAN, IMAGENET_STD, INPUT_IMAGE, MODEL_CARD_KEY, OUTPUT_ANOMALY_MAP, OUTPUT_SCORE,
    Calibration, ModelCard,
)
from slsg_train.models.slsg import SLSG, anomaly_probability, check_input_size

DEFAULT_TOLERANCE = 1e-4  # max abs difference ONNX Runtime vs PyTorch
RANDOM_BATCHES = (1, 3)  # batch sizes checked with random images (the batch axis is dynamic)


class ExportError(RuntimeError):
    """The ONNX export failed or its outputs do not match PyTorch's."""


@dataclass
class ExportCheck:
    path: Path
    max_map_diff: float  # largest |ORT - torch| of anomaly_map over all checked batches
    max_score_diff: float
    checked_images: int  # random + real images compared
    opset: int


def calibrate(raw: Tensor, calibration: Calibration) -> Tensor:
    """Torch version of ``Calibration.normalise`` (piecewise linear, 0.5 at raw_threshold, in [0, 1])."""
    thr = calibration.raw_threshold
    lo = min(calibration.score_min, thr - 1e-6)
    hi = max(calibration.score_max, thr + 1e-6)
    below = 0.5 * (raw - lo) / (thr - lo)
    above = 0.5 + 0.5 * (raw - thr) / (hi - thr)
    return torch.where(raw < thr, below, above).clamp(0.0, 1.0)


class InferenceGraph(nn.Module):
    """uint8 [N, H, W, 3] RGB -> (anomaly_map [N, 1, H, W], score [N, 1]), both float32."""

    def __init__(self, model: SLSG, top_k: int, calibration: Calibration) -> None:
        super().__init__()
        self.model = model
        self.top_k = top_k
        self.calibration = calibration
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1) * 255.0)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) * 255.0)

    def forward(self, image: Tensor) -> tuple[Tensor, Tensor]:
        # (x/255 - mean)/std == (x - 255*mean)/(255*std): one subtraction and one division.
        # the buffers' dtype (float32 when exported; float64 for the verification reference)
        x = ((image.permute(0, 3, 1, 2).to(self.mean.dtype) - self.mean) / self.std).contiguous()
        out = self.model(x)
        prob = anomaly_probability(out.logits)
        raw = self.model.score_images(out, self.top_k).unsqueeze(1)  # [N, 1]
        return prob, calibrate(raw, self.calibration)


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
    names = dict(input_names=[INPUT_IMAGE], output_names=[OUTPUT_ANOMALY_MAP, OUTPUT_SCORE])
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
                dynamic_axes={INPUT_IMAGE: batch, OUTPUT_ANOMALY_MAP: batch, OUTPUT_SCORE: batch}, **names,
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


def _max_diffs(onnx_out: list[np.ndarray], reference: tuple[Tensor, Tensor], size: int) -> tuple[float, float]:
    (onnx_map, onnx_score), (torch_map, torch_score) = onnx_out, reference
    if onnx_map.shape != tuple(torch_map.shape) or onnx_score.shape != tuple(torch_score.shape):
        raise ExportError(
            f"ONNX output shapes {onnx_map.shape}, {onnx_score.shape} differ from PyTorch's "
            f"{tuple(torch_map.shape)}, {tuple(torch_score.shape)} for a batch of {size}"
        )
    return (float(np.abs(onnx_map - torch_map.double().numpy()).max()),
            float(np.abs(onnx_score - torch_score.double().numpy()).max()))


def verify_onnx(path: Path, graph: InferenceGraph, batches: list[np.ndarray],
                tolerance: float = DEFAULT_TOLERANCE) -> tuple[float, float]:
    """Max abs differences (anomaly_map, score) between ONNX Runtime and PyTorch over ``batches``.

    The graph block's k-NN picks neighbours by ``topk`` over similarities, so a near-tie can
    resolve differently under two float32 kernel libraries and move a patch of the map by up to
    ~4e-3 (seen on a trained model: one node of 256 flipped). Where float32 PyTorch and ONNX Runtime
    differ by more than ``tolerance``, the batch is re-run in float64 PyTorch, which settles the
    near-tie, and ONNX Runtime must agree with that within ``tolerance``.
    """
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    reference64: InferenceGraph | None = None
    diff_map = diff_score = 0.0
    for batch in batches:
        onnx_out = session.run([OUTPUT_ANOMALY_MAP, OUTPUT_SCORE], {INPUT_IMAGE: batch})
        with torch.no_grad():
            diffs = _max_diffs(onnx_out, graph(torch.from_numpy(batch)), len(batch))
            if not max(diffs) <= tolerance:
                reference64 = reference64 or copy.deepcopy(graph).double()
                diffs = min(diffs, _max_diffs(onnx_out, reference64(torch.from_numpy(batch)), len(batch)), key=max)
        diff_map, diff_score = max(diff_map, diffs[0]), max(diff_score, diffs[1])
    return diff_map, diff_score


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
    """
    path = Path(path)
    verify_images = list(verify_images or [])
    _check_inputs(card, verify_images)
    branch = getattr(model, "global_branch", None)
    if branch is not None and not bool(branch.fitted):
        raise ExportError("the model's global branch was never fitted (training fits it before calibration); "
                          "export a checkpoint of a finished run")
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
            diff_map, diff_score = verify_onnx(tmp, graph, batches, tolerance)
        except ExportError:
            raise
        except Exception as exc:
            raise ExportError(f"ONNX export of {path} failed: {type(exc).__name__}: {exc}") from exc
        worst = max(diff_map, diff_score)
        if not worst <= tolerance:  # also catches NaN
            raise ExportError(
                f"ONNX Runtime differs from PyTorch by {worst:.3g} (anomaly_map {diff_map:.3g}, "
                f"score {diff_score:.3g}) > tolerance {tolerance:g}; {path} was not written"
            )
        tmp.chmod(0o644)  # mkstemp makes 0600; a serving container may run as another user
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
        model.train(was_training)
    return ExportCheck(path, diff_map, diff_score, sum(len(b) for b in batches), opset)
