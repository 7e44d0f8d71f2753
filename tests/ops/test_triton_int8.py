"""The local Triton serves an INT8 (QDQ) version next to a float32 one, unchanged: it is just another
model file, run by ONNX Runtime, whose answers equal in-process ONNX Runtime's."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import tritonclient.http as httpclient

from support import free_ports
from onnx_fixtures import make_card, write_contract_model, write_int8_contract_model
from slsg.contract import INPUT_IMAGE, OUTPUT_ANOMALY_MAP, OUTPUT_SCORE, model_path
from slsg.triton_config import card_from_config, load_config, write_config
from slsg_triton.local import LocalTriton

pytestmark = pytest.mark.slow
SIZE = 32


def frames() -> np.ndarray:
    images = np.full((3, SIZE, SIZE, 3), 100, np.uint8)
    images[1, 4:12, 4:12] = (255, 30, 30)
    images[2, 2:20, 2:20] = (255, 0, 0)
    return images


def infer(url: str, model: str, images: np.ndarray) -> dict[str, np.ndarray]:
    client = httpclient.InferenceServerClient(url)
    tensor = httpclient.InferInput(INPUT_IMAGE, list(images.shape), "UINT8")
    tensor.set_data_from_numpy(images)
    try:
        result = client.infer(model, [tensor], outputs=[httpclient.InferRequestedOutput(n)
                                                        for n in (OUTPUT_ANOMALY_MAP, OUTPUT_SCORE)])
    finally:
        client.close()
    return {n: result.as_numpy(n) for n in (OUTPUT_ANOMALY_MAP, OUTPUT_SCORE)}


def run_ort(path, images: np.ndarray) -> dict[str, np.ndarray]:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return dict(zip([OUTPUT_ANOMALY_MAP, OUTPUT_SCORE], session.run([OUTPUT_ANOMALY_MAP, OUTPUT_SCORE],
                                                                     {INPUT_IMAGE: images})))


def test_triton_serves_an_int8_version_next_to_float32(tmp_path):
    root = tmp_path / "repo"
    cards = {"toy": make_card("toy", size=SIZE), "toy-int8": make_card("toy-int8", size=SIZE)}
    write_contract_model(model_path(root, "toy", 1), cards["toy"])
    write_int8_contract_model(model_path(root, "toy-int8", 1), cards["toy-int8"])
    write_config(root, "toy", cards["toy"], gpu=False)
    write_config(root, "toy-int8", dataclasses.replace(cards["toy-int8"], precision="int8"), gpu=False)
    assert card_from_config(load_config(root / "toy-int8" / "config.pbtxt")).precision == "int8"
    http, grpc, metrics = free_ports(3)
    triton = LocalTriton(root, http, grpc, metrics, startup_timeout=90)
    triton.start()
    try:
        images = frames()
        for name in cards:
            got = infer(triton.http_url, name, images)
            want = run_ort(model_path(root, name, 1), images)
            for output in want:
                np.testing.assert_allclose(got[output], want[output], atol=1e-6)
            scores = got[OUTPUT_SCORE][:, 0]
            assert scores[0] < 0.5 <= scores[2] and scores[0] < scores[1] <= scores[2]
    finally:
        triton.stop()
