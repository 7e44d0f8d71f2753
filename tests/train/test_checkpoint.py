"""The run checkpoint: one typed record, read in every format this code accepts (checkpoint.py)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from checkpoint_fixtures import as_version_1, as_version_2
from slsg.contract import Calibration
from slsg_train.checkpoint import (
    CHECKPOINT_FORMAT, CheckpointError, RunCheckpoint, load_checkpoint, migrate, save_checkpoint,
)
from slsg_train.data.loco import LocoCategory
from slsg_train.inference import load_model, predict
from slsg_train.models import SLSG, preset, top_k_for_size
from slsg_train.training.config import TrainConfig


@pytest.fixture(scope="module")
def network() -> SLSG:
    torch.manual_seed(0)
    return SLSG(preset("default", backbone_weights=None, composition_check=False)).eval()


def make_checkpoint(model: SLSG, **changes) -> RunCheckpoint:
    """A finished run's checkpoint of ``model`` at 64x64, as the trainer builds it."""
    fields = dict(
        stage="done", step=4, category="tray", model_config=model.config, model_state=model.state_dict(),
        image_size=(64, 64), top_k=top_k_for_size(64, 64),
        train_config=TrainConfig(category="tray", image_size=(64, 64), steps=4, seed=3, precision="bf16"),
        data_root="/data", data_hash="abc", image_colour="colour",
        calibration_split={"train_images": 7, "scale_images": 2, "threshold_images": 3, "held_out_train": 1},
        calibration=Calibration(raw_threshold=0.4, score_min=0.1, target_fpr=0.05, num_images=3, score_median=0.2,
                                scale_images=2),
        calibration_stats={"num_images": 3}, project_version="test", created="2026-12-07T00:00:00+00:00",
    )
    return RunCheckpoint(**{**fields, **changes})


def flat_category(root: Path, train: int, validation: int) -> LocoCategory:
    """A real data set folder of grey 8x8 frames: ``train`` in train/good, ``validation`` in validation/good."""
    for split, count in (("train", train), ("validation", validation), ("test", 1)):
        if count == 0:
            continue
        folder = root / "tray" / split / "good"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(count):
            Image.fromarray(np.full((8, 8, 3), 100 + i, np.uint8)).save(folder / f"{i:03d}.png")
    return LocoCategory(root, "tray")


def assert_same(got: RunCheckpoint, expected: RunCheckpoint) -> None:
    """Equal fields, tensors compared by value."""
    states = ("model_state", "decoder_state", "optimizer", "scheduler")
    assert dataclasses.replace(got, **{k: None for k in states}) == dataclasses.replace(
        expected, **{k: None for k in states})
    assert got.model_state.keys() == expected.model_state.keys()
    assert all(torch.equal(got.model_state[k], v) for k, v in expected.model_state.items())


def test_a_checkpoint_round_trips_through_its_file(network, tmp_path):
    saved = make_checkpoint(network)
    path = save_checkpoint(tmp_path / "run" / "checkpoint.pt", saved)
    stored = torch.load(path, weights_only=False)
    assert stored["format"] == CHECKPOINT_FORMAT and "path" not in stored
    assert isinstance(stored["model_config"], dict) and isinstance(stored["calibration"], dict)
    loaded = load_checkpoint(tmp_path / "run")  # a run directory names its checkpoint.pt
    assert_same(loaded, saved)
    assert loaded.path == path
    assert loaded.backbone == "efficientnet_lite0" and loaded.train_config.precision == "bf16"
    assert migrate(stored) is stored  # the current format needs no migration


def test_a_version_1_checkpoint_loads_as_the_current_one(network, tmp_path):
    current = make_checkpoint(network)
    path = tmp_path / "checkpoint.pt"
    torch.save(as_version_1(current.to_payload()), path)
    assert torch.load(path, weights_only=False)["calibration"]["score_max"] == 1.0  # what v1 stored
    loaded = load_checkpoint(path)
    assert_same(loaded, current)
    assert "score_max" not in dataclasses.asdict(loaded.calibration)


def test_a_version_2_checkpoint_loads_with_every_part_fused(network, tmp_path):
    current = make_checkpoint(network)
    stored = as_version_2(current.to_payload())
    assert "fusion" not in stored and "fuse_slsg_map" not in stored["model_config"]
    torch.save(stored, tmp_path / "checkpoint.pt")
    loaded = load_checkpoint(tmp_path / "checkpoint.pt")
    assert_same(loaded, current)
    assert loaded.fusion == {} and loaded.model_config.fuse_slsg_map is True


def test_the_oldest_version_1_checkpoint_gets_what_its_missing_fields_meant(network, tmp_path):
    current = make_checkpoint(network, input_size_choice={"size": [64, 64], "images": 8})
    path = tmp_path / "checkpoint.pt"
    torch.save(as_version_1(current.to_payload(), oldest=True), path)
    loaded = load_checkpoint(path)
    assert loaded.train_config.precision == "fp32"  # trained before mixed precision existed
    assert loaded.train_config.seed == 3 and loaded.resize == "bilinear"
    # its composition check trained on normal images only; the authors' details read the first way
    config = loaded.model_config
    assert config.composition_restoration == 0.0 and config.layer1_input == "stem"
    assert (config.graph_value_on_tokens, config.graph_position_table, config.aux_upsampling) == (
        False, False, "direct")
    assert (loaded.data_hash, loaded.image_colour, loaded.calibration_stats) == ("", "", {})
    assert loaded.calibration_split is None and loaded.input_size_choice is None
    # the split it was trained with: nothing held out beside validation/good, else train/good's last tenth
    assert loaded.held_out_train(flat_category(tmp_path / "with", train=30, validation=4)) == 0
    assert loaded.held_out_train(flat_category(tmp_path / "without", train=30, validation=0)) == 3
    assert loaded.held_out_train(flat_category(tmp_path / "few", train=6, validation=0)) == 2
    assert current.held_out_train(flat_category(tmp_path / "without", train=30, validation=0)) == 1  # recorded


def test_a_version_1_checkpoint_scores_as_the_network_it_holds(network, tmp_path):
    path = tmp_path / "checkpoint.pt"
    torch.save(as_version_1(make_checkpoint(network).to_payload(), oldest=True), path)
    loaded = load_model(path)
    assert loaded.calibration.raw_threshold == 0.4 and loaded.image_size == (64, 64)
    frames = [np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)]
    expected = predict(network, frames, loaded.top_k)
    got = predict(loaded.model, frames, loaded.top_k)
    np.testing.assert_allclose(got.scores, expected.scores, rtol=1e-5)


def test_a_checkpoint_from_before_the_reference_padding_setting_keeps_its_symmetric_padding(tmp_path):
    torch.manual_seed(0)
    model = SLSG(preset("default", backbone_weights=None, composition_check=False)).eval()
    assert model.config.reference_padding == "same"  # new runs: as the ImageNet weights were trained
    model.patch_memory.memory.normal_()
    model.patch_memory.fitted.fill_(True)
    payload = make_checkpoint(model).to_payload()
    del payload["model_config"]["reference_padding"]  # what every checkpoint before the setting stored
    torch.save(payload, tmp_path / "checkpoint.pt")
    loaded = load_model(tmp_path / "checkpoint.pt")
    assert loaded.checkpoint.model_config.reference_padding == "symmetric"
    # its patch memory was fitted on symmetrically padded features: it scores with them still
    assert not loaded.model.reference_encoder.backbone._conv_stem.same
    frames = [np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)]
    same = predict(model, frames, loaded.top_k).map_log_odds
    legacy = SLSG(dataclasses.replace(model.config, reference_padding="symmetric"))
    legacy.load_state_dict(model.state_dict())
    symmetric = predict(legacy, frames, loaded.top_k).map_log_odds
    assert np.abs(same - symmetric).max() > 1e-2  # the padding shows in the map
    np.testing.assert_allclose(predict(loaded.model, frames, loaded.top_k).map_log_odds, symmetric,
                               rtol=1e-5, atol=1e-5)


def test_imported_weights_have_no_training_configuration(network, tmp_path):
    imported = make_checkpoint(network, stage="imported", train_config=None, calibration=None,
                               calibration_split=None, resize="lanczos", imported_from={"sha256": "0" * 64})
    save_checkpoint(tmp_path / "checkpoint.pt", imported)
    assert_same(load_checkpoint(tmp_path / "checkpoint.pt"), imported)


@pytest.mark.parametrize(("change", "message"), [
    (lambda p: p.pop("top_k"), "missing field(s) top_k"),
    (lambda p: p.update(score_max=1.0), "unknown field(s) score_max"),
    (lambda p: p.update(stage="halfway"), "field 'stage' is not valid: 'halfway' is not one of"),
    (lambda p: p["model_config"].update(graph_kk=3), "field 'model_config' is not valid: unknown SLSGConfig"),
    (lambda p: p.update(format="slsg-checkpoint/9"), "unknown checkpoint format 'slsg-checkpoint/9'"),
])
def test_a_bad_checkpoint_names_the_field_and_the_file(network, tmp_path, change, message):
    payload = make_checkpoint(network).to_payload()
    change(payload)
    path = tmp_path / "checkpoint.pt"
    torch.save(payload, path)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path)
    assert message in str(err.value) and str(path) in str(err.value)


def test_a_file_that_is_no_checkpoint_says_so(tmp_path):
    torch.save({"weights": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="is not an SLSG checkpoint"):
        load_checkpoint(tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nowhere")
