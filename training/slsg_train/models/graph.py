"""The self-attentive graph block of SLSG (arXiv 2305.00398) on the deepest feature map.

Every position of the [B, C, h, w] map is a graph node. Two kinds of relations:

- *dense*: softmax attention over all node pairs (query = key = 1x1 conv + BN, as the authors
  share one projection) mixes a 3x3-conv value into a context that is added to every node;
- *sparse*: each node links to k neighbours chosen by cosine similarity of the same query/key
  embedding plus a 2-D sin-cos relative-position bias, taking every ``dilation``-th of the
  ``k * dilation`` best candidates (ViG's dilated k-NN). A max-relative graph convolution
  (concatenate the node with max over neighbours of neighbour - node, grouped 1x1 conv, BN,
  GELU) aggregates them, wrapped in 1x1 conv + BN before/after and a residual (ViG's Grapher).

Everything is tensor ops (topk + gather, no loops over nodes), so the block exports to ONNX.
"""

from __future__ import annotations

from functools import lru_cache
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn


def sincos_position_embedding(height: int, width: int, dim: int) -> np.ndarray:
    """MAE-style 2-D sin-cos embedding of an ``height x width`` grid: [height*width, dim], dim % 4 == 0.

    Half of the channels encode the row, half the column, each as sin/cos at dim/4 frequencies.
    """
    if dim % 4 or dim <= 0:
        raise ValueError(f"the sin-cos position embedding needs a positive multiple of 4 channels, got {dim}")
    omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4))
    rows, cols = np.meshgrid(np.arange(height, dtype=np.float64), np.arange(width, dtype=np.float64), indexing="ij")

    def embed(pos: np.ndarray) -> np.ndarray:
        angles = np.outer(pos.reshape(-1), omega)
        return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)

    return np.concatenate([embed(rows), embed(cols)], axis=1)


@lru_cache(maxsize=16)
def relative_position_similarity(height: int, width: int, dim: int) -> np.ndarray:
    """[N, N] with N = height*width: 2 P P^T / dim of the sin-cos embedding P; 1 on the diagonal,
    highest for nearby nodes (ViG's relative position term).

    Cached as numpy, not as a tensor: a tensor made while torch.export traces would be a fake one.
    """
    dim = max(4, dim - dim % 4)
    pos = sincos_position_embedding(height, width, dim)
    similarity = (2.0 * pos @ pos.T / dim).astype(np.float32)
    similarity.setflags(write=False)
    return similarity


def effective_k_and_dilation(num_nodes: int, k: int, dilation: int) -> tuple[int, int]:
    """(k, dilation) that fit a graph of ``num_nodes``: k * dilation candidates must exist."""
    k_eff = max(1, min(k, num_nodes))
    return k_eff, max(1, min(dilation, num_nodes // k_eff))


class NearTie(NamedTuple):
    """Node ``node`` ranks candidate ``higher`` above ``lower`` by only ``gap``."""

    node: int
    higher: int
    lower: int
    gap: float


def gather_nodes(nodes: Tensor, index: Tensor) -> Tensor:
    """nodes [B, N, C], index [B, N, K] (values in [0, N)) -> [B, N, K, C] (ONNX GatherElements)."""
    b, n, c = nodes.shape
    k = index.shape[-1]
    flat = index.reshape(b, n * k, 1).expand(b, n * k, c)
    return torch.gather(nodes, 1, flat).reshape(b, n, k, c)


def _conv_bn(in_channels: int, out_channels: int, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, groups=groups), nn.BatchNorm2d(out_channels))


class SelfAttentiveGraph(nn.Module):
    """Grapher block with dense attention context and dilated k-NN max-relative graph conv.

    Args:
        channels: C of the input map.
        k: neighbours per node (9 in the paper).
        dilation: take every ``dilation``-th of the ``k * dilation`` best candidates (3 in the paper).
        key_channels: width of the query/key embedding (default C // 2: the authors' 512 -> 256).
        groups: groups of the graph convolution's 1x1 conv (4 in ViG's BasicConv).
        position_bias: weight of the relative-position similarity added to the cosine similarity.
            The authors add the *negated* ViG term (-1.0), which favours similar nodes far away
            (non-local relations); +1.0 would favour nearby ones.
        value_on_tokens: run the value's 3x3 conv on the nodes as one column [B, C, N, 1] (the
            authors' code: the kernel's middle column slides along the row-major node order) instead
            of on the [B, C, h, w] grid.
        position_table: keep the position term as a tensor of the state dict (``position_table``,
            [1, N, N] for a ``table_grid`` x ``table_grid`` graph, initialised to ``position_bias``
            times the constructed similarity), as the authors' frozen ``relative_pos`` parameter, so
            weights that carry another table are run with it. Other grids use the constructed term.

    Shape: [B, C, h, w] -> [B, C, h, w].
    """

    def __init__(
        self,
        channels: int,
        k: int = 9,
        dilation: int = 3,
        key_channels: int | None = None,
        groups: int = 4,
        position_bias: float = -1.0,
        value_on_tokens: bool = False,
        position_table: bool = False,
        table_grid: int = 16,
    ) -> None:
        super().__init__()
        if k < 1 or dilation < 1:
            raise ValueError(f"graph k and dilation must be >= 1, got k={k}, dilation={dilation}")
        if (2 * channels) % groups:
            raise ValueError(f"graph conv groups={groups} must divide 2 * channels = {2 * channels}")
        self.channels, self.k, self.dilation, self.position_bias = channels, k, dilation, position_bias
        self.fc_in = _conv_bn(channels, channels)
        self.query_key = _conv_bn(channels, key_channels or max(1, channels // 2))
        self.value = nn.Conv2d(channels, channels, 3, padding=1)
        self.context_out = nn.Conv2d(channels, channels, 1)
        self.graph_conv = nn.Sequential(_conv_bn(2 * channels, 2 * channels, groups), nn.GELU())
        self.fc_out = _conv_bn(2 * channels, channels)
        self.similarity_offset: Tensor | None = None  # [B, N, N], set only by export verification
        self.value_on_tokens = value_on_tokens
        table = None
        if position_table:
            table = torch.from_numpy(position_bias * relative_position_similarity(table_grid, table_grid, channels))[None]
        self.register_buffer("position_table", table)

    def _similarity(self, query_key: Tensor, height: int, width: int) -> Tensor:
        """[B, N, N]: cosine similarity of the query/key embedding plus the relative-position bias."""
        unit = F.normalize(query_key, dim=1)
        similarity = unit.transpose(1, 2) @ unit
        table = self.position_table
        if table is not None and table.shape[-1] == height * width:
            similarity = similarity + table.to(similarity.dtype)
        elif self.position_bias:
            rel = torch.tensor(relative_position_similarity(height, width, self.channels), device=similarity.device)
            similarity = similarity + self.position_bias * rel.to(similarity.dtype)
        if self.similarity_offset is not None:  # export verification only: resolve a near-tie the other way
            similarity = similarity + self.similarity_offset
        return similarity

    def neighbours(self, query_key: Tensor, height: int, width: int) -> Tensor:
        """query_key [B, Ck, N] -> neighbour indices [B, N, k] (best first, every dilation-th)."""
        similarity = self._similarity(query_key, height, width)
        k, dilation = effective_k_and_dilation(height * width, self.k, self.dilation)
        candidates = similarity.topk(k * dilation, dim=-1).indices  # [B, N, k*d]
        return candidates[..., ::dilation]

    @torch.no_grad()
    def near_ties(self, x: Tensor, margin: float) -> list[NearTie]:
        """The rank pairs of block input ``x`` (one image) whose similarities differ by less than
        ``margin`` and whose swap would change the chosen neighbours, closest first. Two float32
        kernel libraries may rank such a pair either way."""
        if x.shape[0] != 1:
            raise ValueError(f"near_ties takes one image, got a batch of {x.shape[0]}")
        _, _, h, w = x.shape
        similarity = self._similarity(self.query_key(self.fc_in(x)).flatten(2), h, w)[0]
        k, dilation = effective_k_and_dilation(h * w, self.k, self.dilation)
        values, indices = similarity.topk(min(k * dilation + 1, h * w), dim=-1)
        gaps = values[:, :-1] - values[:, 1:]  # [N, ranks - 1]: rank r vs r + 1
        chosen = torch.zeros(values.shape[1], dtype=torch.bool)
        chosen[: k * dilation : dilation] = True
        matters = chosen[:-1] ^ chosen[1:]  # a swap changes the choice when exactly one side is chosen
        ties = [NearTie(int(n), int(indices[n, r]), int(indices[n, r + 1]), float(gaps[n, r]))
                for n, r in (gaps < margin).logical_and(matters).nonzero().tolist()]
        return sorted(ties, key=lambda t: t.gap)

    def _value(self, x: Tensor) -> Tensor:
        """The value map [B, C, h, w]; on the token column the 3x3 kernel mixes each node with the
        one before and after it in row-major order (zero beyond the first and last node)."""
        if not self.value_on_tokens:
            return self.value(x)
        b, c, h, w = x.shape
        return self.value(x.reshape(b, c, h * w, 1)).reshape(b, c, h, w)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        shortcut = x
        x = self.fc_in(x)
        qk = self.query_key(x).flatten(2)  # [B, Ck, N]
        nodes = x.flatten(2).transpose(1, 2)  # [B, N, C]

        # Dense relations: every node receives an attention-weighted context of all nodes.
        attention = torch.softmax(qk.transpose(1, 2) @ qk, dim=-1)  # [B, N, N]
        context = attention @ self._value(x).flatten(2).transpose(1, 2)  # [B, N, C]
        context = self.context_out(context.transpose(1, 2).reshape(b, c, h, w))

        # Sparse relations: max-relative aggregation over the k neighbours.
        index = self.neighbours(qk, h, w)
        relative = (gather_nodes(nodes, index) - nodes.unsqueeze(2)).amax(dim=2)  # [B, N, C]
        relative = relative.transpose(1, 2).reshape(b, c, h, w)

        # Interleave node/relative channels so that each conv group sees both (as ViG's reshape).
        joined = torch.stack([x + context, relative], dim=2).reshape(b, 2 * c, h, w)
        return self.fc_out(self.graph_conv(joined)) + shortcut
