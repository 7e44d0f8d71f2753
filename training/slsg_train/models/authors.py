"""The SLSG authors' weight files (github.com/areylng/SLSG, ``model_data/<category>.tch``) as the
``paper`` preset's state dict.

Their file is a plain state dict of 313 tensors with their module names (``encoder_segment.resnet18.*``,
``LKA64/128/256.*``, ``GCN3.*``, ``aux0.*``, ``aux0_out.*``, ``decoder_segment.*``). Every key is either
renamed to ours (:data:`KEY_PREFIXES`), or an alias of another key (their graph's key and query are one
module stored twice; the ``f_query.*`` copy is the one their strict load leaves in effect), or a tensor
their forward pass never reads (:data:`UNUSED_PREFIXES`). Anything else, a missing key or a shape that
differs, is an :class:`AuthorsWeightsError` naming the key.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

# their prefix -> ours (the longest matching prefix wins); a prefix names one module
KEY_PREFIXES: dict[str, str] = {
    "encoder_segment.resnet18.conv1.": "encoder.conv1.",
    "encoder_segment.resnet18.bn1.": "encoder.bn1.",
    **{f"encoder_segment.resnet18.layer{i}.": f"encoder.layer{i}." for i in range(1, 5)},
    # skip attention on layer1..3 (ours index the skips shallow -> deep, 0 being the stem's)
    **{f"LKA{c}.{theirs}.": f"skip_attention.{i}.{ours}." for i, c in enumerate((64, 128, 256), start=1)
       for theirs, ours in (("AT.conv0", "depthwise"), ("AT.conv_spatial", "depthwise_dilated"),
                            ("AT.conv1", "pointwise"), ("p2", "proj"))},
    "GCN3.relative_pos": "graph.position_table",
    "GCN3.fc1.": "graph.fc_in.",
    "GCN3.fc2.": "graph.fc_out.",
    "GCN3.graph_conv.gconv.nn.": "graph.graph_conv.0.",
    "GCN3.graph_conv.gconv.f_value.": "graph.value.",
    "GCN3.graph_conv.gconv.W.": "graph.context_out.",
    "GCN3.graph_conv.dilated_knn_graph.f_query.": "graph.query_key.",
    # auxiliary head: their Sequential indices (conv, BN, ReLU, conv, BN, ReLU) -> our ConvBNReLU pairs
    "aux0.0.": "aux_features.0.0.", "aux0.1.": "aux_features.0.1.",
    "aux0.3.": "aux_features.1.0.", "aux0.4.": "aux_features.1.1.",
    "aux0_out.0.": "aux_classifier.0.0.", "aux0_out.1.": "aux_classifier.0.1.", "aux0_out.3.": "aux_classifier.1.",
    # decoder: up1..3 start with an Upsample (conv at index 1), up4 has none
    **{f"decoder_segment.up{i + 1}.{1 + j}.": f"decoder.{i}.up.{j}." for i in range(3) for j in range(2)},
    "decoder_segment.up4.0.": "decoder.3.up.0.", "decoder_segment.up4.1.": "decoder.3.up.1.",
    **{f"decoder_segment.db{i + 1}.{theirs}.": f"decoder.{i}.fuse.{ours}."
       for i in range(3) for theirs, ours in (("0", "0.0"), ("1", "0.1"), ("3", "1.0"), ("4", "1.1"))},
    "decoder_segment.db4.0.": "decoder.3.fuse.0.0.", "decoder_segment.db4.1.": "decoder.3.fuse.0.1.",
    "decoder_segment.final_out_seg.1.": "segmentation_head.0.0.",
    "decoder_segment.final_out_seg.2.": "segmentation_head.0.1.",
    "decoder_segment.final_out_seg.4.": "segmentation_head.1.0.",
    "decoder_segment.final_out_seg.5.": "segmentation_head.1.1.",
    "decoder_segment.final_out_seg.7.": "segmentation_head.2.",
}
# in their file, never read by their forward pass
UNUSED_PREFIXES = ("encoder_segment.resnet18.fc.", "decoder_segment.res_bn_relu.", "LKA64.p1.", "LKA128.p1.",
                   "LKA256.p1.")
# one module under two names: the first is overwritten by the second when their strict load runs
ALIASES = {"GCN3.graph_conv.dilated_knn_graph.f_key.": "GCN3.graph_conv.dilated_knn_graph.f_query."}
NUM_TENSORS = 313


class AuthorsWeightsError(ValueError):
    """The file is not the authors' state dict, or a key / shape does not fit the paper preset."""


@dataclass
class Conversion:
    """Our state dict and how every one of their keys was accounted for."""

    state: dict[str, Tensor]
    renamed: dict[str, str] = field(default_factory=dict)  # theirs -> ours
    aliases: list[str] = field(default_factory=list)  # their keys shadowed by the one in effect
    unused: list[str] = field(default_factory=list)  # their keys no forward pass reads
    aliases_differ: bool = False  # their two copies differ (a real file holds them equal)

    def summary(self) -> dict[str, int | bool]:
        return {"tensors": len(self.renamed) + len(self.aliases) + len(self.unused), "renamed": len(self.renamed),
                "aliases": len(self.aliases), "unused": len(self.unused), "aliases_differ": self.aliases_differ}


def our_key(theirs: str) -> str | None:
    """Our state-dict key for one of theirs, None for an alias or an unused key."""
    if theirs.startswith(UNUSED_PREFIXES) or theirs.startswith(tuple(ALIASES)):
        return None
    prefix = max((p for p in KEY_PREFIXES if theirs.startswith(p)), key=len, default=None)
    if prefix is None:
        raise AuthorsWeightsError(f"{theirs!r} is not a key of the authors' SLSG network")
    return KEY_PREFIXES[prefix] + theirs[len(prefix):]


def read_authors_state(path: str | Path) -> dict[str, Tensor]:
    """Their ``<category>.tch``: a plain state dict of tensors (a file of another shape is an error)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"authors' weights file not found: {path}")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for files it cannot read
        raise AuthorsWeightsError(f"cannot read {path} as a torch state dict: {exc}") from exc
    if not isinstance(data, Mapping) or not all(isinstance(v, Tensor) for v in data.values()):
        raise AuthorsWeightsError(f"{path} is not a plain state dict of tensors (found {type(data).__name__})")
    return dict(data)


def convert_state(theirs: Mapping[str, Tensor], expected: Mapping[str, Tensor]) -> Conversion:
    """Their state dict -> ours, checked against ``expected`` (the paper preset's own state dict):
    every one of our keys filled once with the shape it has, every one of theirs accounted for."""
    out = Conversion(state={})
    for key, tensor in theirs.items():
        ours = our_key(key)
        if ours is None:
            (out.unused if key.startswith(UNUSED_PREFIXES) else out.aliases).append(key)
            continue
        if ours not in expected:
            raise AuthorsWeightsError(f"{key!r} (ours: {ours!r}) has no place in the paper preset")
        if tuple(tensor.shape) != tuple(expected[ours].shape):
            raise AuthorsWeightsError(f"{key!r} has shape {tuple(tensor.shape)}, the authors' network has "
                                      f"{tuple(expected[ours].shape)} there ({ours!r})")
        out.state[ours] = tensor.to(expected[ours].dtype)
        out.renamed[key] = ours
    missing = [k for k in expected if k not in out.state]
    if missing:
        theirs_for = {v: k for k, v in _all_renames(expected).items()}
        names = [theirs_for.get(k, k) for k in missing]
        raise AuthorsWeightsError(f"the file lacks {len(missing)} of the authors' tensors, e.g. {names[:4]}")
    for alias in out.aliases:
        for short, target in ALIASES.items():
            twin = target + alias[len(short):]
            if twin not in theirs:
                raise AuthorsWeightsError(f"{alias!r} has no twin {twin!r} (the file is not the authors' layout)")
            out.aliases_differ |= not torch.equal(theirs[alias], theirs[twin])
    return out


def _all_renames(expected: Mapping[str, Tensor]) -> dict[str, str]:
    """theirs -> ours for every key of ours a prefix reaches (for naming missing keys in their terms)."""
    renames = {}
    for key in expected:
        for theirs, ours in KEY_PREFIXES.items():
            if key.startswith(ours) and (ours.endswith(".") or key == ours):
                renames[theirs + key[len(ours):]] = key
    return renames


def authors_network(theirs: Mapping[str, Tensor]):
    """The ``paper`` preset holding their weights (eval mode), and how their keys were used."""
    from .slsg import SLSG, preset

    model = SLSG(preset("paper", backbone_weights=None))
    conversion = convert_state(theirs, model.state_dict())
    model.load_state_dict(conversion.state, strict=True)
    return model.eval(), conversion
