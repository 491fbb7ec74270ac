"""Plain module trees for one-domain eval passes: the backbone with each wrapper swapped for what it computes.

In eval mode a one-domain call of a wrapper runs one op: its base conv or linear with the domain's fused
weight, or the domain's copy of a norm. The wrapper's own Python (reading the router, looking the adapter and
the fused weight up, checking the weight's sources) costs more than that op on a small model (the CIFAR
ResNet-56 runs 112 wrappers of a few microseconds of arithmetic each at batch 1). `PlainPasses` keeps, per
domain, a tree of the backbone's modules in which every fusable wrapper is a shallow copy of its base layer
carrying the fused cache's own weight tensor, and every norm wrapper is the domain's norm module itself: the
same ops on the same tensors, so the same bits, with no adapterkit code per layer. Modules with no wrapper
below them are shared with the backbone (not copied), those above a wrapper are shallow copies sharing their
parameters, buffers and hooks; wrappers that cannot fuse (series adapters, convs that do not fold) stay in
the tree and read the domain from the router as usual.

A tree is used only while everything it was built from is unchanged: checked on every call, it is rebuilt
when any of its weights' sources is another tensor, at another autograd version or storage address (the
fused cache's own rule), when the domain's adapter or norm module was replaced, and whenever any fused cache
is cleared or reconfigured (`train()`/`eval()`, a new basis, `configure_fusion`). Trees hold the fused
caches' tensors and are kept for as many domains as those caches (least recently used dropped, with their
fused weights), so serving from them holds no more weights than the fused caches alone.
"""

from __future__ import annotations

import copy
import operator
import threading
from collections import OrderedDict
from functools import partial
from itertools import chain
from typing import NamedTuple

import torch
from torch import nn

from .fused import epoch
from .norm import DomainNorm
from .table import DomainTable
from .wrappers import AdaptedConv2d, AdaptedLinear, DomainLayer

_VERSION = operator.attrgetter("_version")
_DATA_PTR = torch.Tensor.data_ptr
_REQUIRES_GRAD = operator.attrgetter("requires_grad")
_BETA = operator.itemgetter("beta")
_PARAMETERS = operator.attrgetter("_parameters")
_NOT_NONE = partial(operator.is_not, None)
_LIVE = operator.attrgetter("_modules")  # a table's live modules
_PACKED = operator.attrgetter("_packed")  # a table's packed records
_FLAT = operator.attrgetter("flat")


class _Plan(NamedTuple):
    """The backbone's wrappers, split by what a plain tree puts in their place, for one fused-cache epoch,
    and the dicts their tensors are read from on every call (C-level maps over them, no Python per layer)."""

    epoch: int
    fused: tuple[DomainLayer, ...]  # replaced by their base layer with the fused weight
    norms: tuple[DomainNorm, ...]  # replaced by the domain's norm module
    capacity: int  # domains whose trees are kept (the fused caches' smallest capacity)
    fused_tables: tuple[DomainTable, ...]  # each fused layer's domain -> adapter
    norm_tables: tuple[DomainTable, ...]  # each norm wrapper's domain -> norm
    base_params: tuple[dict, ...]  # each fused layer's base layer parameters
    buffers: tuple[dict, ...]  # each fused layer's buffers (its basis)
    hooks: tuple[dict, ...]  # each replaced wrapper's hook dicts: a hook added later makes a new plan


class _Tree(NamedTuple):
    epoch: int
    sources: tuple[object, ...]  # held so their ids stay unique while the tree lives
    key: tuple[tuple[int, ...], ...]
    norms: tuple[int, ...]  # ids of the norms' packed buffers, or of the norm modules it calls
    module: nn.Module


_HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
_GLOBAL_HOOKS = tuple(
    getattr(torch.nn.modules.module, f"_global{name}")
    for name in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
)


def _hooked(m: nn.Module) -> bool:
    """Hooks on a wrapper run only when the wrapper is called: such wrappers stay in the tree."""
    return any(getattr(m, name) for name in _HOOKS)


def _plan(backbone: nn.Module) -> _Plan | None:
    """Which wrappers a plain tree replaces, or None when it cannot serve (a wrapper in training mode or
    with fusion off, or a fused-cache capacity of 0)."""
    now = epoch()
    layers = [m for m in backbone.modules() if isinstance(m, DomainLayer)]
    if any(m.training for m in layers):
        return None
    fused, norms = [], []
    for m in layers:
        if isinstance(m, (AdaptedConv2d, AdaptedLinear)) and m.fusable and not _hooked(m):
            if not m.fused.enabled or not m.fused.capacity:
                return None
            if m.base_layer._parameters.get("weight") is not None:
                fused.append(m)
        elif type(m) is DomainNorm and not _hooked(m):
            norms.append(m)
    capacity = min((m.fused.capacity for m in fused), default=4)
    table = lambda m: m._modules["adapters"]  # noqa: E731
    return _Plan(
        now,
        tuple(fused),
        tuple(norms),
        capacity,
        tuple(map(table, fused)),
        tuple(map(table, norms)),
        tuple(m._modules["base_layer"]._parameters for m in fused),
        tuple(m._buffers for m in fused),
        tuple(getattr(m, name) for m in (*fused, *norms) for name in _HOOKS),
    )


def _modules(tables: tuple[DomainTable, ...], domain: str) -> list[nn.Module] | None:
    """`domain`'s module in each table, or None if one lacks it (C-level lookups when all are live)."""
    try:
        return list(map(operator.itemgetter(domain), map(_LIVE, tables)))
    except KeyError:
        modules = [table.get(domain) for table in tables]
        return None if None in modules else modules


def _sources(plan: _Plan, domain: str) -> tuple[list[torch.Tensor], list[object]] | None:
    """What `domain`'s tree is built from: per fused layer its base layer's parameters, basis and adapter
    tensors (a frozen domain's packed buffer: its modules may be rebuilt, its buffer is what changes), and
    per norm what identifies the domain's copy (its packed buffer, or its module). None if a layer lacks the
    domain."""
    pick = operator.itemgetter(domain)
    base = chain(chain.from_iterable(map(dict.values, plan.base_params)), map(_BETA, plan.buffers))
    try:  # frozen: every layer's record, by C-level lookups
        records = list(map(pick, map(_PACKED, plan.fused_tables)))
        norms = list(map(_FLAT, map(pick, map(_PACKED, plan.norm_tables))))
        return list(filter(_NOT_NONE, chain(base, map(_FLAT, records)))), norms
    except KeyError:
        pass
    adapters, norms = _modules(plan.fused_tables, domain), _modules(plan.norm_tables, domain)
    if adapters is None or norms is None:
        return None
    tensors = chain(base, chain.from_iterable(map(dict.values, map(_PARAMETERS, adapters))))
    return list(filter(_NOT_NONE, tensors)), norms


def _key(tensors: list[torch.Tensor]) -> tuple[tuple[int, ...], ...]:
    return tuple(map(id, tensors)), tuple(map(_VERSION, tensors)), tuple(map(_DATA_PTR, tensors))


def _swap(module: nn.Module, swaps: dict[int, nn.Module]) -> nn.Module:
    """`module` with the submodules in `swaps` replaced: shallow copies on the way down to them (sharing
    parameters, buffers and hooks), the module itself where nothing below it changes."""
    if id(module) in swaps:
        return swaps[id(module)]
    children = {n: c if c is None else _swap(c, swaps) for n, c in module._modules.items()}
    if all(children[n] is c for n, c in module._modules.items()):
        return module
    clone = copy.copy(module)
    clone.__dict__["_modules"] = children
    return clone


def _build(backbone: nn.Module, plan: _Plan, domain: str) -> nn.Module:
    """`domain`'s plain tree; its fused weights come from (and go into) the layers' fused caches."""
    swaps: dict[int, nn.Module] = {}
    with torch.no_grad():
        for layer in plan.fused:
            base = layer._modules["base_layer"]
            plain = copy.copy(base)
            weight = layer._merged(domain, layer._modules["adapters"][domain])
            plain.__dict__["_parameters"] = {**base._parameters, "weight": weight}
            swaps[id(layer)] = plain
    for layer in plan.norms:
        swaps[id(layer)] = layer._modules["adapters"][domain]
    return _swap(backbone, swaps)


class PlainPasses:
    """Per-domain plain trees of one backbone, least recently used first out (see the module docstring)."""

    def __init__(self) -> None:
        self._trees: OrderedDict[str, _Tree] = OrderedDict()
        self._plan: _Plan | None = None
        self._refused = -1  # the epoch in which no plan could be made
        self._lock = threading.Lock()

    def __deepcopy__(self, memo: dict) -> PlainPasses:
        return PlainPasses()  # a copied model builds trees of its own modules

    def __len__(self) -> int:
        return len(self._trees)

    def clear(self) -> None:
        with self._lock:
            self._trees.clear()
            self._plan = None

    def evict(self, domain: str) -> None:
        with self._lock:
            self._trees.pop(domain, None)

    def module(self, backbone: nn.Module, domain: str) -> nn.Module | None:
        """The plain tree that computes `backbone` for `domain` bit for bit, or None where the wrappers
        must run (training, torch.compile, gradients to the domain's adapters, inference-mode weights)."""
        now = epoch()
        if self._refused == now or torch.compiler.is_compiling():
            return None
        if any(_GLOBAL_HOOKS):  # hooks for every module call: the wrappers must run
            return None
        plan = self._plan
        if plan is None or plan.epoch != now or any(plan.hooks):
            plan = self._new_plan(backbone, now)
            if plan is None:
                return None
        found = _sources(plan, domain)
        if found is None:
            return None
        tensors, norms = found
        if torch.is_grad_enabled() and any(map(_REQUIRES_GRAD, tensors)):
            return None  # the wrappers build the fused weights afresh so gradients reach the adapters
        try:
            key = _key(tensors)
        except RuntimeError:  # inference tensors have no version: the wrappers rebuild their weights
            return None
        tree = self._trees.get(domain)
        if tree is not None and tree.epoch == now and tree.key == key and tree.norms == tuple(map(id, norms)):
            try:
                self._trees.move_to_end(domain)
            except KeyError:  # dropped by another thread meanwhile; the tree is still valid
                pass
            return tree.module
        return self._insert(backbone, plan, domain, now, tensors, key, norms)

    def _new_plan(self, backbone: nn.Module, now: int) -> _Plan | None:
        plan = _plan(backbone)
        with self._lock:
            self._trees.clear()  # built in an older epoch: never served again
            self._plan = plan
            if plan is None:
                self._refused = now
        return plan

    def _insert(self, backbone, plan, domain, now, tensors, key, norms) -> nn.Module:
        with self._lock:
            self._trees.pop(domain, None)
            while len(self._trees) >= plan.capacity:
                dropped, _ = self._trees.popitem(last=False)
                for layer in plan.fused:  # its fused weights go too: the caches hold what the trees hold
                    layer.fused.evict(dropped)
        module = _build(backbone, plan, domain)
        with self._lock:
            self._trees[domain] = _Tree(now, (*tensors, *norms), key, tuple(map(id, norms)), module)
        return module
