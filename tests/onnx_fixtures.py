"""A tiny ONNX model with the exact SLSG repository signature, for serving-side tests.

It is a real ONNX graph (run by ONNX Runtime and Triton for real): the anomaly map is the
per-pixel "redness" max(0, R - (G + B) / 2) / 255, and the raw score is the map's mean of
the top-K pixels, calibrated with the card's ``Calibration`` (``Calibration.calibrated_score`` of
its log-odds). So tests can make anomalous
frames on purpose by painting red patches on a grey image.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from slsg.contract import (
    ANOMALY_MAP_PROBABILITY, INPUT_IMAGE, MODEL_CARD_KEY, OUTPUT_ANOMALY_MAP, OUTPUT_SCORE, Calibration, ModelCard,
)


def make_card(name: str = "toy", size: int = 64, top_k: int = 16, **kw) -> ModelCard:
    cal = kw.pop("calibration", Calibration(raw_threshold=0.3, score_min=0.0, pixel_threshold=0.3,
                                            num_images=60, score_median=0.05))
    kw.setdefault("anomaly_map_scale", ANOMALY_MAP_PROBABILITY)  # the map is redness, not calibrated
    return ModelCard(name=name, category="toy", backbone="redness", input_height=size, input_width=size,
                     top_k=top_k, calibration=cal, project_version="test", **kw)


def write_contract_model(path: str | Path, card: ModelCard, signal: str = "redness") -> Path:
    """Write ``model.onnx`` with the contract's inputs/outputs and ``card`` as metadata.

    ``signal="brightness"`` makes the map each pixel's mean of R, G, B / 255 instead of its redness:
    a model that tells a white frame from a grey one.
    """
    if signal not in ("redness", "brightness"):
        raise ValueError(f"signal must be 'redness' or 'brightness', got {signal!r}")
    import onnx
    from onnx import TensorProto, helper

    h, w, k = card.input_height, card.input_width, card.top_k
    cal = card.calibration
    lo = cal.score_floor()
    c = lambda name, value, dtype=np.float32: helper.make_tensor(  # noqa: E731
        name, TensorProto.FLOAT if dtype == np.float32 else TensorProto.INT64,
        [len(np.atleast_1d(value))], np.atleast_1d(np.asarray(value, dtype)).tolist())
    inits = [
        c("inv255", 1 / 255) if signal == "redness" else c("inv765", 1 / 765),
        c("half", 0.5), c("zero", 0.0), c("one", 1.0),
        c("idx_r", [0], np.int64), c("idx_g", [1], np.int64), c("idx_b", [2], np.int64),
        c("perm_shape", [0, 1, h * w], np.int64), c("k", [k], np.int64),
        c("thr", cal.raw_threshold), c("lo", lo), c("slope_lo", 0.5 / (cal.raw_threshold - lo)),
        c("log_odds_thr", cal.log_odds_threshold()), c("log_odds_scale", cal.log_odds_scale()),
    ]
    nodes = [
        helper.make_node("Cast", [INPUT_IMAGE], ["xf"], to=TensorProto.FLOAT),
        helper.make_node("Transpose", ["xf"], ["nchw"], perm=[0, 3, 1, 2]),
        helper.make_node("Gather", ["nchw", "idx_r"], ["r"], axis=1),
        helper.make_node("Gather", ["nchw", "idx_g"], ["g"], axis=1),
        helper.make_node("Gather", ["nchw", "idx_b"], ["b"], axis=1),
        helper.make_node("Add", ["g", "b"], ["gb"]),
        *([helper.make_node("Mul", ["gb", "half"], ["gb2"]),
           helper.make_node("Sub", ["r", "gb2"], ["red"]),
           helper.make_node("Relu", ["red"], ["red_pos"]),
           helper.make_node("Mul", ["red_pos", "inv255"], [OUTPUT_ANOMALY_MAP])] if signal == "redness" else
          [helper.make_node("Add", ["gb", "r"], ["rgb"]),
           helper.make_node("Mul", ["rgb", "inv765"], [OUTPUT_ANOMALY_MAP])]),
        helper.make_node("Reshape", [OUTPUT_ANOMALY_MAP, "perm_shape"], ["flat"]),
        helper.make_node("TopK", ["flat", "k"], ["topv", "topi"], axis=-1),
        helper.make_node("ReduceMean", ["topv"], ["raw3"], axes=[-1], keepdims=0),  # [N, 1]
        # calibration: below = (raw - lo) * slope_lo; above = 1 - 0.5 / (1 + max(L - L_thr, 0) / scale),
        # L = log(raw) - log(1 - raw) (infinite at raw 1, where the score is 1)
        helper.make_node("Sub", ["raw3", "lo"], ["d_lo"]),
        helper.make_node("Mul", ["d_lo", "slope_lo"], ["below"]),
        helper.make_node("Sub", ["one", "raw3"], ["raw_c"]),
        helper.make_node("Log", ["raw3"], ["log_raw"]),
        helper.make_node("Log", ["raw_c"], ["log_raw_c"]),
        helper.make_node("Sub", ["log_raw", "log_raw_c"], ["log_odds"]),
        helper.make_node("Sub", ["log_odds", "log_odds_thr"], ["margin0"]),
        helper.make_node("Max", ["margin0", "zero"], ["margin"]),
        helper.make_node("Div", ["margin", "log_odds_scale"], ["units"]),
        helper.make_node("Add", ["units", "one"], ["units1"]),
        helper.make_node("Div", ["half", "units1"], ["rest"]),
        helper.make_node("Sub", ["one", "rest"], ["above"]),
        helper.make_node("Less", ["raw3", "thr"], ["is_below"]),
        helper.make_node("Where", ["is_below", "below", "above"], ["unclipped"]),
        helper.make_node("Clip", ["unclipped", "zero", "one"], [OUTPUT_SCORE]),
    ]
    graph = helper.make_graph(
        nodes, "slsg_contract_toy",
        [helper.make_tensor_value_info(INPUT_IMAGE, TensorProto.UINT8, ["batch", h, w, 3])],
        [helper.make_tensor_value_info(OUTPUT_ANOMALY_MAP, TensorProto.FLOAT, ["batch", 1, h, w]),
         helper.make_tensor_value_info(OUTPUT_SCORE, TensorProto.FLOAT, ["batch", 1])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.helper.set_model_props(model, {MODEL_CARD_KEY: card.to_json()})
    onnx.checker.check_model(model)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def write_int8_contract_model(path: str | Path, card: ModelCard, signal: str = "redness") -> Path:
    """The toy contract model quantized by ONNX Runtime's static quantizer (QDQ: uint8 activations around
    its Mul and Relu, ranges from grey frames with red patches), with ``card`` marked ``precision: int8``:
    a real INT8 graph of the contract signature, as ``slsg export --precision int8`` writes one."""
    import dataclasses
    import tempfile

    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    from slsg.contract import PRECISION_INT8

    card = dataclasses.replace(card, precision=PRECISION_INT8)
    rng = np.random.default_rng(0)
    frames = rng.integers(90, 110, (6, card.input_height, card.input_width, 3), dtype=np.uint8)
    for i, frame in enumerate(frames):
        frame[2:2 + 3 * i, 4:4 + 3 * i] = (255, 40, 40)

    class Frames(CalibrationDataReader):
        def __init__(self) -> None:
            self.items = iter([{INPUT_IMAGE: f[None]} for f in frames])

        def get_next(self):
            return next(self.items, None)

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        fp32 = write_contract_model(Path(tmp) / "fp32.onnx", card, signal)
        quantize_static(str(fp32), str(path), Frames(), quant_format=QuantFormat.QDQ, op_types_to_quantize=["Mul", "Relu"],
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    model = onnx.load(str(path))
    if not any(n.op_type == "QuantizeLinear" for n in model.graph.node):
        raise RuntimeError("the quantizer left the toy graph unquantized")
    del model.metadata_props[:]
    onnx.helper.set_model_props(model, {MODEL_CARD_KEY: card.to_json()})
    onnx.save(model, str(path))
    return path


def slsg_alone_with_varied_head():
    """The default preset's SLSG without reference checks, its head re-initialised N(0, 0.05) so the map
    varies a lot from image to image (the authors' N(0, 0.02) init gives an almost constant 0.5 map that
    would hide export mismatches). Imports torch lazily: gateway tests use this module without it."""
    import torch
    from torch import nn

    from slsg_train.models import SLSG, preset

    torch.manual_seed(0)
    net = SLSG(preset("default", patch_memory=False, composition_check=False, component_check=False))
    for m in net.head_modules():
        for conv in (c for c in m.modules() if isinstance(c, nn.Conv2d)):
            nn.init.normal_(conv.weight, 0.0, 0.05)
    return net.eval()


def export_and_serve(model, frames: np.ndarray, out_dir: Path, name: str = "box"):
    """Export ``model`` (a fitted SLSG, square input ``frames.shape[1]``) with a test card, verified on
    ``frames``, and return (ONNX Runtime's map and score, the PyTorch inference graph's map and score) for
    ``frames``. Imports torch lazily: gateway tests use this module without it."""
    import onnxruntime as ort
    import torch

    from slsg_train.export.onnx_export import InferenceGraph, export_onnx
    from slsg_train.models import top_k_for_size

    size = frames.shape[1]
    card = ModelCard(name=name, category=name, backbone="efficientnet_lite0", input_height=size,
                     input_width=size, top_k=top_k_for_size(size, size),
                     calibration=Calibration(raw_threshold=0.8, score_min=0.5), project_version="test")
    result = export_onnx(model, card, Path(out_dir) / "model.onnx", verify_images=list(frames))
    assert result.max_score_diff <= 1e-4 and result.max_map_diff <= 1e-4
    session = ort.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])
    onnx_map, onnx_score = session.run([OUTPUT_ANOMALY_MAP, OUTPUT_SCORE], {INPUT_IMAGE: frames})
    with torch.no_grad():
        torch_map, torch_score = InferenceGraph(model, card.top_k, card.calibration)(torch.from_numpy(frames))[:2]
    return onnx_map, onnx_score, torch_map.numpy(), torch_score.numpy()
