import numpy as np
import onnxruntime as ort
import pytest

from onnx_fixtures import make_card, write_contract_model
from slsg.contract import (
    MODEL_CARD_KEY, Calibration, ModelCard, beta_quantile, calibration_exceedances, images_for_fpr, list_models, list_versions,
    model_path, next_version, validate_model_name,
)


def test_calibration_maps_threshold_to_half_and_is_monotone():
    cal = Calibration(raw_threshold=0.2, score_min=0.05, score_max=1.0)
    assert cal.normalise(0.2) == pytest.approx(0.5)
    assert cal.normalise(0.05) == pytest.approx(0.0)
    assert cal.normalise(1.0) == pytest.approx(1.0)
    raw = np.linspace(-1, 2, 301)
    out = cal.normalise(raw)
    assert np.all(np.diff(out) >= 0) and out.min() == 0.0 and out.max() == 1.0


def test_calibration_meets_the_target_rate_on_average_when_it_has_the_images_for_it():
    # (k + 1) / (n + 1) <= target: the largest such k, or 0 (above every image) when none is
    assert [calibration_exceedances(0.01, n) for n in (1, 60, 98, 99, 198, 199, 1000)] == [0, 0, 0, 0, 0, 1, 9]
    assert calibration_exceedances(0.5, 4) == 1 and calibration_exceedances(0.0, 500) == 0
    assert images_for_fpr(0.01) == 99 and images_for_fpr(0.05) == 19 and images_for_fpr(0.003) == 333
    for target in (0.01, 0.05, 0.003, 0.2):
        n = images_for_fpr(target)
        assert Calibration(target_fpr=target, num_images=n).expected_fpr() <= target + 1e-12
        assert Calibration(target_fpr=target, num_images=n - 1).expected_fpr() > target
    assert Calibration(target_fpr=0.01, num_images=60).expected_fpr() == pytest.approx(1 / 61)
    assert Calibration(target_fpr=0.01, num_images=1000).expected_fpr() == pytest.approx(10 / 1001)
    assert Calibration(num_images=0).expected_fpr() is None  # not calibrated
    with pytest.raises(ValueError, match="must be in"):
        calibration_exceedances(1.0, 10)


def test_the_rate_a_line_sees_varies_with_the_calibration_set_as_beta_quantiles_say():
    # above all of n images (k = 0) the rate is Beta(1, n): closed-form quantiles
    for n in (4, 60):
        assert Calibration(target_fpr=0.01, num_images=n).fpr_upper(0.9) == pytest.approx(1 - 0.1 ** (1 / n))
    assert Calibration(num_images=0).fpr_upper() is None
    # k > 0 against simulation: uniform normal scores, threshold just above the (k + 1)-th highest of n
    rng = np.random.default_rng(0)
    for target, n in ((0.01, 199), (0.05, 60), (0.2, 30)):
        cal = Calibration(target_fpr=target, num_images=n)
        k = calibration_exceedances(target, n)
        scores = rng.random((20000, n))
        rate = 1 - np.partition(scores, n - k - 1, axis=1)[:, n - k - 1]  # the share of new scores above it
        assert rate.mean() == pytest.approx(cal.expected_fpr(), rel=0.03)
        for p in (0.5, 0.9, 0.99):
            assert np.quantile(rate, p) == pytest.approx(cal.fpr_upper(p), rel=0.04)
    assert beta_quantile(3, 7, 0.5) < beta_quantile(3, 7, 0.9) < beta_quantile(2, 7, 0.99)
    with pytest.raises(ValueError, match="whole a, b >= 1"):
        beta_quantile(0, 3, 0.5)


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
