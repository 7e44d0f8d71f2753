"""SLSG network pieces (arXiv 2305.00398): backbone registry, blocks, graph block, network, cost."""

from .backbones import BACKBONES, BackboneWeightsError, FeatureExtractor, create_backbone, register_backbone
from .flops import count_flops, count_parameters
from .graph import SelfAttentiveGraph
from .slsg import (
    PRESETS, SLSG, SLSGConfig, SLSGOutput, anomaly_probability, image_score, image_score_log_odds, preset,
    top_k_for_size,
)

__all__ = [
    "BACKBONES", "BackboneWeightsError", "FeatureExtractor", "create_backbone", "register_backbone",
    "count_flops", "count_parameters", "SelfAttentiveGraph",
    "PRESETS", "SLSG", "SLSGConfig", "SLSGOutput", "anomaly_probability", "image_score",
    "image_score_log_odds", "preset", "top_k_for_size",
]
