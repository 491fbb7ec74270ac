"""Fused eval-mode weights: a layer's base weight with one domain's adapter added in.

A parallel adapter is linear in the layer's input, so in eval mode it can be added to the weight
(into the kernel's centre tap for a k x k conv) and the layer runs one conv or matmul instead of
two or three. `merge_conv` / `merge_linear` compute that weight with exactly the arithmetic of
`export_domain`'s folding, and `FusedWeights` caches it per domain.

A cached weight is served only while every tensor it was built from is the same object, at the same
autograd version (`Tensor._version`, bumped by every in-place write: optimiser steps,
`load_state_dict`, `copy_` under `no_grad`) and at the same storage address (`module.to(...)`,
`p.data = ...`). Writes through `p.data.<op>_()` bypass the version counter; every `train()` /
`eval()` call clears the cache, so call `model.eval()` after editing weights that way. Inference
tensors (weights created under `torch.inference_mode()`) have no version counter: their fused weight
is rebuilt on every call (correct, but slower at small batches); create models outside inference mode.

The cache is bounded (least recently used domains are dropped) and safe under concurrent readers:
entries are immutable tuples, replaced whole under a lock, and two threads that miss at once build
bit-identical weights.
"""

from __future__ import annotations

import operator
import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import nn

DEFAULT_CAPACITY = 4  # domains per layer: up to 4 extra copies of the adapted weights while serving
_EPOCH = [0]  # bumped whenever any cache is cleared or its settings change (plain.py rebuilds then)


def epoch() -> int:
    """A number that changes whenever any `FusedWeights` is cleared or reconfigured in this process."""
    return _EPOCH[0]


def _bump() -> None:
    _EPOCH[0] += 1


def _check_capacity(capacity: object) -> int:
    if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 0:
        raise ValueError(f"capacity={capacity!r} must be an int >= 0 (domains whose fused weights are kept)")
    return capacity


def merge_conv(weight: torch.Tensor, adapter: torch.Tensor, tap: tuple[int, int]) -> torch.Tensor:
    """`weight` (out, in / groups, kh, kw) with the 1x1 `adapter` (out, in / groups) added at `tap`.

    Computed in float32 and cast back, giving the same values as `AdaptedConv2d.fold`, so the fused
    layer and the exported model agree. Out-of-place, so gradients reach `adapter` when autograd
    records.

    Example:
        >>> merge_conv(torch.zeros(2, 1, 3, 3), torch.ones(2, 1), (1, 1))[0, 0]
        tensor([[0., 0., 0.],
                [0., 1., 0.],
                [0., 0., 0.]])
    """
    merged = weight.to(torch.float32, copy=True)  # only the tap changes: other entries keep their bits
    merged[:, :, tap[0], tap[1]] += adapter.float()
    return merged.to(weight.dtype)


def merge_linear(weight: torch.Tensor, adapter: torch.Tensor) -> torch.Tensor:
    """`weight + adapter` in the weight's dtype, like `AdaptedLinear.fold`."""
    return weight + adapter.to(weight.dtype)


_VERSION = operator.attrgetter("_version")
_DATA_PTR = torch.Tensor.data_ptr


def _key(sources: tuple[torch.Tensor, ...]) -> tuple[tuple[int, ...], ...]:
    """Identity, autograd version and storage address of each source (C-level maps: this runs per call).

    Ids are safe to compare because a cache entry holds its sources, so they cannot be reused."""
    return tuple(map(id, sources)), tuple(map(_VERSION, sources)), tuple(map(_DATA_PTR, sources))


class _Entry(NamedTuple):
    sources: tuple[torch.Tensor, ...]  # held so that their ids stay unique while the entry lives
    key: tuple[tuple[int, ...], ...]
    weight: torch.Tensor


class FusedWeights:
    """Per-domain fused weights of one layer, least recently used first out.

    Args:
        capacity: domains kept per layer (each costs one copy of the layer's weight); 0 rebuilds the
            weight on every call (same bits, slower at small batches).
        enabled: fuse at all; False runs the adapter as a separate op in eval mode too. Both forms
            agree within float32 rounding but not bit for bit, so keep one setting while serving.
    """

    def __init__(self, capacity: int = DEFAULT_CAPACITY, enabled: bool = True) -> None:
        self._capacity = _check_capacity(capacity)
        self._enabled = bool(enabled)
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._lock = threading.Lock()  # for writers; single dict operations are atomic for readers

    @property
    def capacity(self) -> int:
        return self._capacity

    @capacity.setter
    def capacity(self, value: int) -> None:
        self._capacity = _check_capacity(value)
        _bump()

    @property
    def enabled(self) -> bool:
        return self._enabled

    @enabled.setter
    def enabled(self, value: bool) -> None:
        self._enabled = bool(value)
        _bump()

    def __deepcopy__(self, memo: dict) -> FusedWeights:
        return FusedWeights(self.capacity, self.enabled)  # a copy rebuilds from its own tensors

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            _bump()

    def evict(self, domain: str) -> None:
        """Drop one domain's fused weight (its domain was removed, or plain.py no longer holds it)."""
        with self._lock:
            self._entries.pop(domain, None)

    def weight(
        self,
        domain: str,
        sources: tuple[torch.Tensor, ...],
        build: Callable[[], torch.Tensor],
    ) -> torch.Tensor:
        """The fused weight of `domain`, built from `sources` by `build()`.

        When autograd records and a source requires grad, the weight is built afresh (so gradients
        reach the adapter) and not cached; otherwise it comes from, or goes into, the cache. Both
        ways run the same ops, so they give the same bits.
        """
        if torch.compiler.is_compiling() or (
            torch.is_grad_enabled() and any(t.requires_grad for t in sources)
        ):
            # Under torch.compile the build is traced into the graph (the cache's ids, versions and lock
            # are not traceable, and a compiled graph must not bake one version of a weight in).
            return build()
        try:
            key = _key(sources)
        except RuntimeError:  # an inference tensor: no version counter, so a cached weight could go stale
            with torch.no_grad(), _full_precision(sources[0]):
                return build()
        entry = self._entries.get(domain)
        if entry is not None and entry.key == key:
            try:
                self._entries.move_to_end(domain)
            except KeyError:  # evicted by another thread meanwhile; the weight is still valid
                pass
            return entry.weight
        # Built outside inference mode so a cached weight can also serve later no_grad calls, and outside
        # autocast so it holds the same bits whichever call built it (a low-rank product under bf16
        # autocast is rounded to bf16: a later float32 call would reuse that).
        with torch.inference_mode(False), torch.no_grad(), _full_precision(sources[0]):
            weight = build()
        if self.capacity:
            with self._lock:
                self._entries[domain] = _Entry(sources, key, weight)
                self._entries.move_to_end(domain)
                while len(self._entries) > self.capacity:
                    self._entries.popitem(last=False)
        return weight


def _full_precision(like: torch.Tensor) -> torch.autocast:
    """Autocast off on `like`'s device: a fused weight is built in its sources' own dtype."""
    return torch.autocast(like.device.type, enabled=False)


def configure_fusion(module: nn.Module, *, enabled: bool | None = None, capacity: int | None = None) -> None:
    """Set eval-mode fusion for every adapted layer of `module` (an `AdapterModel` or a backbone).

    Args:
        enabled: fuse adapters into the layer weights in eval mode (default on). Fused and unfused
            outputs agree to float32 rounding, not bit for bit: keep one setting while serving.
        capacity: domains whose fused weights each layer keeps (default 4, least recently used
            dropped); each costs one copy of the adapted weights. 0 rebuilds them on every call.

    Example:
        >>> configure_fusion(model, capacity=8)  # serve up to 8 domains without rebuilding weights
    """
    if capacity is not None:
        _check_capacity(capacity)  # before any layer changes
    for layer in module.modules():
        fused = getattr(layer, "fused", None)
        if isinstance(fused, FusedWeights):
            if capacity is not None:
                fused.capacity = capacity
            if enabled is not None:
                fused.enabled = enabled
            fused.clear()
