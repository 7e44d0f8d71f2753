"""The SLSG network (Yang et al., "SLSG: Industrial Image Anomaly Detection by Learning Better
Feature Embeddings and One-Class Classification", arXiv 2305.00398) and its image scoring.

A frozen ImageNet encoder gives skip features (shallow to deep); large-kernel spatial attention
refines the skips, the self-attentive graph block reasons over the deepest map, an auxiliary
head classifies the graph output directly and lends its 32-channel map to two decoder stages,
and a U-Net decoder produces 2-class (normal / anomalous) logits. Output logits = decoder
logits + auxiliary logits, as in the authors' code. Nothing here knows about training.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict, dataclass, fields, replace
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from .backbones import PADDING_SAME, PADDING_SYMMETRIC, create_backbone
from .blocks import ConvBNReLU, DecoderStage, SpatialAttention, resize_to
from .component import ComponentCheck
from .composition import CompositionCheck
from .global_branch import GlobalFeatureBranch
from .graph import SelfAttentiveGraph
from .patch_memory import PatchMemoryBranch
from .reference import IMAGE, MAP, Check, ReferenceEncoder, image_score, top_k_pixels

INPUT_MULTIPLE = 32  # input height and width must be multiples of this
REFERENCE_TOP_K, REFERENCE_SIZE = 100, 256  # the paper: mean of the top 100 pixels at 256x256
# The reference checks, in the order they are fitted. Each type's ``name`` is its SLSGConfig switch,
# the model's attribute and its state-dict prefix; adding a check is its module, a line here and
# its SLSGConfig fields.
CHECK_TYPES: tuple[type[Check], ...] = (GlobalFeatureBranch, PatchMemoryBranch, CompositionCheck, ComponentCheck)
CHECKS = tuple(t.name for t in CHECK_TYPES)
CHECK_PREFIXES = ("reference_encoder.", *(f"{name}." for name in CHECKS))  # the state that training leaves alone


@dataclass
class SLSGConfig:
    """Network configuration; the defaults reproduce the paper (ResNet-18, authors' widths).

    Decoder tuples run deep -> shallow, one entry per skip feature of the backbone
    (all features but the deepest, which goes through the graph block).
    """

    backbone: str = "resnet18"
    backbone_weights: str | None = "imagenet"  # "imagenet", None (random) or a state-dict path
    allow_download: bool = False
    freeze_encoder: bool = True
    # large-kernel spatial attention on the skips (not on the stem skip, as the authors)
    attention_kernel: int = 3
    attention_dilation: int = 3
    stem_attention: bool = False
    # self-attentive graph block on the deepest feature map
    graph_k: int = 9
    graph_dilation: int = 3
    graph_key_channels: int | None = None  # None: half the deepest feature's channels
    graph_groups: int = 4
    graph_position_bias: float = -1.0
    # The authors' code, where it departs from a plain reading of the design (docs/model.md):
    # ResNet-18's layer1 reads the raw stem convolution ("conv") rather than its BN+ReLU ("stem");
    # the graph's value conv runs on the node column; the position term is a tensor of the weights;
    # the auxiliary map reaches the decoder by successive x2 upsamplings ("doubling", else "direct").
    layer1_input: str = "conv"
    graph_value_on_tokens: bool = True
    graph_position_table: bool = True
    aux_upsampling: str = "doubling"
    # auxiliary head: conv widths on the graph output; its last map also feeds the decoder
    aux_channels: tuple[int, int] = (256, 32)
    aux_decoder_stages: tuple[int, ...] = (1, 2)
    # U-Net decoder (deep -> shallow): width after each upsampling conv, after the fusion convs,
    # number of fusion convs; then the full-resolution segmentation head widths
    decoder_channels: tuple[int, ...] = (256, 128, 64, 32)
    decoder_block_channels: tuple[int, ...] = (256, 128, 64, 64)
    decoder_block_convs: tuple[int, ...] = (2, 2, 2, 1)
    head_channels: tuple[int, ...] = (32, 16)
    # optional global check (not in the paper): Mahalanobis distance of pooled ImageNet features of
    # the last ``global_levels`` stages; the image score is max(local, weighted global), see global_branch.py
    global_branch: bool = False
    global_levels: int = 2
    global_weight: float = 1.0
    global_shrinkage: float = 0.1
    # optional patch memory (not in the paper): squared distance of each stride-8 patch of the last
    # ``patch_memory_levels`` ImageNet stages to ``patch_memory_size`` normal patches, fused into the
    # map by a pixelwise max, see patch_memory.py. On in the default preset.
    patch_memory: bool = False
    patch_memory_levels: int = 2
    patch_memory_size: int = 2048
    patch_memory_weight: float = 1.0
    # optional composition check (not in the paper): an autoencoder rebuilds the last
    # ``composition_levels`` ImageNet stages at stride 16 from a ``composition_latent``-number code of
    # the whole image, trained ``composition_steps`` steps after SLSG; its squared error is fused into
    # the map like the patch memory's distance, see composition.py. On in the default preset.
    composition_check: bool = False
    composition_levels: int = 2
    composition_latent: int = 16
    composition_steps: int = 8000
    composition_weight: float = 1.0
    # share of each of its training batches that is a simulated logical anomaly of a training image (a
    # part recoloured, another image pasted in), to be rebuilt as the clean image; 0: normal images only
    composition_restoration: float = 0.5
    # optional component check (not in the paper): the parts of each image, segmented by ``component_clusters``
    # k-means clusters of colour and ImageNet features, counted and measured against the normal images'
    # parts; its map marks the parts that break the rule, fused like the patch memory's, see component.py
    component_check: bool = False
    component_clusters: int = 10
    component_weight: float = 1.0
    # whether SLSG's own map joins the fused map's maximum; fitting the checks turns it off where it does not
    # separate simulated anomalies it was not trained on and a map check does (training/fusion.py)
    fuse_slsg_map: bool = True
    # how the checks' frozen ImageNet encoder pads its strided convolutions: "same", as its weights were
    # trained (TensorFlow's SAME for the Lite backbones), or "symmetric", which checkpoints from before this
    # setting were fitted with (checkpoint.py); symmetric padding grew the patch memory's map a band from
    # a defect to the bottom or right border (docs/backbone-padding.md)
    reference_padding: str = PADDING_SAME

    def __post_init__(self) -> None:
        if self.aux_upsampling not in ("doubling", "direct"):
            raise ValueError(f"aux_upsampling must be 'doubling' or 'direct', got {self.aux_upsampling!r}")
        if self.composition_steps < 1:  # checked here, not after a whole training run
            raise ValueError(f"composition_steps must be >= 1, got {self.composition_steps}")
        if not 0.0 <= self.composition_restoration <= 1.0:
            raise ValueError(f"composition_restoration must be in [0, 1], got {self.composition_restoration}")
        if self.reference_padding not in (PADDING_SAME, PADDING_SYMMETRIC):
            raise ValueError(f"reference_padding must be {PADDING_SAME!r} or {PADDING_SYMMETRIC!r}, "
                             f"got {self.reference_padding!r}")

    @property
    def uses_reference(self) -> bool:
        """Whether a reference check needs the frozen ImageNet encoder."""
        return any(getattr(self, name) for name in CHECKS)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SLSGConfig:
        """Inverse of ``to_dict`` (JSON turns tuples into lists); unknown keys are an error."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown SLSGConfig fields: {unknown}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})


# our first reading of the authors' details, which the default preset keeps (checkpoint.py migrates older runs to it)
LEGACY_NETWORK: dict[str, Any] = dict(
    layer1_input="stem", graph_value_on_tokens=False, graph_position_table=False, aux_upsampling="direct")

PRESETS: dict[str, SLSGConfig] = {
    # The authors' network: ResNet-18 (max-pool skipped), graph on layer4 (512 ch, stride 16).
    "paper": SLSGConfig(),
    # EfficientNet-Lite0 (ImageNet weights offline), graph on its 112-ch stride-16 map, decoder
    # widths scaled down to its channels: 10.1 GFLOP per 256x256 image against the paper's 46.1;
    # with the patch memory (and its frozen ImageNet encoder) 11.4, and the composition check 11.5.
    "default": SLSGConfig(
        backbone="efficientnet_lite0",
        aux_channels=(128, 32),
        decoder_channels=(128, 64, 48, 32),
        decoder_block_channels=(128, 64, 48, 48),
        decoder_block_convs=(2, 2, 2, 1),
        head_channels=(32, 16),
        # 0.6 GFLOP at 256x256 (1024 queries x 2048 patches x 152 channels) + 0.6 for its frozen encoder
        patch_memory=True,
        composition_check=True,  # 0.14 GFLOP; a few minutes of autoencoder training after SLSG
        # closed form, left out (and saying why) where the normal images hold no steady part kinds; docs/component_check.md
        component_check=True,
        **LEGACY_NETWORK,  # our own reading of the authors' details, kept (docs/model.md)
    ),
}


def preset(name: str, **overrides: Any) -> SLSGConfig:
    """A copy of ``PRESETS[name]`` with ``overrides`` applied."""
    if name not in PRESETS:
        raise ValueError(f"unknown SLSG preset {name!r}; available: {', '.join(PRESETS)}")
    unknown = sorted(set(overrides) - {f.name for f in fields(SLSGConfig)})
    if unknown:
        raise ValueError(f"unknown model setting(s) {unknown}; known: {sorted(f.name for f in fields(SLSGConfig))}")
    return replace(PRESETS[name], **overrides)


def build_checks(config: SLSGConfig) -> tuple[ReferenceEncoder | None, dict[str, Check]]:
    """The reference encoder (``config.backbone`` with ``config.backbone_weights``) and the checks
    ``config`` turns on, all unfitted; (None, {}) when it turns none on."""
    if not config.uses_reference:
        return None, {}
    encoder = ReferenceEncoder(config.backbone, config.backbone_weights, config.allow_download, config.reference_padding)
    return encoder, {t.name: t.from_config(config, encoder) for t in CHECK_TYPES if getattr(config, t.name)}


class SLSGOutput(NamedTuple):
    logits: Tensor  # [B, 2, H, W]: decoder + auxiliary logits
    aux_logits: Tensor  # [B, 2, H, W]: auxiliary head alone (trained with its own loss term)
    # each fitted check's raw score by name ([B, 1, h, w] or [B]); only in eval mode
    checks: dict[str, Tensor] | None = None


def check_input_size(height: int, width: int) -> None:
    if height % INPUT_MULTIPLE or width % INPUT_MULTIPLE or height <= 0 or width <= 0:
        raise ValueError(f"SLSG input height and width must be positive multiples of {INPUT_MULTIPLE}, got {height}x{width}")


def init_trained_weights(module: nn.Module) -> None:
    """The authors' initialisation of the trained parts: conv N(0, 0.02), BN weight N(1, 0.02)."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.normal_(m.weight, 0.0, 0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias)


class SLSG(nn.Module):
    """SLSG: ImageNet-normalised float [B, 3, H, W] (H, W multiples of 32) -> :class:`SLSGOutput`."""

    def __init__(self, config: SLSGConfig | None = None) -> None:
        super().__init__()
        self.config = config = config or SLSGConfig()
        # symmetric, as it always was: this encoder's features are what the decoder was trained on, and
        # generative pre-training may re-train it; only the frozen reference encoder follows the weights' padding
        self.encoder = create_backbone(config.backbone, config.backbone_weights, config.allow_download,
                                       PADDING_SYMMETRIC)
        self.encoder.set_layer1_input(config.layer1_input if self.encoder.supports_raw_stem else "stem")
        channels, strides = self.encoder.channels, self.encoder.strides
        skips = list(zip(channels[:-1], strides[:-1]))[::-1]  # deep -> shallow
        self._check_decoder_config(len(skips))
        deep, aux = channels[-1], config.aux_channels

        self.skip_attention = nn.ModuleList(
            SpatialAttention(c, config.attention_kernel, config.attention_dilation)
            if i > 0 or config.stem_attention else nn.Identity()
            for i, c in enumerate(channels[:-1])
        )  # shallow -> deep, index 0 is the stem
        self.graph = SelfAttentiveGraph(
            deep, config.graph_k, config.graph_dilation, config.graph_key_channels,
            config.graph_groups, config.graph_position_bias, config.graph_value_on_tokens,
            config.graph_position_table,
        )
        self.aux_features = nn.Sequential(ConvBNReLU(deep, aux[0]), ConvBNReLU(aux[0], aux[1]))
        self.aux_classifier = nn.Sequential(ConvBNReLU(aux[1], aux[1]), nn.Conv2d(aux[1], 2, 3, padding=1))
        self.decoder = self._build_decoder(deep, strides[-1], skips)
        head = [config.decoder_block_channels[-1], *config.head_channels]
        self.segmentation_head = nn.Sequential(
            *[ConvBNReLU(a, b) for a, b in zip(head[:-1], head[1:])], nn.Conv2d(head[-1], 2, 3, padding=1)
        )
        for part in self.head_modules():
            init_trained_weights(part)
        self.set_checks(*build_checks(config))
        self.register_load_state_dict_pre_hook(_upgrade_state_dict)
        if config.freeze_encoder:
            self.encoder.requires_grad_(False)
            self.encoder.eval()

    def _check_decoder_config(self, num_skips: int) -> None:
        c = self.config
        lengths = {
            "decoder_channels": len(c.decoder_channels),
            "decoder_block_channels": len(c.decoder_block_channels),
            "decoder_block_convs": len(c.decoder_block_convs),
        }
        bad = {k: n for k, n in lengths.items() if n != num_skips}
        if bad:
            raise ValueError(
                f"backbone {c.backbone!r} has {num_skips} skip features, so the decoder needs {num_skips} "
                f"stages; config has {bad}"
            )
        if any(not 0 <= s < num_skips for s in c.aux_decoder_stages):
            raise ValueError(f"aux_decoder_stages {c.aux_decoder_stages} must lie in [0, {num_skips})")

    def _build_decoder(self, in_channels: int, in_stride: int, skips: list[tuple[int, int]]) -> nn.ModuleList:
        c, stages = self.config, nn.ModuleList()
        for i, (skip_channels, skip_stride) in enumerate(skips):
            stages.append(DecoderStage(
                in_channels, c.decoder_channels[i], skip_channels, c.decoder_block_channels[i],
                num_convs=c.decoder_block_convs[i],
                extra_channels=c.aux_channels[1] if i in c.aux_decoder_stages else 0,
                upsample=skip_stride != in_stride, extra_by_doubling=c.aux_upsampling == "doubling",
            ))
            in_channels, in_stride = c.decoder_block_channels[i], skip_stride
        return stages

    def head_modules(self) -> list[nn.Module]:
        """The trained (non-encoder) parts."""
        return [self.skip_attention, self.graph, self.aux_features, self.aux_classifier,
                self.decoder, self.segmentation_head]

    def encoder_parameters(self) -> Iterator[nn.Parameter]:
        return self.encoder.parameters()

    def head_parameters(self) -> Iterator[nn.Parameter]:
        for part in self.head_modules():
            yield from part.parameters()

    def train(self, mode: bool = True) -> SLSG:
        super().train(mode)
        if self.config.freeze_encoder:
            self.encoder.eval()  # a frozen encoder keeps its ImageNet BN statistics
        return self

    def forward(self, x: Tensor) -> SLSGOutput:
        height, width = x.shape[-2:]
        if not (torch.jit.is_tracing() or torch.compiler.is_compiling()):
            check_input_size(int(height), int(width))
        features = self.encoder(x)  # shallow -> deep
        deep = self.graph(features[-1])
        aux = self.aux_features(deep)
        aux_logits = resize_to(self.aux_classifier(aux), (height, width))
        skips = [attend(f) for attend, f in zip(self.skip_attention, features[:-1])][::-1]
        y = deep
        for stage, skip in zip(self.decoder, skips):
            y = stage(y, skip, aux)
        logits = self.segmentation_head(resize_to(y, (height, width))) + aux_logits
        return SLSGOutput(logits, aux_logits, self._run_checks(x))

    @property
    def checks(self) -> list[Check]:
        """The model's reference checks (fitted or not), in ``CHECK_TYPES`` order."""
        return [check for check in (getattr(self, name, None) for name in CHECKS) if check is not None]

    def set_checks(self, encoder: ReferenceEncoder | None, checks: dict[str, Check]) -> None:
        """Install the reference encoder and the checks (by name; every other check is removed)."""
        unknown = sorted(set(checks) - set(CHECKS))
        if unknown:
            raise ValueError(f"unknown checks {unknown}; known: {list(CHECKS)}")
        self.reference_encoder = encoder
        for name in CHECKS:
            setattr(self, name, checks.get(name))

    def _run_checks(self, x: Tensor) -> dict[str, Tensor]:
        """The fitted checks' raw scores by name; SLSG's training never needs them: they are fitted afterwards."""
        exporting = torch.jit.is_tracing() or torch.compiler.is_compiling()  # export checks they are fitted
        active = [c for c in self.checks if not self.training and (exporting or bool(c.fitted))]
        if not active:
            return {}
        maps = self.reference_encoder(x)
        return {check.name: check(x, maps) for check in active}

    def _active(self, output: SLSGOutput, kind: str) -> list[tuple[Check, Tensor]]:
        return [(getattr(self, name), raw) for name, raw in (output.checks or {}).items()
                if getattr(self, name).kind == kind]

    def anomaly_log_odds(self, output: SLSGOutput) -> Tensor:
        """[B, 1, H, W]: the log-odds of the anomalous class, or with fitted map checks the pixelwise
        largest of that and their maps on the same scale. Where the fusion leaves SLSG's map out
        (``fuse_slsg_map`` False), the largest of the map checks' alone; SLSG's without any."""
        local = anomaly_log_odds(output.logits)
        size = tuple(local.shape[-2:])
        maps = [check.log_odds(raw, size) for check, raw in self._active(output, MAP)]
        if self.config.fuse_slsg_map or not maps:
            maps.insert(0, local)
        fused = maps[0]
        for other in maps[1:]:
            fused = torch.maximum(fused, other)
        return fused

    def anomaly_map(self, output: SLSGOutput) -> Tensor:
        """[B, 1, H, W]: the anomaly probability, :meth:`anomaly_log_odds` through a sigmoid."""
        return torch.sigmoid(self.anomaly_log_odds(output))

    def score_images(self, output: SLSGOutput, k: int, fused: Tensor | None = None) -> Tensor:
        """Image scores [B]: the paper's mean of the top-K pixels of :meth:`anomaly_map`, or with fitted
        image checks the largest of that and their scores on the same scale. ``fused``: the
        :meth:`anomaly_log_odds` of ``output`` when the caller has it."""
        score = image_score(self.anomaly_map(output) if fused is None else torch.sigmoid(fused), k)
        for check, raw in self._active(output, IMAGE):
            score = torch.maximum(score, torch.sigmoid(check.log_odds(raw, tuple(output.logits.shape[-2:]))))
        return score

    def score_log_odds(self, output: SLSGOutput, k: int, fused: Tensor | None = None) -> Tensor:
        """[B]: the log-odds of :meth:`score_images`, computed without rounding to 1 on the way, so clear
        anomalies keep their order where their scores are all 1.0 in float32. ``fused``: the
        :meth:`anomaly_log_odds` of ``output`` when the caller has it."""
        score = image_score_log_odds(self.anomaly_log_odds(output) if fused is None else fused, k)
        for check, raw in self._active(output, IMAGE):
            score = torch.maximum(score, check.log_odds(raw, tuple(output.logits.shape[-2:])))
        return score


def _upgrade_state_dict(module: nn.Module, state_dict: dict, prefix: str, *args) -> None:
    """Older checkpoints: the shared reference encoder was inside the global branch, and the
    composition check had no normal error."""
    old = prefix + "global_branch.encoder."
    for key in [k for k in state_dict if k.startswith(old)]:
        state_dict[prefix + "reference_encoder.backbone." + key[len(old):]] = state_dict.pop(key)
    # composition checks from before the per-place normal error: none, i.e. zero (the same scores)
    composition = getattr(module, "composition_check", None)
    if composition is not None and prefix + "composition_check.feature_mean" in state_dict:
        state_dict.setdefault(prefix + "composition_check.normal_error", torch.zeros_like(composition.normal_error))


def anomaly_probability(logits: Tensor) -> Tensor:
    """[B, 2, H, W] logits -> [B, 1, H, W] softmax probability of the anomalous class (for two classes,
    the sigmoid of its log-odds)."""
    return torch.sigmoid(anomaly_log_odds(logits))


def anomaly_log_odds(logits: Tensor) -> Tensor:
    """[B, 2, H, W] logits -> [B, 1, H, W] log-odds of the anomalous class (softmax's, for two classes)."""
    return logits[:, 1:2] - logits[:, 0:1]


def top_k_for_size(height: int, width: int) -> int:
    """K of the top-K image score: the paper's 100 at 256x256, scaled with the area, at least 1."""
    if height <= 0 or width <= 0:
        raise ValueError(f"image size must be positive, got {height}x{width}")
    return max(1, round(REFERENCE_TOP_K * height * width / REFERENCE_SIZE**2))


def image_score_log_odds(log_odds_map: Tensor, k: int) -> Tensor:
    """The log-odds of :func:`image_score` of ``sigmoid(log_odds_map)`` -> [B]: log(mean p) - log(mean (1 - p))
    over the top-K pixels, each mean taken in log space. Exact where p rounds to 1 in float32 (a logit
    above about 17), and built from operations ONNX Runtime computes without overflow."""
    top = top_k_pixels(log_odds_map, k)
    return _log_mean_exp(-_softplus(-top)) - _log_mean_exp(-_softplus(top))  # log sigmoid(z), log sigmoid(-z)


def _softplus(x: Tensor) -> Tensor:
    """log(1 + exp(x)), written so that no exp overflows."""
    return x.clamp_min(0) + torch.log1p(torch.exp(-x.abs()))


def _log_mean_exp(x: Tensor) -> Tensor:
    """[B, K] -> [B]: log(mean(exp(x))) along dim 1, shifted by the row's largest value."""
    top = x.amax(dim=1, keepdim=True)
    return (top + torch.log(torch.exp(x - top).mean(dim=1, keepdim=True))).squeeze(1)
