"""Adapter layers: per-domain adapter tensors and the wrappers that attach them to a layer."""

from .adapters import FullAdapter, LowRankAdapter
from .fused import FusedWeights, configure_fusion
from .norm import DomainNorm
from .wrappers import AdaptedConv2d, AdaptedLinear, DomainLayer, DomainRouter, not_foldable_reason

__all__ = [
    "AdaptedConv2d",
    "AdaptedLinear",
    "DomainLayer",
    "DomainNorm",
    "DomainRouter",
    "FullAdapter",
    "FusedWeights",
    "LowRankAdapter",
    "configure_fusion",
    "not_foldable_reason",
]
