"""Backbone registry: feature descriptions, real EfficientNet-Lite0 ImageNet weights, ResNet-18 loading."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from skimage import data
from skimage.transform import resize

from slsg.contract import IMAGENET_MEAN, IMAGENET_STD
from slsg_train.models.backbones import (
    BACKBONES, RESNET18_FILENAME, BackboneWeightsError, SamePaddedConv2d, create_backbone,
    efficientnet_lite_classifier, register_backbone,
)

IMAGENET_CAT_CLASSES = range(281, 286)  # tabby, tiger cat, Persian, Siamese, Egyptian cat


def torchvision_resnet18_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """A random state dict with torchvision's resnet18 key names and shapes (fc included)."""
    g = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = {}

    def conv(name: str, out_c: int, in_c: int, k: int) -> None:
        state[f"{name}.weight"] = torch.randn(out_c, in_c, k, k, generator=g) * 0.05

    def bn(name: str, c: int) -> None:
        state[f"{name}.weight"] = 1 + 0.1 * torch.randn(c, generator=g)
        state[f"{name}.bias"] = 0.1 * torch.randn(c, generator=g)
        state[f"{name}.running_mean"] = 0.1 * torch.randn(c, generator=g)
        state[f"{name}.running_var"] = 1 + torch.rand(c, generator=g)
        state[f"{name}.num_batches_tracked"] = torch.tensor(0)

    conv("conv1", 64, 3, 7)
    bn("bn1", 64)
    in_c = 64
    for layer, out_c in enumerate((64, 128, 256, 512), start=1):
        for block in (0, 1):
            p = f"layer{layer}.{block}"
            conv(f"{p}.conv1", out_c, in_c if block == 0 else out_c, 3)
            bn(f"{p}.bn1", out_c)
            conv(f"{p}.conv2", out_c, out_c, 3)
            bn(f"{p}.bn2", out_c)
            if block == 0 and layer > 1:
                conv(f"{p}.downsample.0", out_c, in_c, 1)
                bn(f"{p}.downsample.1", out_c)
        in_c = out_c
    state["fc.weight"] = torch.randn(1000, 512, generator=g)
    state["fc.bias"] = torch.randn(1000, generator=g)
    return state


def test_registry_lists_names_on_unknown_backbone():
    assert {"efficientnet_lite0", "resnet18"} <= set(BACKBONES)
    with pytest.raises(ValueError, match="efficientnet_lite0.*resnet18"):
        create_backbone("vgg16", weights=None)


def test_register_backbone_refuses_duplicates():
    with pytest.raises(ValueError, match="already registered"):
        register_backbone("resnet18")(lambda **kw: None)


@pytest.mark.parametrize("name", ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2", "resnet18"])
def test_features_match_their_description(name):
    backbone = create_backbone(name, weights=None).eval()
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        features = backbone(x)
    assert len(features) == len(backbone.channels) == len(backbone.strides)
    assert backbone.strides == sorted(backbone.strides) and backbone.strides[-1] == 16
    for f, c, s in zip(features, backbone.channels, backbone.strides):
        assert tuple(f.shape) == (2, c, 64 // s, 96 // s)


@pytest.mark.parametrize("name", ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"])
def test_efficientnet_lite_imagenet_weights_classify_a_cat(name):
    image = resize(data.chelsea(), (224, 224), anti_aliasing=True).astype(np.float32)  # [0, 1] RGB
    x = (torch.from_numpy(image).permute(2, 0, 1) - torch.tensor(IMAGENET_MEAN).view(3, 1, 1)) / torch.tensor(
        IMAGENET_STD
    ).view(3, 1, 1)
    classifier = efficientnet_lite_classifier(name, "imagenet")
    with torch.no_grad():
        top = classifier(x[None]).softmax(dim=1)[0].argmax().item()
    assert top in IMAGENET_CAT_CLASSES
    # The feature extractor gets the same pretrained weights, up to its stride-16 tap.
    features = create_backbone(name)
    last = features.taps[-1]
    assert torch.equal(features._blocks[last]._project_conv.weight, classifier._blocks[last]._project_conv.weight)


@pytest.mark.parametrize("kernel, size, before, after", [
    (3, 16, 0, 1), (5, 16, 1, 2),  # an even input: TensorFlow puts the odd padding pixel after
    (3, 15, 1, 1), (5, 15, 2, 2),  # an odd one needs an even padding: split evenly
])
def test_strided_lite_convolutions_pad_as_tensorflow_trained_them(kernel, size, before, after):
    conv = SamePaddedConv2d(2, 2, kernel, stride=2)
    x = torch.randn(1, 2, size, 16)  # the width even: padded as the even rows above
    even = {3: (0, 1), 5: (1, 2)}[kernel]
    expected = torch.nn.functional.conv2d(torch.nn.functional.pad(x, (*even, before, after)), conv.weight, stride=2)
    torch.testing.assert_close(conv(x), expected)
    conv.same = False  # symmetric: kernel // 2 on every side, as PyTorch pads
    torch.testing.assert_close(conv(x), torch.nn.functional.conv2d(x, conv.weight, stride=2, padding=kernel // 2))


def test_backbone_padding_is_the_weights_own_unless_asked_and_checked():
    lite = create_backbone("efficientnet_lite0", weights=None)
    strided = [m for m in lite.modules() if isinstance(m, SamePaddedConv2d) and m.stride == (2, 2)]
    assert len(strided) == 4 and all(m.same for m in strided) and lite.pads_same  # stem, three stage openings
    symmetric = create_backbone("efficientnet_lite0", weights=None, padding="symmetric")
    assert not any(m.same for m in symmetric.modules() if isinstance(m, SamePaddedConv2d)) and not symmetric.pads_same
    assert not create_backbone("resnet18", weights=None).pads_same  # trained in PyTorch: symmetric either way
    with pytest.raises(ValueError, match="padding must be one of same, symmetric, got 'valid'"):
        create_backbone("efficientnet_lite0", weights=None, padding="valid")


def test_lite_variants_differ_where_the_builder_scales_them():
    lite0, lite2 = create_backbone("efficientnet_lite0", None), create_backbone("efficientnet_lite2", None)
    assert lite0.channels == [32, 16, 24, 40, 112] and lite0.taps == (0, 2, 4, 10)
    assert lite2.channels == [32, 16, 24, 48, 120] and lite2.taps == (0, 3, 6, 14)


def test_resnet18_loads_a_torchvision_checkpoint_by_path(tmp_path):
    state = torchvision_resnet18_state()
    path = tmp_path / RESNET18_FILENAME
    torch.save(state, path)
    backbone = create_backbone("resnet18", weights=str(path))
    loaded = backbone.state_dict()
    assert set(loaded) == set(state) - {"fc.weight", "fc.bias"}
    for key in ("conv1.weight", "layer2.0.downsample.0.weight", "layer4.1.bn2.running_var"):
        assert torch.equal(loaded[key], state[key])
    with torch.no_grad():
        shapes = [tuple(f.shape[1:]) for f in backbone.eval()(torch.randn(1, 3, 64, 64))]
    assert shapes == [(64, 32, 32), (64, 32, 32), (128, 16, 16), (256, 8, 8), (512, 4, 4)]


def test_resnet18_imagenet_comes_from_the_hub_cache_without_download(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path))
    (tmp_path / "checkpoints").mkdir()
    state = torchvision_resnet18_state(seed=1)
    torch.save(state, tmp_path / "checkpoints" / RESNET18_FILENAME)
    backbone = create_backbone("resnet18", weights="imagenet", allow_download=False)
    assert torch.equal(backbone.conv1.weight, state["conv1.weight"])


def test_resnet18_offline_error_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path))  # an empty cache
    with pytest.raises(BackboneWeightsError, match="--backbone-weights PATH.*allow the download"):
        create_backbone("resnet18", weights="imagenet", allow_download=False)


def test_bad_weight_files_name_the_problem(tmp_path):
    missing = tmp_path / "nope.pth"
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        create_backbone("resnet18", weights=missing)
    state = torchvision_resnet18_state()
    state["layer3.0.conv1.weight"] = torch.zeros(1, 1, 3, 3)
    wrong = tmp_path / "wrong.pth"
    torch.save(state, wrong)
    with pytest.raises(BackboneWeightsError, match="layer3.0.conv1.weight"):
        create_backbone("resnet18", weights=wrong)
    # A ResNet checkpoint does not fit EfficientNet-Lite0: the message lists missing keys.
    with pytest.raises(BackboneWeightsError, match="_conv_stem"):
        create_backbone("efficientnet_lite0", weights=wrong)
