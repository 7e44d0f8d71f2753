"""Production config.pbtxt: what Triton's onnxruntime backend gets, parsed with Triton's own schema."""

import dataclasses

import pytest
from google.protobuf import json_format
from tritonclient.grpc import model_config_pb2 as mc

from onnx_fixtures import make_card
from slsg.contract import INPUT_IMAGE, MODEL_CARD_KEY, OUTPUT_ANOMALY_MAP, OUTPUT_SCORE, Calibration
from slsg.triton_config import (
    ConfigError, card_from_config, load_config, parse_config, production_config, write_config,
)


def _card():
    # H != W so a transposed shape cannot pass; a non-ASCII, quoted category tests escaping.
    card = make_card("pushpins", calibration=Calibration(raw_threshold=0.42, score_min=0.1))
    return dataclasses.replace(card, input_height=48, input_width=80, category='Pushpins "Ä"\\',
                               metrics={"au_spro": {"mean": 0.71}})


@pytest.mark.parametrize("tensorrt", [False, True])
def test_production_config_parses_with_contract_shapes(tensorrt):
    card = _card()
    cfg = parse_config(production_config("pushpins", card, tensorrt=tensorrt))
    assert cfg.name == "pushpins" and cfg.backend == "onnxruntime" and cfg.max_batch_size == 8
    (image,) = cfg.input
    assert (image.name, image.data_type, list(image.dims)) == (INPUT_IMAGE, mc.TYPE_UINT8, [48, 80, 3])
    outputs = {o.name: (o.data_type, list(o.dims)) for o in cfg.output}
    assert outputs == {OUTPUT_ANOMALY_MAP: (mc.TYPE_FP32, [1, 48, 80]), OUTPUT_SCORE: (mc.TYPE_FP32, [1])}
    assert list(cfg.dynamic_batching.preferred_batch_size) == [4, 8]
    assert cfg.dynamic_batching.max_queue_delay_microseconds == 2000
    assert [(g.count, g.kind) for g in cfg.instance_group] == [(1, mc.ModelInstanceGroup.KIND_GPU)]
    assert cfg.version_policy.latest.num_versions == 2
    accelerators = cfg.optimization.execution_accelerators.gpu_execution_accelerator
    if tensorrt:
        (trt,) = accelerators
        assert trt.name == "tensorrt" and trt.parameters["precision_mode"] == "FP16"
    else:
        assert len(accelerators) == 0


def test_card_round_trips_through_parameters_in_both_client_forms():
    card = _card()
    cfg = parse_config(production_config("pushpins", card))
    assert card_from_config(cfg) == card  # gRPC: a ModelConfig message
    as_json = json_format.MessageToDict(cfg, preserving_proto_field_name=True)
    assert card_from_config(as_json) == card  # HTTP: the JSON dict
    assert cfg.parameters["slsg.category"].string_value == card.category
    assert float(cfg.parameters["slsg.raw_threshold"].string_value) == pytest.approx(0.42)
    assert MODEL_CARD_KEY in cfg.parameters


def test_cpu_instances_and_custom_batching():
    cfg = parse_config(production_config("m", _card(), gpu=False, max_batch_size=16, preferred_batch_sizes=(2, 16),
                                         max_queue_delay_us=500, instance_count=3))
    assert [(g.count, g.kind) for g in cfg.instance_group] == [(3, mc.ModelInstanceGroup.KIND_CPU)]
    assert cfg.max_batch_size == 16 and list(cfg.dynamic_batching.preferred_batch_size) == [2, 16]
    assert cfg.dynamic_batching.max_queue_delay_microseconds == 500


@pytest.mark.parametrize("typo", [
    ("max_batch_size", "max_batch_sise"),   # unknown field
    ("TYPE_UINT8", "TYPE_UINT9"),           # unknown enum value
    ("KIND_GPU", "KIND_GPUS"),
    ("dims: [ 1 ]", "dims: [ 1 "),          # syntax
])
def test_typo_in_config_fails_to_parse(typo):
    text = production_config("pushpins", _card())
    assert typo[0] in text
    with pytest.raises(ConfigError, match="my/config.pbtxt"):
        parse_config(text.replace(*typo, 1), source="my/config.pbtxt")


@pytest.mark.parametrize("kwargs, message", [
    ({"preferred_batch_sizes": (4, 16)}, "preferred_batch_sizes"),
    ({"tensorrt": True, "gpu": False}, "tensorrt"),
    ({"max_batch_size": 0}, "max_batch_size"),
])
def test_inconsistent_arguments_are_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        production_config("pushpins", _card(), **kwargs)


def test_invalid_model_name_is_rejected():
    with pytest.raises(ValueError, match="invalid model name"):
        production_config("bad name/", _card())


def test_write_config_then_load(tmp_path):
    card = _card()
    path = write_config(tmp_path, "pushpins", card, tensorrt=True)
    assert path == tmp_path / "pushpins" / "config.pbtxt"
    assert [p.name for p in path.parent.iterdir()] == ["config.pbtxt"]  # no temp file left behind
    assert card_from_config(load_config(path)) == card
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing" / "config.pbtxt")


def test_card_from_config_without_card_names_the_key():
    cfg = parse_config('name: "plain" backend: "onnxruntime"')
    with pytest.raises(KeyError, match=MODEL_CARD_KEY):
        card_from_config(cfg)
