"""Adapter layers: per-domain adapter tensors and the wrappers that attach them to a layer."""

from .adapters import FullAdapter, LowRankAdapter
from .wrappers import AdaptedConv2d, AdaptedLinear, DomainLayer, DomainNorm, DomainRouter, not_foldable_reason

__all__ = [
    "AdaptedConv2d",
    "AdaptedLinear",
    "DomainLayer",
    "DomainNorm",
    "DomainRouter",
    "FullAdapter",
    "LowRankAdapter",
    "not_foldable_reason",
]
