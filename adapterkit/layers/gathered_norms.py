"""Each sample of a mixed batch through its domain's norm, in one call where the norm allows (gathered.py).

An eval-mode BatchNorm runs as one BatchNorm over (1, N C, ...) whose channel statistics and affine
parameters are each sample's. LayerNorm and GroupNorm normalise each sample by its own statistics; only
their affine part is the domain's. So a mixed batch runs the norm once over the whole batch without an affine part, then one
multiply-add with each sample's `weight` and `bias` (stacked in sample order), instead of one call per
domain over its rows. timm's `LayerNorm2d` and `LayerNormAct2d` normalise over channels in a channels-last
view, as they do themselves, so the output keeps the strides the next conv expects; the `...Act` norms
then apply their (parameter-free) activation. Results agree with the module to float rounding (the
module's kernel applies its affine inside the normalisation). Other norms run each domain's rows through
that domain's module.
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Callable
from itertools import chain
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from timm.layers import (
    BatchNormAct2d,
    GroupNorm,
    GroupNorm1,
    GroupNormAct,
    LayerNorm,
    LayerNorm2d,
    LayerNormAct,
    LayerNormAct2d,
)
from torch import nn

from .gathered import Mixed, _Domains, _domains

if TYPE_CHECKING:
    from .norm import DomainNorm

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
    first: nn.Module, how: str, x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None
) -> torch.Tensor:
    """`first`'s normalisation (its `kind`, `how`) over the whole batch `x`, then each sample's affine part:
    `weight` and `bias` stacked in sample order, (N, *weight shape) each, or None when the norms have none."""
    if how == "channels":
        x = x.permute(0, 2, 3, 1)
    if how == "groups":
        y = F.group_norm(x, first.num_groups, None, None, first.eps)
    else:
        y = F.layer_norm(x, first.normalized_shape, None, None, first.eps)
    if weight is not None:
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


def _affine(found: _Domains, mixed: Mixed) -> tuple[torch.Tensor | None, torch.Tensor | None] | None:
    """Each sample's `(weight, bias)` of a per-sample-statistics norm, stacked in sample order (`(None, None)`
    for norms without an affine part), or None when the domains' copies differ in settings or affine
    parts (the gathered pass then runs each domain's rows through its own copy)."""
    if found.layout is not None:  # packed: one layout, so one type and one set of settings
        names = {name for name, _, _ in found.layout.floats}
        if not names:
            return None, None
        if names != {"weight", "bias"}:
            return None
        parts = found.layout.slices(torch.stack(mixed.pick(found.flats)))
        return parts["weight"], parts["bias"]
    norms = found.modules()
    first = norms[0]
    if any(_settings(n) != _settings(first) for n in norms[1:]):
        return None
    if first.weight is None:
        return None, None
    if any(n.weight is None or n.bias is None for n in norms):
        return None
    return torch.stack(mixed.pick([n.weight for n in norms])), torch.stack(
        mixed.pick([n.bias for n in norms])
    )


_PARAMETERS, _BUFFERS = operator.attrgetter("_parameters"), operator.attrgetter("_buffers")
_TRAINING, _EPS = operator.attrgetter("training"), operator.attrgetter("eps")
_STATS = (  # a BatchNorm's tensors, in F.batch_norm's order: where each is kept
    (_BUFFERS, operator.itemgetter("running_mean")),
    (_BUFFERS, operator.itemgetter("running_var")),
    (_PARAMETERS, operator.itemgetter("weight")),
    (_PARAMETERS, operator.itemgetter("bias")),
)


def _batchnorm(found: _Domains, x: torch.Tensor, mixed: Mixed) -> torch.Tensor | None:
    """Each sample through its domain's eval-mode BatchNorm, as one BatchNorm over (1, N C, ...) whose
    channel statistics and affine parameters are each sample's; None for other norms."""
    first = found.first
    if found.layout is not None:  # packed: one layout, so one type and one eps
        if not _is_batchnorm(first):
            return None
        names, order = _bn_order(found.layout.floats)
        # one copy: each sample's (names, C) rows as (names, N C), then each name's row in F.batch_norm's order
        rows = torch.stack(mixed.pick(found.flats)).view(x.shape[0], len(names), -1).transpose(0, 1)
        stats = order(rows.reshape(len(names), -1).unbind())
    else:
        # every domain's copy is a deep copy of the backbone's norm: one type, one eps unless edited
        norms = found.modules()
        if not _is_batchnorm(first) or any(map(_TRAINING, norms)) or len(set(map(_EPS, norms))) != 1:
            return None
        # (copies of one norm: if the first has running statistics and an affine part, so do all)
        columns = [list(map(get, map(where, norms))) for where, get in _STATS[: 4 if first.affine else 2]]
        # one copy, each sample's: (names * N, C), viewed as each name's (N * C)
        stats = torch.stack(list(chain.from_iterable(map(mixed.pick, columns)))).view(len(columns), -1)
    weight, bias = (stats[2], stats[3]) if len(stats) == 4 else (None, None)
    flat = x.reshape(1, x.shape[0] * x.shape[1], *x.shape[2:])
    cudnn = torch.backends.cudnn.enabled  # (F.batch_norm's own call, without its Python checks)
    y = torch.batch_norm(flat, weight, bias, stats[0], stats[1], False, 0.0, first.eps, cudnn).view_as(x)
    if type(first) is BatchNormAct2d:  # then drop (identity in eval) and the activation
        y = first.act(first.drop(y))
    return y


@functools.lru_cache(maxsize=64)
def _bn_order(floats: tuple[tuple[str, torch.Size, int], ...]) -> tuple[tuple[str, ...], Callable]:
    """A packed BatchNorm layout's tensor names (state order, each (C,), back to back) and a function
    picking F.batch_norm's (mean, var[, weight, bias]) from them."""
    names = tuple(k for k, _, _ in floats)
    wanted = [names.index(k) for k in ("running_mean", "running_var", "weight", "bias") if k in names]
    return names, operator.itemgetter(*wanted)


def _is_batchnorm(m: nn.Module) -> bool:
    """An eval-mode BatchNorm with running statistics: torch's, or timm's BatchNormAct2d with a
    parameter-free activation (the same function for every domain)."""
    if not isinstance(m, nn.modules.batchnorm._BatchNorm) or m.training or m.running_var is None:
        return False
    if type(m).forward is nn.modules.batchnorm._BatchNorm.forward:
        return True
    return type(m) is BatchNormAct2d and not any(True for _ in m.act.parameters())


def norm_forward(layer: DomainNorm, x: torch.Tensor, mixed: Mixed) -> torch.Tensor:
    """Each sample through its domain's norm: one BatchNorm call with each sample's statistics for
    BatchNorm (timm's activation after it), one call and each sample's affine part for LayerNorm and
    GroupNorm (`per_sample`), each domain's rows through its own copy for other norms."""
    found = _domains(layer, x, mixed)
    y = _batchnorm(found, x, mixed)
    if y is not None:
        return y
    how = kind(found.first)
    if how is not None and (affine := _affine(found, mixed)) is not None:
        return per_sample(found.first, how, x, *affine)  # LayerNorm, GroupNorm: one call
    for norm, rows in zip(found.modules(), mixed.rows, strict=True):
        part = norm(x.index_select(0, rows))
        if y is None:
            y = part.new_empty((x.shape[0], *part.shape[1:]))
        y.index_copy_(0, rows, part)
    return y
