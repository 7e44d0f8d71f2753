"""The Triton backend requests ``part_counts`` for a model whose card lists part kinds, and the answer
explains the counts that are off (a real local Triton server on CPU; torch-free: the toy contract model
gets a ``part_counts`` output of its own, round(4 * score), so a red patch "holds parts" and grey does not)."""

from __future__ import annotations

import time

import httpx
import pytest

from onnx_fixtures import make_card, write_contract_model
from slsg.contract import MODEL_CARD_KEY, OUTPUT_PART_COUNTS, OUTPUT_SCORE, PartKind, model_path
from slsg.triton_config import write_config
from slsg_gateway.server import BackgroundGateway
from slsg_gateway.settings import Settings
from test_gateway_triton import PNG, frame_png, ort_score
from support import local_triton

pytestmark = pytest.mark.slow
KIND = PartKind("kind 1 (red)", expected=0)


def write_counting_model(path, card) -> None:
    """The toy contract model plus ``part_counts`` [N, 1] = round(4 * score), and ``card`` as metadata."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    write_contract_model(path, card)
    model = onnx.load(str(path))
    model.graph.initializer.append(numpy_helper.from_array(np.array([4.0], np.float32), "four"))
    model.graph.node.extend([helper.make_node("Mul", [OUTPUT_SCORE, "four"], ["score4"]),
                             helper.make_node("Round", ["score4"], [OUTPUT_PART_COUNTS])])
    model.graph.output.append(helper.make_tensor_value_info(OUTPUT_PART_COUNTS, TensorProto.FLOAT, ["batch", 1]))
    onnx.helper.set_model_props(model, {MODEL_CARD_KEY: card.to_json()})
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


@pytest.fixture(scope="module")
def counting(tmp_path_factory):
    root = tmp_path_factory.mktemp("triton_parts_repo")
    card = make_card("parts", size=64, part_kinds=[KIND])
    write_counting_model(model_path(root, "parts", 1), card)
    write_config(root, "parts", card, gpu=False, max_batch_size=8)
    time.sleep(0.5)  # LocalTriton publishes a version only once its files are 0.3 s old
    with local_triton(root, ["parts"]) as server:
        yield root, server


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_triton_backend_explains_part_counts(counting, protocol):
    root, server = counting
    url = server.grpc_url if protocol == "grpc" else server.http_url
    settings = Settings(backend="triton", triton_url=url, triton_protocol=protocol, port=0, triton_timeout_s=5.0)
    with BackgroundGateway(settings) as gw:
        red = httpx.post(f"{gw.url}/v1/models/parts/inspect", content=frame_png(), headers=PNG, timeout=30).json()
        grey = httpx.post(f"{gw.url}/v1/models/parts/inspect", content=frame_png(None), headers=PNG, timeout=30).json()
    found = round(4 * ort_score(model_path(root, "parts", 1), frame_png(), 64))
    assert found > 0
    assert red["explanations"] == [{"part": KIND.name, "found": found, "expected": 0}]
    assert grey["explanations"] == []
