"""An INT8 version is just another version: the embedded ONNX Runtime backend serves a quantized (QDQ)
contract graph next to a float32 one, with its own card, and both take the same decisions."""

from __future__ import annotations


import httpx
import numpy as np
import onnx
import pytest

from onnx_fixtures import make_card, write_contract_model, write_int8_contract_model
from support import png_bytes
from slsg.contract import model_path
from slsg_gateway.server import BackgroundGateway
from slsg_gateway.settings import Settings

PNG = {"Content-Type": "image/png"}


def png(red: bool) -> bytes:
    pixels = np.full((48, 64, 3), 100, np.uint8)
    if red:
        pixels[10:30, 20:40] = (255, 30, 30)
    return png_bytes(pixels)


@pytest.fixture()
def gateway(tmp_path):
    write_contract_model(model_path(tmp_path, "toy", 1), make_card("toy", size=32))
    write_int8_contract_model(model_path(tmp_path, "toy-int8", 1), make_card("toy-int8", size=32))
    with BackgroundGateway(Settings(repository=tmp_path, port=0, batch_window_ms=2)) as gw:
        yield gw, tmp_path


def test_int8_version_is_served_next_to_the_float32_one(gateway):
    gw, root = gateway
    quantized = onnx.load(str(model_path(root, "toy-int8", 1)))
    assert {"QuantizeLinear", "DequantizeLinear"} <= {n.op_type for n in quantized.graph.node}
    listed = {m["name"]: m for m in httpx.get(f"{gw.url}/v1/models").json()["models"]}
    assert listed["toy"]["ready"] and listed["toy-int8"]["ready"]
    assert listed["toy"]["card"]["precision"] == "fp32" and listed["toy-int8"]["card"]["precision"] == "int8"
    answers = {}
    for name in ("toy", "toy-int8"):
        for red in (False, True):
            r = httpx.post(f"{gw.url}/v1/models/{name}/inspect", content=png(red), headers=PNG, timeout=30)
            assert r.status_code == 200, r.text
            answers[name, red] = r.json()
    for name in ("toy", "toy-int8"):
        assert answers[name, False]["is_anomalous"] is False and answers[name, True]["is_anomalous"] is True
        assert answers[name, True]["score"] > answers[name, False]["score"]
        assert answers[name, True]["model"] == name
