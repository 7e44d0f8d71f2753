"""INT8 export: the quantized graph runs in ONNX Runtime, its card and threshold are its own, the blocks
kept in float32 stay so, and the decision guard refuses a broken quantization."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from skimage import data
from skimage.transform import resize

from onnx_fixtures import slsg_alone_with_varied_head
from slsg import cli
from slsg.contract import INPUT_IMAGE, MODEL_CARD_KEY, OUTPUT_ANOMALY_MAP, OUTPUT_SCORE, ModelCard
from slsg_train.export import ExportError, export_onnx
from slsg_train.export import int8
from slsg_train.export.int8 import Int8Images, Int8Options, export_int8, quantize_graph
from slsg_train.inference import predict
from slsg_train.models import SLSG, top_k_for_size
from slsg_train.onnx_inference import OnnxModel, calibration_inputs
from slsg_train.training.calibration import calibration_from_scores, threshold_for_fpr

SIZE = 64
# a high target rate puts the threshold among the normal images, so decisions can change in both directions
TARGET_FPR = 0.5
PHOTOS = ("chelsea", "coffee", "astronaut", "rocket", "coins", "camera", "moon", "page", "text", "horse")


def photo(name: str, crop: int = 0) -> np.ndarray:
    image = getattr(data, name)()
    image = np.repeat(image[..., None], 3, axis=2) if image.ndim == 2 else image[..., :3]
    if image.dtype == bool:
        image = image.astype(np.uint8) * 255
    h, w = image.shape[:2]
    image = image[crop * h // 8:, crop * w // 8:]
    return (resize(image, (SIZE, SIZE), anti_aliasing=True, preserve_range=True)).round().astype(np.uint8)


@pytest.fixture(scope="module")
def model() -> SLSG:
    """SLSG alone (the reference checks have their own tests), its map varying from image to image."""
    return slsg_alone_with_varied_head()


@pytest.fixture(scope="module")
def images() -> Int8Images:
    threshold = [photo(name) for name in PHOTOS[:8]]
    anomalous = []
    rng = np.random.default_rng(0)
    for image in threshold[:4]:
        broken = image.copy()
        broken[16:40, 20:44] = rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)
        anomalous.append(broken)
    return Int8Images(train=[photo(name, crop=1) for name in PHOTOS], threshold=threshold, anomalous=anomalous,
                      scale_images=0)


@pytest.fixture(scope="module")
def card(model, images) -> ModelCard:
    """The float32 card, calibrated as training does: PyTorch's scores of the threshold images."""
    top_k = top_k_for_size(SIZE, SIZE)
    cal, _ = calibration_from_scores(predict(model, images.threshold, top_k).scores, TARGET_FPR, scale_images=0)
    return ModelCard(name="photos", category="photos", backbone="efficientnet_lite0", input_height=SIZE,
                     input_width=SIZE, top_k=top_k, calibration=cal.on_calibrated_map(), project_version="test")


@pytest.fixture(scope="module")
def exported(model, card, images, tmp_path_factory):
    path = tmp_path_factory.mktemp("int8") / "photos" / "2" / "model.onnx"
    # tiny random-head model: decisions near the threshold may flip; the guard has its own test
    int8_card, check = export_int8(model, card, path, images,
                                   Int8Options(max_decision_change=1.0, min_rank_correlation=-1.0))
    return path, int8_card, check


def test_int8_graph_round_trips_through_onnx_runtime(exported, model, card, images):
    path, _, check = exported
    assert [p.name for p in path.parent.iterdir()] == ["model.onnx"]  # no temp files left
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for batch in (1, 3):
        frames = np.stack(images.threshold[:batch])
        amap, score = session.run([OUTPUT_ANOMALY_MAP, OUTPUT_SCORE], {INPUT_IMAGE: frames})
        assert amap.shape == (batch, 1, SIZE, SIZE) and score.shape == (batch, 1)
        assert np.isfinite(amap).all() and ((score >= 0) & (score <= 1)).all()
    # the float32 graph's and the INT8 graph's scores stay close on these images (in raw-score units)
    fp32 = predict(model, images.threshold + images.anomalous, card.top_k).scores
    quantized = OnnxModel(path).predict(images.threshold + images.anomalous).scores
    assert np.abs(fp32 - quantized).max() < 0.05
    assert check.images == 12 and check.anomalous_images == 4 and 0 <= check.decisions_changed <= 12


def test_blocks_kept_float32_are_not_quantized(exported):
    path, _, check = exported
    graph = onnx.load(str(path)).graph
    producers = {out: node.op_type for node in graph.node for out in node.output}
    convs = [n for n in graph.node if n.op_type == "Conv"]
    quantized = {n.name for n in convs if producers.get(n.input[1]) == "DequantizeLinear"}
    encoder = [n.name for n in convs if n.name.startswith("/model/encoder/")]
    decoder = [n.name for n in convs if n.name.startswith("/model/decoder")]
    assert encoder and not quantized.intersection(encoder)
    assert decoder and set(decoder) <= quantized
    # kept float32, counted: the encoder's convolutions and its ReLU6 (Clip) activations
    clips = [n.name for n in graph.node if n.op_type == "Clip" and n.name.startswith("/model/encoder/")]
    assert clips and check.float_nodes["encoder"] == len(encoder) + len(clips)
    assert check.quantized_nodes >= len(decoder)
    # the calibration tail is float32: its Where/Less nodes read the float log-odds, not a dequantized copy
    tail = calibration_inputs(onnx.load(str(path)))
    assert all(producers[t] != "DequantizeLinear" for t in tail.values())


def test_card_and_threshold_are_the_int8_graphs(exported, card, images):
    path, int8_card, check = exported
    stored = ModelCard.from_json({p.key: p.value for p in onnx.load(str(path)).metadata_props}[MODEL_CARD_KEY])
    assert stored == int8_card and stored.precision == "int8" and card.precision == "fp32"
    # scored here independently, through the file as written
    scores = OnnxModel(path).predict(images.threshold).scores
    assert stored.calibration.raw_threshold == threshold_for_fpr(scores, TARGET_FPR)
    assert stored.calibration.num_images == len(images.threshold) and stored.calibration.target_fpr == TARGET_FPR
    assert stored.calibration.score_min == pytest.approx(float(scores.min()))
    assert stored.extra["fp32_calibration"]["raw_threshold"] == card.calibration.raw_threshold
    assert check.int8_raw_threshold == stored.calibration.raw_threshold
    assert check.fp32_raw_threshold == card.calibration.raw_threshold
    assert json.loads(json.dumps(stored.extra["int8_check"]))["decisions_changed"] == check.decisions_changed
    assert stored.extra["int8_check"]["normal_rank_correlation"] == check.normal_rank_correlation


def test_rank_correlation_is_spearmans():
    scores = np.array([0.3, 0.1, 0.7, 0.5])
    assert int8.rank_correlation(scores, scores * 10 + 1) == pytest.approx(1.0)
    assert int8.rank_correlation(scores, -scores) == pytest.approx(-1.0)
    # one swap of neighbours among four: 1 - 6 * 2 / (4 * 15)
    assert int8.rank_correlation(scores, np.array([3.0, 1.0, 9.0, 5.0])) == pytest.approx(1.0)
    assert int8.rank_correlation(scores, np.array([0.3, 0.1, 0.4, 0.5])) == pytest.approx(0.8)
    with pytest.raises(ValueError, match="one length, got 4 and 3"):
        int8.rank_correlation(scores, scores[:3])


def _quantized_convs(path) -> set[str]:
    """Names of the Conv nodes whose weights come through a DequantizeLinear (QDQ: quantized)."""
    graph = onnx.load(str(path)).graph
    producers = {out: node.op_type for node in graph.node for out in node.output}
    return {n.name for n in graph.node if n.op_type == "Conv" and producers.get(n.input[1]) == "DequantizeLinear"}


def test_partial_blocks_keep_their_first_layers_float32(model, card, images, tmp_path):
    fp32 = export_onnx(model, card, tmp_path / "fp32.onnx").path
    encoder = {n.name for n in onnx.load(str(fp32)).graph.node
               if n.op_type == "Conv" and n.name.startswith("/model/encoder/")}
    first = {n for n in encoder if "/_conv_stem/" in n or "/_blocks.0/" in n}
    # EfficientNet-Lite: the expand and project convolutions are the 1x1 ones
    pointwise = {n for n in encoder - first if "_expand_conv" in n or "_project_conv" in n}
    depthwise = {n for n in encoder - first if "_depthwise_conv" in n}
    assert first and pointwise and depthwise and pointwise | depthwise == encoder - first
    quantize_graph(fp32, tmp_path / "pw.onnx", images.train,
                   Int8Options(partial_blocks=("encoder",), partial_depthwise=False))
    assert _quantized_convs(tmp_path / "pw.onnx") & encoder == pointwise
    quantize_graph(fp32, tmp_path / "all.onnx", images.train, Int8Options(partial_blocks=("encoder",)))
    assert _quantized_convs(tmp_path / "all.onnx") & encoder == pointwise | depthwise
    # ReLU6 after a quantized convolution is folded into its output range, so no Clip is left there
    clips = {n.input[0] for n in onnx.load(str(tmp_path / "all.onnx")).graph.node if n.op_type == "Clip"}
    assert not any(c.startswith("/model/encoder/_blocks.1/") for c in clips)
    # by default the SLSG encoder stays float32 throughout
    quantize_graph(fp32, tmp_path / "default.onnx", images.train, Int8Options())
    assert not _quantized_convs(tmp_path / "default.onnx") & encoder
    scores = OnnxModel(tmp_path / "all.onnx").predict(images.threshold).scores
    assert np.isfinite(scores).all() and scores.shape == (len(images.threshold),)


def test_tensorrt_with_int8_is_refused_before_anything_is_loaded(tmp_path, capsys):
    repository = tmp_path / "repo"
    code = cli.main(["export", "--checkpoint", str(tmp_path / "absent.pt"), "--repository", str(repository),
                     "--name", "tray", "--precision", "int8", "--tensorrt"])
    err = capsys.readouterr().err
    assert code == 2 and "--tensorrt cannot be combined with --precision int8" in err and "absent.pt" not in err
    assert not repository.exists()


def _reversing(real):
    """A broken quantization: the real one, then the image score's log-odds negated before the calibration
    tail (a scale gone negative), so the images the float32 graph ranks highest score lowest."""
    def quantize(src, dst, frames, options, ranges_cache=None):
        count = real(src, dst, frames, options, ranges_cache)
        model = onnx.load(str(dst))
        name = calibration_inputs(model)[OUTPUT_SCORE]
        for node in model.graph.node:
            node.input[:] = [f"{name}_negated" if i == name else i for i in node.input]
        model.graph.node.append(onnx.helper.make_node("Neg", [name], [f"{name}_negated"]))
        onnx.save(model, str(dst))
        return count
    return quantize


def test_decision_guard_refuses_a_broken_quantization(model, card, images, tmp_path, monkeypatch):
    monkeypatch.setattr(int8, "quantize_graph", _reversing(int8.quantize_graph))
    path = tmp_path / "photos" / "3" / "model.onnx"
    with pytest.raises(ExportError, match=r"INT8 changes the decision on \d+ of 12 verification images") as info:
        export_int8(model, card, path, images, Int8Options(max_decision_change=0.25, min_rank_correlation=-1.0))
    assert "was not written" in str(info.value)
    assert not path.exists() and list(path.parent.iterdir()) == []  # no temp folder left either
    # the same graph with every decision allowed to change is still refused: it reverses the normal images
    with pytest.raises(ExportError, match="reorders the normal threshold images: rank correlation with float32 -"):
        export_int8(model, card, path, images, Int8Options(max_decision_change=1.0))


def test_presets_step_down_until_the_guard_passes(model, card, images, tmp_path, monkeypatch):
    real, broken = int8.quantize_graph, _reversing(int8.quantize_graph)

    def quantize(src, dst, frames, options, ranges_cache=None):
        return (broken if options.name in ("encoders", "again") else real)(src, dst, frames, options, ranges_cache)

    monkeypatch.setattr(int8, "quantize_graph", quantize)
    first, second = (dataclasses.replace(p, max_decision_change=m, min_rank_correlation=-1.0)
                     for p, m in zip(int8.PRESETS, (0.25, 1.0)))
    assert (first.name, second.name) == ("encoders", "reference-encoder")
    path = tmp_path / "photos" / "4" / "model.onnx"
    int8_card, check = export_int8(model, card, path, images, [first, second])
    assert check.preset == "reference-encoder" and [r["preset"] for r in check.refused] == ["encoders"]
    assert check.refused[0]["reason"].startswith("INT8 changes the decision on")
    stored = ModelCard.from_json({p.key: p.value for p in onnx.load(str(path)).metadata_props}[MODEL_CARD_KEY])
    assert stored.extra["int8_check"]["preset"] == "reference-encoder" == int8_card.extra["int8_check"]["preset"]
    assert [p.name for p in path.parent.iterdir()] == ["model.onnx"]
    # every one refused: the error names each, and nothing is written
    path = tmp_path / "photos" / "5" / "model.onnx"
    with pytest.raises(ExportError, match=r"^encoders: INT8 changes .*; again: INT8 changes .*was not written"):
        export_int8(model, card, path, images, [first, dataclasses.replace(first, name="again")])
    assert not path.exists()


def test_bad_options_are_refused(model, card, images, tmp_path):
    with pytest.raises(ValueError, match="unknown block.*'encodr'"):
        export_int8(model, card, tmp_path / "m.onnx", images, Int8Options(float_blocks=("encodr",)))
    with pytest.raises(ValueError, match=r"must be in \[0, 1\]"):
        export_int8(model, card, tmp_path / "m.onnx", images, Int8Options(max_decision_change=2.0))
    with pytest.raises(ValueError, match="unknown block.*'encoders'"):
        export_int8(model, card, tmp_path / "m.onnx", images, Int8Options(partial_blocks=("encoders",)))
    with pytest.raises(ValueError, match=r"least rank correlation must be in \[-1, 1\]"):
        export_int8(model, card, tmp_path / "m.onnx", images, Int8Options(min_rank_correlation=1.5))
    with pytest.raises(ValueError, match="unknown calibration method 'kl'"):
        export_int8(model, card, tmp_path / "m.onnx", images, Int8Options(calibration="kl"))
    with pytest.raises(ExportError, match="needs normal training images"):
        export_int8(model, card, tmp_path / "m.onnx", Int8Images(train=[], threshold=images.threshold, anomalous=[]))
