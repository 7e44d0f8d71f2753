import numpy as np
import onnxruntime as ort
import pytest

from onnx_fixtures import make_card, write_contract_model
from slsg.contract import (
    MODEL_CARD_KEY, Calibration, ModelCard, list_models, list_versions, model_path, next_version,
    validate_model_name,
)


def test_calibration_maps_threshold_to_half_and_is_monotone():
    cal = Calibration(raw_threshold=0.2, score_min=0.05, score_max=1.0)
    assert cal.normalise(0.2) == pytest.approx(0.5)
    assert cal.normalise(0.05) == pytest.approx(0.0)
    assert cal.normalise(1.0) == pytest.approx(1.0)
    raw = np.linspace(-1, 2, 301)
    out = cal.normalise(raw)
    assert np.all(np.diff(out) >= 0) and out.min() == 0.0 and out.max() == 1.0


def test_model_card_round_trips_through_json():
    card = make_card(metrics={"image_auroc": {"mean": 0.9}})
    again = ModelCard.from_json(card.to_json())
    assert again == card


def test_repository_versions(tmp_path):
    assert list_models(tmp_path) == [] and next_version(tmp_path, "m") == 1
    write_contract_model(model_path(tmp_path, "m", 1), make_card("m"))
    write_contract_model(model_path(tmp_path, "m", 3), make_card("m"))
    (tmp_path / "m" / "4").mkdir()  # an empty (failed) version folder is not servable but is not reused
    assert list_versions(tmp_path, "m") == [1, 3]
    assert next_version(tmp_path, "m") == 5
    assert list_models(tmp_path) == ["m"]
    with pytest.raises(ValueError, match="invalid model name"):
        validate_model_name("../etc")


def test_toy_contract_model_scores_red_patches(tmp_path):
    card = make_card(size=32, top_k=16)
    path = write_contract_model(tmp_path / "model.onnx", card)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    meta = sess.get_modelmeta().custom_metadata_map
    assert ModelCard.from_json(meta[MODEL_CARD_KEY]) == card
    frames = np.full((2, 32, 32, 3), 128, np.uint8)
    frames[1, 4:12, 4:12] = (255, 0, 0)
    amap, score = sess.run(None, {"image": frames})
    assert amap.shape == (2, 1, 32, 32) and score.shape == (2, 1)
    assert score[0, 0] == pytest.approx(card.calibration.normalise(0.0))
    assert score[1, 0] == pytest.approx(card.calibration.normalise(1.0)) and score[1, 0] > 0.5
