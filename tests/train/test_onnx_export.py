"""ONNX export of the contract graph: ONNX Runtime vs PyTorch, metadata, dynamic batch, atomic writes."""

from __future__ import annotations

import copy

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from skimage import data
from skimage.transform import resize

from onnx_fixtures import slsg_alone_with_varied_head
from slsg.contract import (
    ANOMALY_MAP_PROBABILITY, INPUT_IMAGE, MODEL_CARD_KEY, OUTPUT_ANOMALY_MAP, OUTPUT_SCORE,
    Calibration, ModelCard,
)
from slsg_train.export import ExportError, InferenceGraph, calibrate, export_onnx
from slsg_train.export.onnx_export import score_gain
from slsg_train.models import SLSG, SelfAttentiveGraph, preset, top_k_for_size

HEIGHT, WIDTH = 64, 96  # non-square on purpose


@pytest.fixture(scope="module")
def model() -> SLSG:
    """SLSG alone (the reference checks have their own tests), its map varying from image to image."""
    return slsg_alone_with_varied_head()


@pytest.fixture(scope="module")
def card() -> ModelCard:
    return ModelCard(
        name="pushpins", category="pushpins", backbone="efficientnet_lite0", input_height=HEIGHT,
        input_width=WIDTH, top_k=top_k_for_size(HEIGHT, WIDTH),
        calibration=Calibration(raw_threshold=0.8, score_min=0.5), project_version="test",
    )


def real_image() -> np.ndarray:
    return (resize(data.chelsea(), (HEIGHT, WIDTH), anti_aliasing=True) * 255).round().astype(np.uint8)


def test_calibrate_equals_contract_calibrated_score():
    log_odds = torch.cat([torch.linspace(-30, 60, 181, dtype=torch.float64), torch.tensor([-torch.inf, torch.inf])])
    for cal in (Calibration(), Calibration(raw_threshold=0.3, score_min=0.1, score_median=0.2),
                Calibration(raw_threshold=0.05, score_min=0.2),  # threshold below score_min
                Calibration(raw_threshold=1.0000001, score_min=0.9, score_median=0.99)):  # above every score
        np.testing.assert_allclose(calibrate(log_odds, cal).numpy(), cal.calibrated_score(log_odds.numpy()),
                                   atol=1e-12)


def test_export_round_trip_matches_pytorch(model, card, tmp_path):
    path = tmp_path / "pushpins" / "1" / "model.onnx"
    result = export_onnx(model, card, path, verify_images=[real_image()])
    assert result.path == path and path.is_file()
    assert result.max_map_diff <= 1e-4 and result.max_score_diff <= 1e-4
    assert result.checked_images == 1 + 3 + 1
    assert [p.name for p in path.parent.iterdir()] == ["model.onnx"]  # no temp or external-data files

    onnx_model = onnx.load(str(path))
    assert not any(onnx.external_data_helper.uses_external_data(t) for t in onnx_model.graph.initializer)
    meta = {p.key: p.value for p in onnx_model.metadata_props}
    assert ModelCard.from_json(meta[MODEL_CARD_KEY]) == card
    dims = [d.dim_param or d.dim_value for d in onnx_model.graph.input[0].type.tensor_type.shape.dim]
    assert onnx_model.graph.input[0].name == INPUT_IMAGE and dims == ["batch", HEIGHT, WIDTH, 3]

    # Our own comparison on a new batch size (dynamic batch), incl. a real photo.
    rng = np.random.default_rng(7)
    batch = np.concatenate([real_image()[None], rng.integers(0, 256, (4, HEIGHT, WIDTH, 3), dtype=np.uint8)])
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    onnx_map, onnx_score = session.run([OUTPUT_ANOMALY_MAP, OUTPUT_SCORE], {INPUT_IMAGE: batch})
    with torch.no_grad():
        torch_map, _ = InferenceGraph(model, card.top_k, card.calibration)(torch.from_numpy(batch))
    assert onnx_map.shape == (5, 1, HEIGHT, WIDTH) and onnx_score.shape == (5, 1)
    assert onnx_map.dtype == onnx_score.dtype == np.float32
    assert torch_map.std() > 0.05  # a map with structure, so the comparison means something
    np.testing.assert_allclose(onnx_map, torch_map.numpy(), atol=1e-4)
    # Map and score are the contract's calibration, the map's pixel by pixel, of the network's
    # fused log-odds and of the top-K mean of its probabilities (float64 here).
    with torch.no_grad():
        reference = copy.deepcopy(InferenceGraph(model, card.top_k, card.calibration)).double()
        x = (torch.from_numpy(batch).permute(0, 3, 1, 2).double() - reference.mean) / reference.std
        pixel_log_odds = reference.model.anomaly_log_odds(reference.model(x)).numpy()
    np.testing.assert_allclose(onnx_map, card.calibration.calibrated_score(pixel_log_odds), atol=1e-4)
    assert (onnx_map < 0.5).any() and (onnx_map > 0.5).any()
    probability = 1.0 / (1.0 + np.exp(-pixel_log_odds))
    raw = np.sort(probability.reshape(5, -1), axis=1)[:, -card.top_k:].mean(axis=1)
    log_odds = np.log(raw) - np.log1p(-raw)
    np.testing.assert_allclose(onnx_score[:, 0], card.calibration.calibrated_score(log_odds), atol=1e-4)
    assert (onnx_score < 0.5).any() and (onnx_score > 0.5).any()  # both branches of the calibration


def test_clear_anomalies_keep_their_order_through_onnx(model, card, tmp_path):
    """A head biased 30 log-odds towards the anomaly: every pixel's probability, and so the paper's raw
    score, is 1.0 in float32; the exported score still ranks the images by their log-odds."""
    confident = copy.deepcopy(model)
    with torch.no_grad():
        confident.segmentation_head[-1].bias[1] += 30.0
    cal = Calibration(raw_threshold=0.9, score_min=0.05, score_median=0.2)
    sure = ModelCard.from_json(card.to_json())
    sure.calibration = cal
    result = export_onnx(confident, sure, tmp_path / "model.onnx")
    assert result.max_score_diff <= 1e-4
    frames = np.concatenate([real_image()[None],
                             np.random.default_rng(5).integers(0, 256, (5, HEIGHT, WIDTH, 3), dtype=np.uint8)])
    score = ort.InferenceSession(str(result.path), providers=["CPUExecutionProvider"]).run(
        [OUTPUT_SCORE], {INPUT_IMAGE: frames})[0][:, 0]
    with torch.no_grad():
        x = InferenceGraph(confident, sure.top_k, cal).double()
        out = x.model((torch.from_numpy(frames).permute(0, 3, 1, 2).double() - x.mean) / x.std)
        raw = confident.score_images(out, sure.top_k).float()
        log_odds = confident.score_log_odds(out, sure.top_k).numpy()
    assert torch.all(raw == 1.0)  # the paper's score cannot tell these images apart
    assert len(set(score.tolist())) == len(frames) and 0.5 < score.min() and score.max() < 1.0
    assert np.array_equal(np.argsort(score), np.argsort(log_odds))
    np.testing.assert_allclose(score, cal.calibrated_score(log_odds), atol=1e-5)


def test_clear_anomalies_keep_their_order_in_the_map(model, card, tmp_path):
    """The same for the map: where every pixel's probability is 1.0 in float32, the exported map still
    has one value per log-odds, under 1, so regions and heat maps keep their order."""
    confident = copy.deepcopy(model)
    with torch.no_grad():
        confident.segmentation_head[-1].bias[1] += 30.0
    sure = ModelCard.from_json(card.to_json())
    sure.calibration = Calibration(raw_threshold=0.9, score_min=0.05, score_median=0.2)
    result = export_onnx(confident, sure, tmp_path / "model.onnx")
    assert result.max_map_diff <= 1e-4
    frame = real_image()[None]
    onnx_map = ort.InferenceSession(str(result.path), providers=["CPUExecutionProvider"]).run(
        [OUTPUT_ANOMALY_MAP], {INPUT_IMAGE: frame})[0].ravel()
    with torch.no_grad():
        x = InferenceGraph(confident, sure.top_k, sure.calibration).double()
        pixel_log_odds = x.model.anomaly_log_odds(x.model((torch.from_numpy(frame).permute(0, 3, 1, 2).double()
                                                             - x.mean) / x.std)).numpy().ravel()
    assert np.all(torch.sigmoid(torch.from_numpy(pixel_log_odds).float()).numpy() == 1.0)
    assert 0.5 < onnx_map.min() and onnx_map.max() < 1.0
    assert len(np.unique(onnx_map)) > 0.9 * onnx_map.size  # the probability map has a single value
    assert np.corrcoef(onnx_map, sure.calibration.calibrated_score(pixel_log_odds))[0, 1] > 0.9999


def test_export_refuses_a_card_that_says_the_map_is_a_probability(model, card, tmp_path):
    old_style = ModelCard.from_json(card.to_json())
    old_style.anomaly_map_scale = ANOMALY_MAP_PROBABILITY
    with pytest.raises(ExportError, match="anomaly_map_scale 'probability'"):
        export_onnx(model, old_style, tmp_path / "model.onnx")
    assert list(tmp_path.iterdir()) == []


def test_score_gain_is_the_calibrations_steepest_slope():
    assert score_gain(Calibration()) == 1.0  # raw 0..0.5 onto 0..0.5 below the threshold
    assert score_gain(Calibration(raw_threshold=0.8, score_min=0.5)) == pytest.approx(0.5 / 0.3)
    assert score_gain(Calibration(raw_threshold=0.5, score_min=0.4999)) == pytest.approx(5000)


def test_dynamo_exporter_gives_the_same_graph(model, card, tmp_path):
    result = export_onnx(model, card, tmp_path / "model.onnx", dynamo=True)
    assert result.max_map_diff <= 1e-4 and result.max_score_diff <= 1e-4
    session = ort.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])
    assert session.run([OUTPUT_SCORE], {INPUT_IMAGE: real_image()[None].repeat(2, 0)})[0].shape == (2, 1)


def test_mismatch_beyond_tolerance_writes_nothing(model, card, tmp_path):
    path = tmp_path / "model.onnx"
    path.write_bytes(b"previous version")
    first = export_onnx(model, card, tmp_path / "probe.onnx")
    worst = max(first.max_map_diff, first.max_score_diff)
    assert worst > 0  # ONNX Runtime's kernels never match PyTorch's bit for bit on this network
    with pytest.raises(ExportError, match=r"differs from PyTorch by .*> tolerance"):
        export_onnx(model, card, path, tolerance=worst / 2)
    assert path.read_bytes() == b"previous version"  # the old file is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx", "probe.onnx"]


def test_bad_verify_image_fails_before_writing(model, card, tmp_path):
    path = tmp_path / "model.onnx"
    with pytest.raises(ExportError, match=r"verify image 1: expected a uint8 array of shape \(64, 96, 3\)"):
        export_onnx(model, card, path, verify_images=[real_image(), np.zeros((96, 64, 3), np.uint8)])
    assert not path.exists() and list(tmp_path.iterdir()) == []


def test_card_size_must_suit_the_network(model, card, tmp_path):
    bad = ModelCard.from_json(card.to_json())
    bad.input_width = 100
    with pytest.raises(ValueError, match="multiples of 32"):
        export_onnx(model, bad, tmp_path / "model.onnx")
    assert list(tmp_path.iterdir()) == []


def test_float64_reference_graph_agrees_with_float32(model, card):
    """The verification's tie-break reference: the same graph in float64 (k-NN near-ties settled)."""
    graph = InferenceGraph(model, card.top_k, card.calibration).eval()
    frames = torch.from_numpy(np.random.default_rng(3).integers(0, 256, (2, card.input_height, card.input_width, 3),
                                                                dtype=np.uint8))
    with torch.no_grad():
        map32, score32 = graph(frames)
        map64, score64 = copy.deepcopy(graph).double()(frames)
    assert map64.dtype == torch.float64 and score64.shape == score32.shape
    torch.testing.assert_close(map64.float(), map32, atol=1e-4, rtol=0)
    torch.testing.assert_close(score64.float(), score32, atol=1e-4, rtol=0)


def test_reference_checks_export_and_match_pytorch(card, tmp_path):
    from slsg_train.training.calibration import fit_checks

    torch.manual_seed(0)
    # the patch memory and the composition and component checks are on in the preset; the autoencoder trains a
    # few steps
    net = SLSG(preset("default", global_branch=True, composition_steps=20))
    rng = np.random.default_rng(3)
    photo = real_image()
    normal = [np.clip(photo.astype(int) + rng.integers(-20, 21, photo.shape), 0, 255).astype(np.uint8)
              for _ in range(9)]
    with pytest.raises(ExportError, match="global branch was never fitted"):
        export_onnx(net, card, tmp_path / "unfitted.onnx")
    assert not (tmp_path / "unfitted.onnx").exists()
    net.global_branch.fitted.fill_(True)
    with pytest.raises(ExportError, match="patch memory was never fitted"):
        export_onnx(net, card, tmp_path / "unfitted.onnx")
    net.patch_memory.fitted.fill_(True)
    with pytest.raises(ExportError, match="composition check was never fitted"):
        export_onnx(net, card, tmp_path / "unfitted.onnx")
    fit_checks(net, normal[:5], normal[5:8], card.top_k, progress=False)
    result = export_onnx(net.eval(), card, tmp_path / "model.onnx", verify_images=[photo])
    assert result.max_score_diff <= 1e-4 and result.max_map_diff <= 1e-4
    session = ort.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])
    odd = rng.integers(0, 256, (2, HEIGHT, WIDTH, 3), dtype=np.uint8)  # far from the photo: outliers
    # a normal frame the checks were not fitted on (the clean photo is not one: every normal frame is noisy)
    frames = np.concatenate([normal[8][None], odd])
    onnx_map, onnx_score = session.run([OUTPUT_ANOMALY_MAP, OUTPUT_SCORE], {INPUT_IMAGE: frames})
    with torch.no_grad():
        torch_map, torch_score = InferenceGraph(net, card.top_k, card.calibration)(torch.from_numpy(frames))
    np.testing.assert_allclose(onnx_score[:, 0], torch_score[:, 0].numpy(), atol=1e-4)
    np.testing.assert_allclose(onnx_map, torch_map.numpy(), atol=1e-4)
    assert onnx_score[1:, 0].min() > onnx_score[0, 0]  # the checks raised the outliers
    assert onnx_map[1:].mean() > onnx_map[0].mean()  # and the patch memory raised their maps


def test_a_flipped_near_tie_is_recognised_and_nothing_else_is(model, card, tmp_path, monkeypatch):
    """ONNX Runtime that picked another neighbour at a near-tie passes; the same flip beyond the margin fails."""
    import slsg_train.export.onnx_export as onnx_export

    frame = real_image()
    graph = InferenceGraph(model, card.top_k, card.calibration).eval()
    captured = {}
    hook = model.graph.register_forward_hook(lambda m, args, out: captured.setdefault("x", args[0]))
    with torch.no_grad():
        graph(torch.from_numpy(frame[None]))
    hook.remove()
    x = captured["x"]
    ties = model.graph.near_ties(x, margin=float("inf"))
    assert ties == sorted(ties, key=lambda t: t.gap) and all(t.gap >= 0 for t in ties)

    # An "ONNX Runtime" that resolves one tie the other way: the flip baked into the exported graph.
    nodes = x.shape[2] * x.shape[3]
    with torch.no_grad():
        plain_map, _ = graph(torch.from_numpy(frame[None]))
        for tie in ties:  # the closest tie whose flip visibly moves the map
            offset = torch.zeros(1, nodes, nodes)
            offset[0, tie.node, tie.lower] = 2 * tie.gap + 1e-6
            model.graph.similarity_offset = offset
            flipped_map, _ = graph(torch.from_numpy(frame[None]))
            if (flipped_map - plain_map).abs().max() > 1e-3:
                break
    path = tmp_path / "flipped.onnx"
    try:
        onnx_export._write_onnx(graph, card, path, 17, False)
    finally:
        model.graph.similarity_offset = None
    ref = copy.deepcopy(graph)  # verify_onnx's float64 copy is made from the clean graph

    monkeypatch.setattr(onnx_export, "NEAR_TIE_MARGIN", tie.gap * 10 + 1e-6)
    check = onnx_export.verify_onnx(path, ref, [frame[None]], tolerance=1e-4)
    assert check.near_tie_images == 1 and check.max_map_diff <= 1e-4

    monkeypatch.setattr(onnx_export, "NEAR_TIE_MARGIN", tie.gap / 10)
    with pytest.raises(ExportError, match="differs from PyTorch"):
        onnx_export.verify_onnx(path, ref, [frame[None]], tolerance=1e-4)


def test_near_ties_are_the_rank_pairs_that_change_the_choice():
    block = SelfAttentiveGraph(16, k=3, dilation=2).eval()  # chosen ranks 0, 2, 4 of the 6 best
    x = torch.randn(1, 16, 4, 4)
    with torch.no_grad():
        ties = block.near_ties(x, margin=float("inf"))
        # per node, pairs (r, r+1) of ranks 0..6 with exactly one side chosen: r = 0..4 (not 5-6) -> 5
        assert len(ties) == 16 * 5
        tie = ties[0]
        qk = block.query_key(block.fc_in(x)).flatten(2)
        before = block.neighbours(qk, 4, 4)[0, tie.node]
        offset = torch.zeros(1, 16, 16)
        offset[0, tie.node, tie.lower] = 2 * tie.gap + 1e-6
        block.similarity_offset = offset
        after = block.neighbours(qk, 4, 4)[0, tie.node]
    assert tie.higher in before.tolist() or tie.lower in before.tolist()
    assert before.tolist() != after.tolist()
    with pytest.raises(ValueError, match="one image"):
        block.near_ties(torch.randn(2, 16, 4, 4), 1e-5)
