"""Score frames with an exported model file through ONNX Runtime: what a server computes, with the raw
log-odds the graph calibrates, so an exported graph (float32 or INT8) can be evaluated and calibrated on
its own scores instead of the checkpoint's.

The contract graph ends in the calibration tail of ``slsg_train.export.onnx_export.calibrate``: each
output is ``Where(Less(log_odds, threshold), below, above)``. :func:`calibration_inputs` finds the
``log_odds`` tensor of each output by that structure, and :class:`OnnxModel` runs the graph with those
tensors as extra outputs (an in-memory copy; the file is not changed).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from slsg.contract import INPUT_IMAGE, MODEL_CARD_KEY, OUTPUT_ANOMALY_MAP, OUTPUT_SCORE, ModelCard
from slsg_train.inference import Prediction


class OnnxModelError(ValueError):
    """An ONNX file that is not an SLSG contract graph with a calibration tail."""


def calibration_inputs(model: Any) -> dict[str, str]:
    """{contract output: name of the log-odds tensor its calibration tail maps} of an ``onnx.ModelProto``."""
    producers = {out: node for node in model.graph.node for out in node.output}
    found = {}
    for output in (OUTPUT_ANOMALY_MAP, OUTPUT_SCORE):
        where = producers.get(output)
        less = producers.get(where.input[0]) if where is not None and where.op_type == "Where" else None
        if less is None or less.op_type != "Less":
            raise OnnxModelError(f"output {output!r} is not made by the calibration tail (Where(Less(log_odds, "
                                 "threshold), ...)): not a graph of `slsg export`, or one from before the "
                                 "calibrated anomaly map")
        found[output] = less.input[0]
    return found


def read_card(model: Any) -> ModelCard:
    """The model card in an ``onnx.ModelProto``'s metadata."""
    meta = {p.key: p.value for p in model.metadata_props}
    if MODEL_CARD_KEY not in meta:
        raise OnnxModelError(f"the ONNX model has no {MODEL_CARD_KEY!r} metadata: not an SLSG export")
    return ModelCard.from_json(meta[MODEL_CARD_KEY])


def _with_log_odds_outputs(model: Any, tensors: dict[str, str]) -> Any:
    import onnx

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    for tensor in tensors.values():
        probe.graph.output.append(onnx.helper.make_tensor_value_info(tensor, onnx.TensorProto.FLOAT, None))
    return probe


class OnnxModel:
    """An exported model file run by ONNX Runtime on the CPU, scoring as :func:`slsg_train.inference.predict` does."""

    def __init__(self, path: str | Path, threads: int = 0) -> None:
        import onnx
        import onnxruntime as ort

        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"ONNX model {self.path} does not exist")
        model = onnx.load(str(self.path))
        self.card = read_card(model)
        self._log_odds = calibration_inputs(model)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads  # 0: ONNX Runtime's default (all cores)
        options.log_severity_level = 3
        probe = _with_log_odds_outputs(model, self._log_odds)
        self.session = ort.InferenceSession(probe.SerializeToString(), options, providers=["CPUExecutionProvider"])

    @property
    def image_size(self) -> tuple[int, int]:
        return self.card.input_height, self.card.input_width

    def run(self, frames: np.ndarray) -> dict[str, np.ndarray]:
        """The contract outputs and the raw log-odds (``score_log_odds`` [N], ``map_log_odds`` [N, H, W]) of
        uint8 ``frames`` [N, H, W, 3]."""
        names = [OUTPUT_ANOMALY_MAP, OUTPUT_SCORE, self._log_odds[OUTPUT_ANOMALY_MAP], self._log_odds[OUTPUT_SCORE]]
        amap, score, map_lo, score_lo = self.session.run(names, {INPUT_IMAGE: frames})
        return {OUTPUT_ANOMALY_MAP: amap, OUTPUT_SCORE: score,
                "map_log_odds": map_lo.reshape(len(frames), *self.image_size),
                "score_log_odds": score_lo.reshape(len(frames))}

    def predict(self, images: list[np.ndarray], batch_size: int = 8) -> Prediction:
        """Probability maps, raw scores and their log-odds for uint8 frames at the model's input size."""
        maps, scores, log_odds, map_log_odds = [], [], [], []
        for start in range(0, len(images), batch_size):
            out = self.run(np.stack(images[start:start + batch_size]))
            maps.append(_sigmoid(out["map_log_odds"]))
            scores.append(_sigmoid(out["score_log_odds"]))
            log_odds.append(out["score_log_odds"].astype(np.float32))
            map_log_odds.append(out["map_log_odds"].astype(np.float32))
        if not maps:
            empty, no_maps = np.zeros((0,), np.float32), np.zeros((0, 0, 0), np.float32)
            return Prediction(no_maps, empty, empty, no_maps)
        return Prediction(np.concatenate(maps), np.concatenate(scores), np.concatenate(log_odds),
                          np.concatenate(map_log_odds))

    def describe(self) -> dict[str, Any]:
        """What an evaluation report says about the model: the file, its card's name, precision and step."""
        return {"path": str(self.path), "name": self.card.name, "precision": self.card.precision,
                "step": self.card.extra.get("checkpoint_step"), "backbone": self.card.backbone,
                "card": json.loads(self.card.to_json())["calibration"]}


def _sigmoid(log_odds: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        return (1.0 / (1.0 + np.exp(-log_odds.astype(np.float64)))).astype(np.float32)


class OnnxLoadedModel:
    """An exported model file in the place of a :class:`LoadedModel` for the evaluation: its ``model`` is
    the :class:`OnnxModel`; its size, top-K, calibration and resize filter are the card's."""

    def __init__(self, onnx_model: OnnxModel):
        self.model = onnx_model
        card = onnx_model.card
        self.category, self.image_size, self.top_k = card.category, onnx_model.image_size, card.top_k
        self.calibration, self.resize = card.calibration, card.resize
        self.has_checks = bool(card.calibration.scale_images)

    def describe(self) -> dict[str, Any]:
        return {**self.model.describe(), "image_size": list(self.image_size)}


def load_onnx_model(path: str | Path, threads: int = 0) -> OnnxLoadedModel:
    """An exported model file, ready for ``evaluate_category``."""
    return OnnxLoadedModel(OnnxModel(path, threads))
