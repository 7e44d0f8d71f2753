"""The SLSG network: blocks, the self-attentive graph, the full model, scoring and cost."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from slsg_train.models import (
    PRESETS, SLSG, SLSGConfig, anomaly_probability, count_flops, count_parameters, image_score,
    image_score_log_odds, preset, top_k_for_size,
)
from slsg_train.models.blocks import DecoderStage, SpatialAttention
from slsg_train.models.graph import SelfAttentiveGraph, relative_position_similarity
from slsg_train.training.precision import channels_last

torch.manual_seed(0)


def random_model(name: str = "default", **overrides) -> SLSG:
    return SLSG(preset(name, backbone_weights=None, **overrides))


# --------------------------------------------------------------------------- blocks


def test_spatial_attention_keeps_shape_and_is_residual():
    block = SpatialAttention(24)
    x = torch.randn(2, 24, 16, 12)
    assert block(x).shape == x.shape
    nn.init.zeros_(block.proj.weight)
    nn.init.zeros_(block.proj.bias)
    assert torch.equal(block(x), x)  # with a zero projection only the residual remains


@pytest.mark.parametrize("upsample", [True, False])
def test_decoder_stage_shapes(upsample):
    stage = DecoderStage(64, 32, 16, 48, num_convs=2, extra_channels=8, upsample=upsample)
    x = torch.randn(2, 64, 8, 6) if upsample else torch.randn(2, 64, 16, 12)
    out = stage(x, torch.randn(2, 16, 16, 12), torch.randn(2, 8, 4, 3))
    assert out.shape == (2, 48, 16, 12)
    with pytest.raises(ValueError, match="extra"):
        stage(x, torch.randn(2, 16, 16, 12))


# --------------------------------------------------------------------------- graph


def test_relative_position_similarity_is_one_on_self_and_falls_with_distance():
    rel = relative_position_similarity(3, 5, 64)  # non-square grid, 15 nodes
    assert rel.shape == (15, 15)
    np.testing.assert_allclose(np.diag(rel), 1.0, atol=1e-6)
    np.testing.assert_allclose(rel, rel.T, atol=1e-6)
    along_row = rel[0, :5]  # node (0, 0) against (0, 0..4)
    assert np.all(np.diff(along_row) < 0)


def test_graph_block_shape_and_query_key_learns_through_attention():
    graph = SelfAttentiveGraph(32, k=9, dilation=3)
    x = torch.randn(2, 32, 6, 8, requires_grad=True)
    y = graph(x)
    assert y.shape == x.shape
    y.square().mean().backward()
    assert graph.query_key[0].weight.grad.abs().sum() > 0
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_graph_neighbours_are_every_dilation_th_of_the_best_candidates():
    graph = SelfAttentiveGraph(16, k=4, dilation=3, position_bias=0.0)
    qk = torch.randn(2, 8, 30)  # 5x6 grid
    index = graph.neighbours(qk, 5, 6)
    assert index.shape == (2, 30, 4)
    # Independent ranking by numpy cosine similarity.
    unit = qk.numpy() / np.linalg.norm(qk.numpy(), axis=1, keepdims=True)
    ranking = np.argsort(-np.einsum("bcn,bcm->bnm", unit, unit), axis=-1, kind="stable")
    np.testing.assert_array_equal(index.numpy(), ranking[..., 0:12:3])


@pytest.mark.parametrize("grid,expected_k", [((16, 16), 9), ((4, 4), 9), ((2, 3), 6), ((1, 1), 1)])
def test_graph_neighbours_stay_in_range_for_any_grid(grid, expected_k):
    graph = SelfAttentiveGraph(16, k=9, dilation=3)  # with the authors' position bias
    n = grid[0] * grid[1]
    index = graph.neighbours(torch.randn(3, 8, n), *grid)
    assert index.shape == (3, n, expected_k)
    assert index.min() >= 0 and index.max() < n
    # Neighbours of a node are distinct.
    assert all(len(set(row.tolist())) == expected_k for row in index.reshape(-1, expected_k))


# --------------------------------------------------------------------------- network


@pytest.mark.parametrize("size", [(64, 64), (64, 96), (96, 32)])
def test_default_network_output_shapes_for_multiples_of_32(size):
    model = random_model().eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, *size))
    assert out.logits.shape == out.aux_logits.shape == (2, 2, *size)
    assert torch.isfinite(out.logits).all()
    prob = anomaly_probability(out.logits)
    assert prob.shape == (2, 1, *size)
    torch.testing.assert_close(prob, torch.sigmoid(out.logits[:, 1:2] - out.logits[:, 0:1]))


def test_paper_network_is_the_authors_layout():
    model = random_model("paper").eval()
    assert model.encoder.channels == [64, 64, 128, 256, 512] and model.graph.channels == 512
    assert isinstance(model.skip_attention[0], nn.Identity)  # no attention on the stem skip
    assert [s.extra_channels for s in model.decoder] == [0, 32, 32, 0]
    assert [s.upsample for s in model.decoder] == [True, True, True, False]
    with torch.no_grad():
        out = model(torch.randn(1, 3, 64, 96))
    assert out.logits.shape == (1, 2, 64, 96)


def test_input_not_a_multiple_of_32_is_refused():
    with pytest.raises(ValueError, match="multiples of 32.*64x80"):
        random_model()(torch.randn(1, 3, 64, 80))


def test_decoder_must_match_the_backbone_description():
    with pytest.raises(ValueError, match="4 skip features.*decoder_channels"):
        random_model(decoder_channels=(64, 32, 16))


def test_frozen_encoder_gets_no_gradient_and_keeps_its_statistics():
    model = random_model().train()
    assert not model.encoder.training and model.graph.training
    stats = model.encoder._bn0.running_mean.clone()
    model(torch.randn(2, 3, 64, 64)).logits.mean().backward()
    assert all(p.grad is None and not p.requires_grad for p in model.encoder_parameters())
    assert all(p.grad is not None for p in model.head_parameters())
    assert torch.equal(model.encoder._bn0.running_mean, stats)


def test_unfrozen_encoder_trains():
    model = random_model(freeze_encoder=False).train()
    assert model.encoder.training
    model(torch.randn(2, 3, 64, 64)).logits.mean().backward()
    assert all(p.grad is not None for p in model.encoder_parameters())


def _conv_gradients(conv: nn.Conv2d, x: torch.Tensor, bf16: bool) -> list[torch.Tensor]:
    x = x.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        y = conv(x)
    (y.double() * torch.linspace(-1, 1, y.numel(), dtype=torch.float64).view_as(y)).sum().backward()
    return [y.detach().double(), x.grad.double(), conv.weight.grad.double()]


@pytest.mark.parametrize("groups", [16, 1], ids=["depthwise", "dense"])
def test_channels_last_dilated_convolutions_keep_right_bf16_gradients(groups):
    # torch 2.13's NHWC bf16 weight gradient of a dilated convolution is garbage; channels_last() keeps
    # those convolutions NCHW: everything within bf16 rounding of float64
    torch.manual_seed(0)
    reference = nn.Conv2d(16, 16, 3, padding=3, dilation=3, groups=groups).double()
    x = torch.randn(4, 16, 64, 64, dtype=torch.float64)
    expected = _conv_gradients(reference, x, bf16=False)
    conv = channels_last(nn.Conv2d(16, 16, 3, padding=3, dilation=3, groups=groups).to(torch.float32))
    conv.load_state_dict(reference.state_dict())
    assert conv.weight.is_contiguous()
    for _ in range(3):  # the broken kernel's errors also differ from call to call
        conv.zero_grad()
        for got, want in zip(_conv_gradients(conv, x.float().contiguous(memory_format=torch.channels_last), True),
                             expected):
            assert (got - want).abs().max() <= 0.02 * want.abs().max()


def _distinct_convolutions(model: nn.Module, x: torch.Tensor) -> dict[tuple, nn.Conv2d]:
    """Every distinct Conv2d ``model`` runs on ``x``, keyed by its settings and input shape."""
    seen: dict[tuple, nn.Conv2d] = {}

    def record(conv, args, out):
        key = (conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
               conv.groups, tuple(args[0].shape[1:]))
        seen.setdefault(key, conv)

    hooks = [m.register_forward_hook(record) for m in model.modules() if isinstance(m, nn.Conv2d)]
    with torch.no_grad():
        model(x)
    for hook in hooks:
        hook.remove()
    return seen


def test_every_convolution_of_our_models_computes_right_in_channels_last():
    # the layout is a speed choice only: each kind of convolution that training, pre-training and the
    # composition check run (encoders unfrozen) gives float64's output and gradients within float32's
    # (or bfloat16's) rounding, so a torch update that breaks one more kernel in NHWC fails here
    from slsg_train.models.composition import CompositionCheck
    from slsg_train.training.pretrain import RestorationDecoder, RestorationModel

    runs: list[tuple[nn.Module, torch.Tensor]] = []
    for name in ("default", "paper"):
        model = random_model(name, freeze_encoder=False).eval()
        encoder = model.encoder
        runs += [(model, torch.randn(1, 3, 64, 64)),
                 (RestorationModel(encoder, RestorationDecoder(encoder.channels, encoder.strides)).eval(),
                  torch.randn(1, 3, 64, 64))]
    check = CompositionCheck([16, 24, 40, 112, 320]).eval()
    runs.append((nn.Sequential(check.encoder, check.decoder), torch.randn(1, 3, 128, 128)))
    kinds = {key: conv for model, x in runs for key, conv in _distinct_convolutions(model, x).items()}
    assert len(kinds) > 100 and any(max(key[5]) > 1 for key in kinds)
    wrong = []
    for (cin, cout, kernel, stride, padding, dilation, groups, shape) in kinds:
        torch.manual_seed(0)
        reference = nn.Conv2d(cin, cout, kernel, stride, padding, dilation, groups).double()
        x = torch.randn(2, *shape, dtype=torch.float64)
        expected = _conv_gradients(reference, x, bf16=False)
        for bf16, tolerance in ((False, 1e-4), (True, 0.02)):
            conv = channels_last(nn.Conv2d(cin, cout, kernel, stride, padding, dilation, groups))
            conv.load_state_dict(reference.state_dict())
            got = _conv_gradients(conv, x.float().contiguous(memory_format=torch.channels_last), bf16)
            errors = [float((g - w).abs().max() / w.abs().max()) for g, w in zip(got, expected)]
            if not max(errors) <= tolerance:  # NaN counts as wrong
                wrong.append((cin, cout, kernel, stride, dilation, groups, shape, "bf16" if bf16 else "fp32", errors))
    assert not wrong, wrong


def test_channels_last_model_scores_like_the_nchw_one():
    # (its gradients are compared nowhere: the graph's k-NN and the top-K flip on float rounding)
    torch.manual_seed(0)
    nchw = random_model(patch_memory=False, composition_check=False).eval()
    nhwc = random_model(patch_memory=False, composition_check=False)
    nhwc.load_state_dict(nchw.state_dict())
    channels_last(nhwc).eval()
    convs = [m for m in nhwc.modules() if isinstance(m, nn.Conv2d)]
    dilated = [m for m in convs if max(m.dilation) > 1]
    assert dilated and all(m.weight.is_contiguous() and m._forward_pre_hooks for m in dilated)
    assert all(m.weight.is_contiguous(memory_format=torch.channels_last) for m in convs if m not in dilated)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(nhwc(x).logits, nchw(x).logits, rtol=1e-4, atol=1e-5)


def test_parameter_groups_partition_the_model():
    model = random_model()
    enc, head = list(model.encoder_parameters()), list(model.head_parameters())
    assert {id(p) for p in enc}.isdisjoint({id(p) for p in head})
    # the checks' frozen ImageNet encoder, and the composition check's autoencoder (trained on its own)
    reference = list(model.reference_encoder.parameters()) + list(model.composition_check.parameters())
    assert len(enc) + len(head) + len(reference) == len(list(model.parameters()))
    assert not any(p.requires_grad for p in reference)
    counts = count_parameters(model)
    assert counts["trainable"] == sum(p.numel() for p in head) < counts["total"]


def test_trained_parts_use_the_authors_initialisation():
    model = random_model("paper")
    convs = torch.cat([m.weight.flatten() for m in model.decoder.modules() if isinstance(m, nn.Conv2d)])
    bns = torch.cat([m.weight for m in model.graph.modules() if isinstance(m, nn.BatchNorm2d)])
    assert abs(convs.std().item() - 0.02) < 0.002 and abs(convs.mean().item()) < 0.002
    assert abs(bns.mean().item() - 1.0) < 0.01 and abs(bns.std().item() - 0.02) < 0.005


def test_config_round_trips_through_json():
    config = PRESETS["default"]
    again = SLSGConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert again == config
    with pytest.raises(ValueError, match="graph_kk"):
        SLSGConfig.from_dict({"graph_kk": 3})
    with pytest.raises(ValueError, match="paper, default"):
        preset("tiny")


# --------------------------------------------------------------------------- scoring and cost


def test_top_k_for_size_scales_with_area():
    assert top_k_for_size(256, 256) == 100
    assert top_k_for_size(512, 512) == 400
    assert top_k_for_size(128, 256) == 50
    assert top_k_for_size(32, 32) == 2
    assert top_k_for_size(16, 16) == 1  # never below one pixel
    with pytest.raises(ValueError):
        top_k_for_size(0, 256)


def test_image_score_is_the_mean_of_the_top_k_pixels():
    prob = torch.rand(3, 1, 8, 12)
    expected = np.sort(prob.numpy().reshape(3, -1), axis=1)[:, -5:].mean(axis=1)
    np.testing.assert_allclose(image_score(prob, 5).numpy(), expected, rtol=1e-6)
    with pytest.raises(ValueError, match="top-K"):
        image_score(prob, 97)


def test_image_score_log_odds_is_the_top_k_means_log_odds_without_rounding_to_one():
    log_odds = torch.randn(3, 1, 8, 12, dtype=torch.float64) * 3
    p = image_score(torch.sigmoid(log_odds), 5)
    np.testing.assert_allclose(image_score_log_odds(log_odds, 5).numpy(), torch.logit(p).numpy(), rtol=1e-12)
    # a map whose top pixels all round to probability 1 in float32: the log-odds still tell them apart
    strong = torch.full((3, 1, 8, 12), -5.0)
    strong[:, 0, :2, :3] = torch.tensor([20.0, 30.0, 45.0]).view(3, 1, 1)
    assert torch.all(image_score(torch.sigmoid(strong), 6) == 1.0)
    np.testing.assert_allclose(image_score_log_odds(strong, 6).numpy(), [20, 30, 45], rtol=1e-6)
    # one pixel below the rest: log(mean p) - log(mean (1 - p)), dominated by the weakest pixel's 1 - p
    strong[0, 0, 0, 0] = 10.0
    expected = np.log(np.mean(1 / (1 + np.exp(-np.array([10.0] + [20.0] * 5))))) - np.log(
        np.mean(1 / (1 + np.exp(np.array([10.0] + [20.0] * 5)))))
    assert image_score_log_odds(strong, 6)[0].item() == pytest.approx(expected, rel=1e-5)
    with pytest.raises(ValueError, match="top-K"):
        image_score_log_odds(strong, 97)


def test_score_log_odds_is_the_log_odds_of_the_image_score():
    model = random_model().eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 64, 64))
        scores = model.score_images(out, 8)
        np.testing.assert_allclose(model.score_log_odds(out, 8).numpy(), torch.logit(scores).numpy(), atol=1e-4)
        assert torch.equal(model.anomaly_map(out), torch.sigmoid(model.anomaly_log_odds(out)))


def test_default_preset_is_at_least_four_times_cheaper_than_the_paper():
    paper = count_flops(random_model("paper"), 256, 256)
    default = count_flops(random_model("default"), 256, 256)
    assert 40 < paper < 50  # the authors' network is about 46 GFLOP at 256x256
    assert default <= 12 and default * 4 <= paper
    assert count_flops(random_model("default"), 128, 128) < default / 3  # ~area


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_network_runs_on_cuda_like_on_cpu():
    model = random_model().eval()
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        cpu = model(x).logits
        gpu = model.cuda()(x.cuda()).logits.cpu()
    torch.testing.assert_close(gpu, cpu, atol=1e-3, rtol=1e-3)


# --------------------------------------------------------------------------- global branch (ours)


def _scenes(rng: np.random.Generator, n: int, colour: tuple[int, int, int]) -> list[np.ndarray]:
    """Grey frames with a coloured square that moves about: a 'product' whose look is global."""
    out = []
    for _ in range(n):
        im = np.full((64, 64, 3), 110, np.uint8) + rng.integers(0, 12, (64, 64, 3), dtype=np.uint8)
        y, x = rng.integers(8, 32, 2)
        im[y:y + 24, x:x + 24] = colour
        out.append(im)
    return out


def test_global_branch_is_off_by_default_and_neutral_until_fitted():
    assert random_model().global_branch is None and PRESETS["paper"].global_branch is False
    assert PRESETS["paper"].patch_memory is False and random_model("paper").reference_encoder is None
    model = random_model(global_branch=True).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        out = model(x)
        assert not out.checks  # unfitted: the paper's score alone
        local = image_score(anomaly_probability(out.logits), 8)
        assert torch.equal(model.score_images(out, 8), local)
        model.train()
        assert not model(x).checks  # never computed in training
    assert not any(p.requires_grad for p in model.global_branch.parameters())


def test_fitted_global_branch_flags_a_global_change_the_map_cannot_see():
    from slsg_train.inference import predict
    from slsg_train.data.images import to_tensor
    from slsg_train.training.calibration import fit_checks

    rng = np.random.default_rng(0)
    # ImageNet weights: the branch's features are real
    model = SLSG(preset("default", global_branch=True, patch_memory=False, composition_check=False))
    normal, calib = _scenes(rng, 24, (200, 60, 40)), _scenes(rng, 8, (200, 60, 40))
    wrong_colour = _scenes(rng, 6, (40, 60, 200))
    fit = fit_checks(model, normal, calib, top_k=8)
    assert fit["global_branch"]["feature_dim"] == model.global_branch.dim == 2 * (40 + 112)
    assert bool(model.global_branch.fitted) and "patch_memory" not in fit
    with torch.no_grad():
        out = model.eval()(torch.stack([to_tensor(im) for im in calib + wrong_colour]))
    distance = out.checks["global_branch"].numpy()
    assert distance[8:].min() > distance[:8].max()  # every wrong-colour scene is farther than every normal one
    scores = predict(model, calib + wrong_colour, 8).scores
    combined = model.score_images(out, 8).numpy()
    np.testing.assert_allclose(scores, combined, atol=1e-6)
    log_odds = model.score_log_odds(out, 8).numpy()  # the same combination, in log-odds
    np.testing.assert_allclose(log_odds, np.log(combined) - np.log1p(-combined), atol=1e-3)
    local = image_score(anomaly_probability(out.logits), 8).numpy()
    assert np.all(combined >= local - 1e-7)  # max(local, global): the paper's score is a floor
    assert combined[8:].min() > np.median(combined[:8])


# --------------------------------------------------------------------------- patch memory (ours)


@pytest.mark.parametrize("check, grid", [
    ("patch_memory", (8, 12)),  # stride 8: the shallower of the last two stages
    ("composition_check", (4, 6)),  # stride 16, whatever the autoencoder's own size
])
def test_map_checks_are_on_in_the_default_preset_and_neutral_until_fitted(check, grid):
    assert getattr(PRESETS["paper"], check) is False and getattr(random_model("paper"), check) is None
    model = random_model().eval()
    assert model.global_branch is None
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        out = model(x)
        assert check not in out.checks
        assert torch.equal(model.anomaly_map(out), anomaly_probability(out.logits))
        getattr(model, check).fitted.fill_(True)
        out = model(x)
        assert out.checks[check].shape == (2, 1, *grid)
        assert model.anomaly_map(out).shape == (2, 1, 64, 96)
        assert not model.train()(x).checks  # never computed in SLSG's training


def test_coreset_keeps_one_patch_of_every_kind_however_rare():
    from slsg_train.models.patch_memory import coreset

    rng = np.random.default_rng(0)
    centres = rng.normal(0, 10, (6, 200))
    sizes = [2000, 3, 1, 50, 7, 400]  # one common patch kind, several rare ones
    points = np.concatenate([c + rng.normal(0, 0.01, (n, 200)) for c, n in zip(centres, sizes)])
    kind = np.repeat(np.arange(6), sizes)
    chosen = coreset(torch.from_numpy(points).float(), 6, progress=False).numpy()
    assert sorted(kind[chosen]) == list(range(6))
    assert coreset(torch.zeros(4, 8), 10, progress=False).tolist() == [0, 1, 2, 3]  # fewer than size: all


def test_patch_memory_distance_is_the_nearest_memory_patch():
    from slsg_train.models.patch_memory import PatchMemoryBranch

    branch = PatchMemoryBranch([4, 3, 5], levels=2, size=16)
    maps = [torch.randn(2, 4, 8, 8), torch.randn(2, 3, 4, 4), torch.randn(2, 5, 2, 2)]
    patches = branch.patch_features(maps)
    assert patches.shape == (2, 8, 4, 4)
    train = patches[:1].permute(0, 2, 3, 1).reshape(-1, 8)
    assert branch.fit_memory(train, progress=False) == 16
    distance = branch(torch.zeros(2, 3, 32, 32), maps)  # the image: unused by this check
    naive = torch.cdist(patches.permute(0, 2, 3, 1).reshape(-1, 8), branch.memory).min(1).values ** 2
    torch.testing.assert_close(distance.flatten(), naive, atol=1e-4, rtol=1e-4)
    assert distance[0].max() < 1e-4 < distance[1].min()  # every training patch is in a 16-patch memory
    small = PatchMemoryBranch([4, 3, 5], levels=2, size=40)
    assert small.fit_memory(train, progress=False) == 16  # fewer patches than memory: repeats fill it
    torch.testing.assert_close(small(torch.zeros(2, 3, 32, 32), maps), distance, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="shape"):
        small.fit_memory(torch.zeros(5, 7), progress=False)


def test_patch_grid_upsampling_puts_each_patch_on_its_receptive_field_centre():
    from slsg_train.models.patch_memory import resize_patches

    grid = torch.zeros(1, 1, 4, 6)
    grid[0, 0, 2, 1] = 1.0  # one hot patch at row 2, column 1 of a stride-8 grid
    up = resize_patches(grid, (32, 48))
    assert up.shape == (1, 1, 32, 48)
    assert np.unravel_index(int(up.argmax()), (32, 48)) == (16, 8)  # pixel (8 * 2, 8 * 1)
    assert up[0, 0, 16, 8] == 1.0 and up[0, 0, 16, 12] == pytest.approx(0.5)  # bilinear in between
    ramp = torch.arange(4.0).view(1, 1, 4, 1).expand(1, 1, 4, 6)
    assert torch.equal(resize_patches(ramp, (32, 48))[0, 0, 24:, 0], torch.full((8,), 3.0))  # edge repeats
    with pytest.raises(ValueError, match="whole stride"):
        resize_patches(grid, (30, 48))


def _scenes_with_stain(rng: np.random.Generator, n: int) -> tuple[list[np.ndarray], list[tuple[int, int]]]:
    images, where = [], []
    for im in _scenes(rng, n, (200, 60, 40)):
        y, x = (int(v) for v in rng.integers(4, 50, 2))
        im[y:y + 10, x:x + 10] = (30, 160, 230)  # a small foreign stain
        images.append(im)
        where.append((y + 5, x + 5))
    return images, where


def test_fitted_patch_memory_scores_and_locates_a_local_defect():
    from slsg_train.inference import predict
    from slsg_train.models.patch_memory import resize_patches
    from slsg_train.data.images import to_tensor
    from slsg_train.training.calibration import fit_checks

    rng = np.random.default_rng(1)
    # ImageNet weights; SLSG itself untrained: its map knows nothing
    model = SLSG(preset("default", composition_check=False))
    normal, calib = _scenes(rng, 24, (200, 60, 40)), _scenes(rng, 8, (200, 60, 40))
    stained, centres = _scenes_with_stain(rng, 6)
    fit = fit_checks(model, normal, calib, top_k=8, progress=False)
    assert fit["patch_memory"]["candidates"] == 24 * 8 * 8 and bool(model.patch_memory.fitted)
    scores = predict(model, calib + stained, 8).scores
    assert scores[8:].min() > scores[:8].max()  # every stained scene above every normal one
    with torch.no_grad():
        out = model.eval()(torch.stack([to_tensor(im) for im in stained]))
        assert torch.all(model.anomaly_map(out) >= anomaly_probability(out.logits))  # the paper's map is a floor
        distance = resize_patches(out.checks["patch_memory"], (64, 64), model.patch_memory.centred_last)[:, 0].numpy()
    offsets = np.array([np.subtract(np.unravel_index(m.argmax(), m.shape), c) for m, c in zip(distance, centres)])
    assert np.abs(offsets).max() <= 12  # each peak within a stride-8 patch and a half of its stain's centre
    # and on average near it (measured 2.2 and 2.3 px down-right): the encoder padded symmetrically put
    # them 3.2 and 3.3 px down-right, its SAME grid placed as a symmetric one 4.8 and 4.7 px up-left
    assert np.all(np.abs(offsets.mean(axis=0)) <= 2.75), offsets


def _spot_on_dark_ground(rng: np.random.Generator, centre: tuple[int, int] | None, size: int = 128) -> np.ndarray:
    image = np.clip(40 + rng.normal(0, 3, (size, size, 3)), 0, 255)
    if centre is not None:
        yy, xx = np.mgrid[:size, :size]
        image[(yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 < 36] = 230  # a bright spot of radius 6
    return image.astype(np.uint8)


@pytest.mark.parametrize("padding, directional", [("same", False), ("symmetric", True)])
def test_patch_memory_answers_a_spot_alike_in_every_direction(padding, directional):
    # A distance map that answers a defect more strongly below and right of it than above and left grows
    # a band from the defect to the bottom or right border: what the Lite backbones' ImageNet weights
    # give when their strided convolutions pad as PyTorch does, not as TensorFlow trained them.
    from slsg_train.data.images import to_tensor
    from slsg_train.models.patch_memory import PatchMemoryBranch
    from slsg_train.models.reference import ReferenceEncoder

    rng = np.random.default_rng(0)
    encoder = ReferenceEncoder("efficientnet_lite0", "imagenet", padding=padding).eval()
    memory = PatchMemoryBranch(encoder.channels, size=512)
    centres = [(64, 64), (40, 48), (48, 80), (80, 40), (72, 88)]
    with torch.no_grad():
        normal = torch.stack([to_tensor(_spot_on_dark_ground(rng, None)) for _ in range(6)])
        memory.fit_memory(memory.collect(normal, encoder(normal)), progress=False)
        spots = torch.stack([to_tensor(_spot_on_dark_ground(rng, c)) for c in centres])
        grids = memory(spots, encoder(spots))[:, 0].numpy()  # [5, 16, 16], stride 8
    below, above, right, left = np.mean([[
        grid[y + 3:, x - 1:x + 2].mean(), grid[:y - 2, x - 1:x + 2].mean(),  # 3+ patches away, 3 patches wide
        grid[y - 1:y + 2, x + 3:].mean(), grid[y - 1:y + 2, :x - 2].mean(),
    ] / np.median(grid) for grid, (y, x) in ((g, (cy // 8, cx // 8)) for g, (cy, cx) in zip(grids, centres))], axis=0)
    # the same padding: no direction is favoured (measured 0.9 and 0.8); symmetric: 2.6 and 2.2
    assert (below / above > 1.3 and right / left > 1.3) == directional, (below, above, right, left)


def test_old_checkpoints_with_the_encoder_inside_the_global_branch_still_load():
    model = random_model(global_branch=True, patch_memory=False)
    state = model.state_dict()
    old = {(k.replace("reference_encoder.backbone.", "global_branch.encoder.") if k.startswith("reference_encoder.")
            else k): v for k, v in state.items()}
    assert any(k.startswith("global_branch.encoder.") for k in old)
    fresh = random_model(global_branch=True, patch_memory=False)
    fresh.load_state_dict(old)
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, state[k]), k


# --------------------------------------------------------------------------- composition check (ours)


def test_composition_check_settings_are_checked_when_built():
    with pytest.raises(ValueError, match="latent"):
        random_model(composition_latent=0)
    with pytest.raises(ValueError, match="composition_steps"):
        preset("default", composition_steps=0)
    with pytest.raises(ValueError, match="composition_restoration"):
        preset("default", composition_restoration=1.5)
    assert preset("default").composition_restoration == 0.5  # older checkpoints: test_checkpoint.py


def test_composition_error_is_counted_above_the_normal_images_error_at_each_place():
    from slsg_train.models.composition import GRID, CompositionCheck, autoencoder_input

    torch.manual_seed(0)
    check = CompositionCheck([8, 16]).eval()
    x = torch.randn(6, 3, 64, 64)
    maps = [torch.randn(6, 8, 2 * GRID, 2 * GRID), torch.randn(6, 16, GRID, GRID)]  # a 256 px input's grid
    maps[1][:, :, :4] += 3.0  # the top rows are harder to rebuild: their normal error is larger
    features = check.features(maps)
    check.fit_standardisation(features)
    with torch.no_grad():
        raw = check.squared_error(x, features)
        assert torch.equal(check(x, maps), raw)  # no baseline yet: the raw error
        check.fit_normal_error(autoencoder_input(x), features, batch_size=4)  # 4 + 2: a ragged last batch
        excess = check(x, maps)
    baseline = check.normal_error
    assert baseline.shape == (1, 1, GRID, GRID) and baseline[..., :4, :].mean() > 2 * baseline[..., 4:, :].mean()
    torch.testing.assert_close(raw.mean(dim=0, keepdim=True), baseline)  # the fitted images' mean, per place
    torch.testing.assert_close(excess, raw - baseline)
    assert excess.mean(dim=0).abs().max() < 1e-4
    with pytest.raises(ValueError, match="normal error needs"):
        check.fit_normal_error(autoencoder_input(x), features[:3])


def test_old_checkpoints_without_the_composition_checks_normal_error_still_load():
    model = random_model()
    model.composition_check.normal_error.fill_(1.0)
    old = {k: v for k, v in model.state_dict().items() if k != "composition_check.normal_error"}
    fresh = random_model()
    fresh.composition_check.normal_error.fill_(1.0)
    fresh.load_state_dict(old)  # strict: the missing buffer is filled in, as zero
    assert torch.count_nonzero(fresh.composition_check.normal_error) == 0


def _paired_scenes(rng: np.random.Generator, n: int, mismatch: bool = False) -> list[np.ndarray]:
    """Two squares whose colours go in pairs (red with blue, green with yellow), placed anywhere on
    their half: with ``mismatch`` the right square wears the other pair's colour. Each square alone
    looks normal; only the pairing is wrong."""
    pairs = [((200, 40, 40), (40, 60, 200)), ((40, 170, 60), (220, 200, 40))]
    out = []
    for i in range(n):
        im = np.full((64, 64, 3), 110, np.uint8) + rng.integers(0, 12, (64, 64, 3), dtype=np.uint8)
        left, right = pairs[i % 2][0], pairs[(i + mismatch) % 2][1]
        (y1, y2), x1, x2 = rng.integers(8, 36, 2), rng.integers(2, 10), rng.integers(34, 42)
        im[y1:y1 + 20, x1:x1 + 20], im[y2:y2 + 20, x2:x2 + 20] = left, right
        out.append(im)
    return out


STEPS_FOR_RULE = 400  # the autoencoder's training steps in the test: ~10 s on 2 cores


def test_fitted_composition_check_flags_parts_that_do_not_go_together():
    from slsg_train.inference import predict
    from slsg_train.models.patch_memory import resize_patches
    from slsg_train.data.images import to_tensor
    from slsg_train.training.calibration import fit_checks

    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    # EfficientAD's training on normal images only: with two parts that could each be the changed one,
    # learning to undo a change does not help (0.81-0.89 vs 0.86-0.95 over three seeds, 400-1200 steps)
    model = SLSG(preset("default", patch_memory=False, component_check=False, composition_check=True,
                        composition_steps=STEPS_FOR_RULE,
                        composition_restoration=0.0))
    normal, calib, mismatched = _paired_scenes(rng, 24), _paired_scenes(rng, 8), _paired_scenes(rng, 8, True)
    fit = fit_checks(model, normal, calib, top_k=8, progress=False)
    assert fit["composition_check"]["steps"] == STEPS_FOR_RULE and bool(model.composition_check.fitted)
    assert model.composition_check.normal_error.min() > 0  # fitted on the normal images after training
    with torch.no_grad():
        out = model.eval()(torch.stack([to_tensor(im) for im in calib + mismatched]))
        error = image_score(resize_patches(out.checks["composition_check"], (64, 64)), 8).numpy()
        assert torch.all(model.anomaly_map(out) >= anomaly_probability(out.logits))  # the paper's map is a floor
    normal_error, mismatch_error = error[:8], error[8:]
    auroc = (mismatch_error[:, None] > normal_error[None]).mean()
    assert auroc >= 0.85, (normal_error, mismatch_error)
    scores = predict(model, calib + mismatched, 8).scores
    assert np.median(scores[8:]) > np.median(scores[:8])


def test_restoration_inputs_are_simulated_logical_anomalies_of_each_training_image():
    from slsg_train.models.composition import autoencoder_input
    from slsg_train.simulation import SimulationConfig
    from slsg_train.training.composition import restoration_inputs
    from slsg_train.data.images import to_tensor

    images = _paired_scenes(np.random.default_rng(0), 6)
    inputs, sources = restoration_inputs(images, SimulationConfig(), seed=3, copies=2, progress=False)
    assert inputs.shape == (12, 3, 128, 128) and inputs.dtype == torch.float16
    assert sources.tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5]
    clean = autoencoder_input(torch.stack([to_tensor(im) for im in images]))[sources]
    changed = (inputs.float() - clean).abs().amax(dim=1) > 0.1
    assert changed.flatten(1).any(dim=1).all()  # every copy differs from the image it came from ...
    assert changed.float().mean() < 0.5  # ... in a part of it
    again, _ = restoration_inputs(images, SimulationConfig(), seed=3, copies=2, progress=False)
    assert torch.equal(inputs, again)
    with pytest.raises(ValueError, match="restoration inputs need"):
        restoration_inputs([], SimulationConfig())


@pytest.mark.parametrize("precision, dtype", [("fp32", torch.float32), ("bf16", torch.bfloat16)])
def test_composition_check_trains_in_the_given_precision_and_scores_in_float32(precision, dtype):
    from slsg_train.models.composition import CompositionCheck
    from slsg_train.training.composition import train_composition_check

    torch.manual_seed(0)
    inputs, maps = torch.randn(4, 3, 128, 128), [torch.randn(4, 8, 8, 8), torch.randn(4, 16, 4, 4)]
    check = channels_last(CompositionCheck([8, 16]))
    features = check.features(maps)
    seen = []
    hook = check.decoder[-1].register_forward_hook(lambda module, args, out: seen.append(out.dtype))
    report = train_composition_check(check, inputs, features, 3, batch_size=2, progress=False, precision=precision)
    assert seen == [dtype] * 3 and report["precision"] == precision
    assert all(p.dtype == torch.float32 for p in check.parameters())  # float32 master weights
    seen.clear()
    error = check.squared_error(inputs, features)  # scoring, after training: float32 whatever it trained in
    hook.remove()
    assert seen == [torch.float32] and error.dtype == torch.float32 and torch.isfinite(error).all()


def test_restoration_share_swaps_part_of_each_batch_and_zero_trains_as_without():
    from slsg_train.models.composition import CompositionCheck
    from slsg_train.training.composition import _with_restoration, train_composition_check

    simulated = (100 + torch.arange(10, dtype=torch.float16)).view(10, 1, 1, 1).expand(10, 3, 4, 4)
    sources = torch.tensor([7, 7, 3, 3, 9, 9, 1, 1, 5, 5])
    batch, pick = torch.zeros(64, 3, 4, 4), torch.arange(64)
    x, targets = _with_restoration(batch, pick, (simulated, sources), 0.5, torch.Generator().manual_seed(0))
    swapped = x[:, 0, 0, 0] >= 100
    assert 16 < int(swapped.sum()) < 48 and not batch.any()  # about half, the caller's batch untouched
    assert torch.equal(targets[~swapped], pick[~swapped])
    assert torch.equal(targets[swapped], sources[(x[swapped, 0, 0, 0] - 100).long()])  # the copy's own image

    torch.manual_seed(0)
    inputs, maps = torch.randn(4, 3, 128, 128), [torch.randn(4, 8, 8, 8), torch.randn(4, 16, 4, 4)]
    plain = CompositionCheck([8, 16])
    with_pool = CompositionCheck([8, 16])
    with_pool.load_state_dict(plain.state_dict())
    features = plain.features(maps)
    torch.manual_seed(1)  # the decoder's dropout draws from the global generator
    train_composition_check(plain, inputs, features, 3, batch_size=2, progress=False)
    torch.manual_seed(1)
    report = train_composition_check(with_pool, inputs, features, 3, batch_size=2, progress=False,
                                     restoration=(simulated, sources), restoration_share=0.0)
    assert report["restoration_inputs"] == 0
    assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), with_pool.state_dict().values()))
    with pytest.raises(ValueError, match="same training images"):  # sources index images 0-9, there are 4
        train_composition_check(plain, inputs, features, 3, restoration=(simulated, sources), restoration_share=0.5)
