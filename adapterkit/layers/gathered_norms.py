"""Norms whose statistics are each sample's own, for a mixed batch in one call (layers/gathered.py).

LayerNorm and GroupNorm normalise each sample by its own statistics; only their affine part is the
domain's. So a mixed batch runs the norm once over the whole batch without an affine part, then one
multiply-add with each sample's `weight` and `bias` (stacked in sample order), instead of one call per
domain over its rows. timm's `LayerNorm2d` and `LayerNormAct2d` normalise over channels in a channels-last
view, as they do themselves, so the output keeps the strides the next conv expects; the `...Act` norms
then apply their (parameter-free) activation. Results agree with the module to float rounding (the
module's kernel applies its affine inside the normalisation).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from timm.layers import (
    GroupNorm,
    GroupNorm1,
    GroupNormAct,
    LayerNorm,
    LayerNorm2d,
    LayerNormAct,
    LayerNormAct2d,
)
from torch import nn

# how each type normalises a sample: over its trailing `normalized_shape` ("last"), over channels in a
# channels-last view ("channels"), or over channel groups ("groups")
_KINDS: dict[type, str] = {
    nn.LayerNorm: "last",
    LayerNorm: "last",
    LayerNormAct: "last",
    LayerNorm2d: "channels",
    LayerNormAct2d: "channels",
    nn.GroupNorm: "groups",
    GroupNorm: "groups",
    GroupNorm1: "groups",
    GroupNormAct: "groups",
}
_ACT = (LayerNormAct, LayerNormAct2d, GroupNormAct)


def kind(m: nn.Module) -> str | None:
    """How `m` normalises when a mixed batch can run it in one call, else None: one of the types above
    computing torch's kernel (timm's fast-norm option off) with a parameter-free activation, if any."""
    found = _KINDS.get(type(m))
    if found is None or getattr(m, "_fast_norm", False):
        return None
    if isinstance(m, _ACT) and any(True for _ in m.act.parameters()):
        return None
    return found


def _settings(m: nn.Module) -> tuple:
    return (type(m), m.eps, getattr(m, "normalized_shape", None), getattr(m, "num_groups", None))


def per_sample(
    first: nn.Module,
    x: torch.Tensor,
    affine: Callable[[], tuple[torch.Tensor, torch.Tensor] | None],
) -> torch.Tensor:
    """`first`'s normalisation over the whole batch `x`, then each sample's affine part: `affine()` gives
    `(weight, bias)` stacked in sample order, (N, *weight shape) each, or None when the norms have none."""
    how = kind(first)
    if how == "channels":
        x = x.permute(0, 2, 3, 1)
    if how == "groups":
        y = F.group_norm(x, first.num_groups, None, None, first.eps)
    else:
        y = F.layer_norm(x, first.normalized_shape, None, None, first.eps)
    parts = affine()
    if parts is not None:
        weight, bias = parts
        trailing = len(first.normalized_shape) if how == "last" else 1
        # (N, C) -> (N, 1, ..., C) for trailing channels, (N, C, 1, ...) for NCHW groups
        ones = (1,) * (y.dim() - 1 - trailing)
        shape = (len(weight), *ones, *weight.shape[1:]) if how != "groups" else (*weight.shape, *ones)
        y = torch.addcmul(bias.view(shape).to(y.dtype), y, weight.view(shape).to(y.dtype))
    if how == "channels":
        y = y.permute(0, 3, 1, 2)
    if isinstance(first, _ACT):
        y = first.act(first.drop(y))
    return y


def stacked_affine(
    norms: Sequence[nn.Module], pick: Callable[[Sequence], tuple]
) -> Callable[[], tuple[torch.Tensor, torch.Tensor] | None] | None:
    """For live modules of one norm (one per domain): the `affine` of `per_sample`, or None when they do
    not share one kind and settings (the gathered pass then runs each domain's rows through its module)."""
    first = norms[0]
    if kind(first) is None or any(_settings(n) != _settings(first) for n in norms[1:]):
        return None
    if first.weight is None:
        return lambda: None
    if any(n.weight is None or n.bias is None for n in norms):
        return None
    return lambda: (torch.stack(pick([n.weight for n in norms])), torch.stack(pick([n.bias for n in norms])))
