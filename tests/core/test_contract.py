import dataclasses
import json

import numpy as np
import onnxruntime as ort
import pytest

from onnx_fixtures import make_card, write_contract_model
from slsg.contract import (
    ANOMALY_MAP_CALIBRATED, ANOMALY_MAP_PROBABILITY, CARD_FORMAT, MODEL_CARD_KEY, Calibration, ModelCard, beta_quantile,
    calibration_exceedances, images_for_fpr, list_models, list_versions, migrate_card, model_path, next_version,
    validate_model_name,
)


def logit(p):
    p = np.asarray(p, dtype=np.float64)
    with np.errstate(divide="ignore"):
        return np.log(p) - np.log1p(-p)


def test_calibration_maps_threshold_to_half_and_is_monotone():
    cal = Calibration(raw_threshold=0.5, score_min=0.01, score_median=0.1)
    assert cal.log_odds_threshold() == pytest.approx(0.0) and cal.log_odds_scale() == pytest.approx(np.log(9))
    assert cal.calibrated_score(0.0) == pytest.approx(0.5)
    assert cal.calibrated_score(logit(0.01)) == pytest.approx(0.0)
    assert cal.calibrated_score(logit(0.255)) == pytest.approx(0.25)  # below: linear in the raw score
    assert cal.calibrated_score(np.log(9)) == pytest.approx(0.75)  # as far above as the median normal is below
    assert cal.calibrated_score(4 * np.log(9)) == pytest.approx(0.9)
    assert cal.calibrated_score(-np.inf) == 0.0 and cal.calibrated_score(np.inf) == 1.0
    log_odds = np.linspace(-50, 200, 2501)
    out = cal.calibrated_score(log_odds)
    assert out.min() == 0.0 and out.max() < 1.0
    assert np.all(np.diff(out) >= 0) and np.all(np.diff(out[log_odds > 0]) > 0)  # above: strictly rising


def test_clear_anomalies_keep_their_order_where_raw_scores_round_to_one():
    cal = Calibration(raw_threshold=0.9, score_min=0.01, score_median=0.2)
    strong = np.array([20.0, 30.0, 45.0])  # log-odds of raw scores that are all 1.0 in float32
    assert np.all(1 / (1 + np.exp(-strong.astype(np.float32))) == np.float32(1.0))
    scores = np.float32(cal.calibrated_score(strong))
    assert np.all(np.diff(scores) > 0) and scores.max() < 1.0


def test_calibration_scale_is_floored_and_falls_back_on_older_cards():
    assert Calibration(raw_threshold=0.5, score_min=0.45, score_median=0.48).log_odds_scale() == 1.0
    assert Calibration(raw_threshold=0.5, score_min=0.1).log_odds_scale() == pytest.approx(np.log(9))  # no median
    # a threshold above every float32 score under 1 (normal images scored 1.0): finite, at the largest one
    assert Calibration(raw_threshold=1.0000001).log_odds_threshold() == pytest.approx(logit(1 - 2.0**-24))
    assert np.isfinite(Calibration().log_odds_scale())  # an uncalibrated card: score_min 0


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


def test_a_card_from_a_newer_exporter_reads_without_its_new_fields():
    data = json.loads(make_card().to_json())
    data["calibration"]["a_later_statistic"] = 0.3
    data["a_later_field"] = {"x": 1}
    assert ModelCard.from_json(json.dumps(data)) == make_card()
    assert Calibration.from_dict(data["calibration"]) == make_card().calibration  # as a checkpoint stores it


def test_a_card_from_before_the_fusion_record_fuses_every_part_and_a_new_one_round_trips():
    data = json.loads(make_card().to_json())
    del data["fusion_left_out"]  # a version-2 card written before the field
    assert ModelCard.from_json(json.dumps(data)).fusion_left_out == {}
    card = make_card(fusion_left_out={"slsg_map": "separation 0.55 on 27 held-out normal images"})
    assert ModelCard.from_json(card.to_json()) == card


def _version_1_card() -> dict:
    """make_card() as the exporter wrote it before card formats: no ``card_format``, no
    ``anomaly_map_scale`` (a probability map), the linear map's ``score_max``, no resize or precision."""
    data = json.loads(make_card().to_json())
    for key in ("card_format", "anomaly_map_scale", "resize", "precision", "part_kinds", "fusion_left_out"):
        del data[key]
    data["calibration"]["score_max"] = 1.0
    return data


def test_a_version_1_card_migrates_to_the_current_format():
    migrated = migrate_card(_version_1_card())
    assert migrated["card_format"] == CARD_FORMAT
    assert migrated["anomaly_map_scale"] == ANOMALY_MAP_PROBABILITY
    assert "score_max" not in migrated["calibration"]
    card = ModelCard.from_json(json.dumps(_version_1_card()))
    assert card == dataclasses.replace(make_card(), anomaly_map_scale=ANOMALY_MAP_PROBABILITY)
    assert json.loads(card.to_json())["card_format"] == CARD_FORMAT  # written back in the current format


def test_a_new_card_omits_dead_fields_and_says_what_its_anomaly_map_holds():
    data = json.loads(make_card().to_json())
    assert "score_max" not in data["calibration"] and data["card_format"] == CARD_FORMAT
    fresh = ModelCard(name="m", category="c", backbone="b", input_height=64, input_width=64, top_k=8)
    assert fresh.anomaly_map_scale == ANOMALY_MAP_CALIBRATED
    assert ModelCard.from_json(fresh.to_json()).anomaly_map_scale == ANOMALY_MAP_CALIBRATED


def test_a_card_newer_than_the_code_is_refused_by_version():
    data = {**json.loads(make_card().to_json()), "card_format": CARD_FORMAT + 1}
    with pytest.raises(ValueError, match=f"format {CARD_FORMAT + 1} is newer"):
        ModelCard.from_json(json.dumps(data))


def test_the_pixel_threshold_moves_onto_the_calibrated_map():
    cal = Calibration(raw_threshold=0.95, score_min=0.01, score_median=0.1, pixel_threshold=0.95, num_images=60)
    on_map = cal.on_calibrated_map()
    assert on_map.pixel_threshold == 0.5  # the image threshold, where the pixel threshold is (always, so far)
    assert dataclasses.replace(on_map, pixel_threshold=cal.pixel_threshold) == cal  # nothing else changed
    # a pixel threshold of its own lands where the calibration puts that probability
    other = dataclasses.replace(cal, pixel_threshold=0.6).on_calibrated_map()
    assert other.pixel_threshold == pytest.approx(0.5 * (0.6 - 0.01) / (0.95 - 0.01))
    # so a map pixel is above it exactly where its probability is above the raw pixel threshold
    log_odds = np.linspace(-8, 12, 2001)
    probability = 1 / (1 + np.exp(-log_odds))
    for raw_pixel in (0.6, 0.95):
        c = dataclasses.replace(cal, pixel_threshold=raw_pixel)
        np.testing.assert_array_equal(c.calibrated_score(log_odds) > c.on_calibrated_map().pixel_threshold + 1e-12,
                                      probability > raw_pixel + 1e-12)


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
    assert score[0, 0] == pytest.approx(card.calibration.calibrated_score(-np.inf))
    assert score[1, 0] == pytest.approx(card.calibration.calibrated_score(np.inf)) and score[1, 0] > 0.5
    frames[1, 4:12, 4:12] = (230, 77, 77)  # redness 0.6, above the threshold of 0.3 but not saturated
    score = sess.run(None, {"image": frames})[1]
    assert score[1, 0] == pytest.approx(card.calibration.calibrated_score(logit(0.6)), abs=1e-5)
    assert 0.5 < score[1, 0] < 1.0


def test_card_precision_defaults_to_fp32_and_is_checked():
    card = make_card("toy")
    assert card.precision == "fp32"
    old = json.loads(card.to_json())
    del old["precision"]  # a card from before the field: a float32 graph
    assert ModelCard.from_json(json.dumps(old)).precision == "fp32"
    int8 = dataclasses.replace(card, precision="int8")
    assert ModelCard.from_json(int8.to_json()) == int8
    with pytest.raises(ValueError, match="precision 'int4' is not one of fp32, int8"):
        dataclasses.replace(card, precision="int4")
