"""`DomainTable`: one adapted layer's per-domain modules (adapters, or copies of a norm), keyed by domain.

A trainable domain is a live module, a submodule as in an `nn.ModuleDict` (training, `.to()`, hooks as
usual). A frozen domain, every loaded or published one, is *packed*: its floating-point tensors in one flat
buffer, its structure in a layout shared by every domain of the same shapes. Reading `table[domain]`
materialises a module whose tensors are views of that buffer (a bounded cache keeps the last ones), so
reading it, folding it, exporting it and editing its tensors in place work as on a live module. The module
itself is temporary: what is not tensor data (hooks, attributes, `num_batches_tracked`) does not persist,
and it may be rebuilt at any call; take it again rather than keeping it.

Why: a module per layer and domain costs 2-7 KB of Python objects (an `nn.Module` 2.1 KB, a deep copy of a
`BatchNorm2d` 7.4 KB, each tensor about 0.5 KB), as much as the tensors of a small model's domain (a CIFAR
ResNet-56 domain holds 413 KB over 112 layers). Packed, a domain costs its tensors and one buffer per layer.
The gathered pass (`gathered.py`) stacks packed buffers straight into each sample's tensors, and the plain
one-domain trees (`plain.py`) are keyed on them.

Writers (`put`, `del`) change a domain's entry and drop its cached module under the cache's lock; a reader
caches a module only if its record is still the domain's, so no stale module outlives a change.
"""

from __future__ import annotations

import copy
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from operator import attrgetter
from typing import NamedTuple

import torch
from torch import nn

_FLAT, _LAYOUT, _DTYPE = attrgetter("flat"), attrgetter("layout"), attrgetter("dtype")
VIEWS = 16  # packed domains whose materialised modules are kept per layer (least recently used dropped)


class Layout(NamedTuple):
    """The structure shared by packed domains: a meta-device copy of the module, and where each of its
    floating-point tensors sits in the flat buffer (whose dtype and device are the buffer's own)."""

    template: nn.Module  # on the meta device: no data
    floats: tuple[tuple[str, torch.Size, int], ...]  # (state key, shape, offset) packed, in state order
    others: tuple[str, ...]  # state keys kept as Python scalars (BatchNorm's num_batches_tracked)
    signature: tuple  # what modules of this layout share (`_signature`)

    def slices(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """Each packed tensor as a view of `flat` ((..., P) for a stack of buffers: (..., *shape))."""
        lead = flat.shape[:-1]
        return {k: flat[..., o : o + shape.numel()].view(*lead, *shape) for k, shape, o in self.floats}


class Packed(NamedTuple):
    """One frozen domain's tensors of one layer: its layout, the flat buffer and its scalar values."""

    layout: Layout
    flat: torch.Tensor
    scalars: tuple

    def state(self, own: bool = False) -> dict[str, torch.Tensor]:
        """The module's state dict, in its order: views of `flat`, or copies with `own`."""
        template = self.layout.template.state_dict(keep_vars=True)
        state = self.layout.slices(self.flat)
        if own:
            state = {k: v.clone() for k, v in state.items()}
        for key, value in zip(self.layout.others, self.scalars, strict=True):
            state[key] = torch.tensor(value, dtype=template[key].dtype, device=self.flat.device)
        return {k: state[k] for k in template}

    def module(self, own: bool = False) -> nn.Module:
        """A module of the layout holding `state(own)`: frozen views of `flat`, or (`own`) a live module
        with its own copies of the tensors."""
        template = self.layout.template.state_dict(keep_vars=True)
        memo: dict[int, torch.Tensor] = {}
        for key, t in self.state(own).items():
            param = isinstance(template[key], nn.Parameter)
            memo[id(template[key])] = nn.Parameter(t, requires_grad=own) if param else t
        return copy.deepcopy(self.layout.template, memo)


def settings_of(item: nn.Module | Packed) -> nn.Module:
    """A module with `item`'s settings (`shared_columns`, `stride`, ...): itself, or a record's template."""
    return item.layout.template if isinstance(item, Packed) else item


def _signature(module: nn.Module, state: dict[str, torch.Tensor]) -> tuple:
    """What makes two modules share a layout: their types, settings and tensor shapes."""
    settings = tuple(
        (name, type(m).__name__, tuple(sorted((k, repr(v)) for k, v in vars(m).items() if k[0] != "_" and k != "training")))
        for name, m in module.named_modules()
    )  # fmt: skip
    shapes = tuple(
        (k, tuple(t.shape), t.is_floating_point(), isinstance(t, nn.Parameter)) for k, t in state.items()
    )
    return settings, shapes


def packable(module: nn.Module, state: dict[str, torch.Tensor]) -> bool:
    """Whether `module` (whose `state_dict(keep_vars=True)` is `state`) can be packed: one floating dtype,
    scalars otherwise, every tensor in its state dict, and no hooks (a materialised module would not carry
    them)."""
    tensors = [*module.parameters(), *module.buffers()]
    floats = {t.dtype for t in state.values() if t.is_floating_point()}
    hooked = any(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks for m in module.modules())
    return (
        len(floats) <= 1
        and len(tensors) == len(state)
        and all(t.is_floating_point() or t.numel() == 1 for t in state.values())
        and len({t.device for t in state.values()}) <= 1
        and not hooked
    )


def packed_buffers(module: nn.Module) -> list[str]:
    """Names of the packed (frozen) domains' buffers under `module`, as `module.named_buffers()` gives them."""
    return [
        f"{name}.{domain}" if name else domain
        for name, m in module.named_modules()
        if isinstance(m, DomainTable)
        for domain in m._packed
    ]


class _Views:
    """Materialised modules of packed domains, least recently used first out; a copied table starts empty."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.modules: OrderedDict[str, nn.Module] = OrderedDict()
        self.lock = threading.Lock()

    def __deepcopy__(self, memo: dict) -> _Views:
        return _Views(self.capacity)

    def get(self, domain: str) -> nn.Module | None:
        module = self.modules.get(domain)
        if module is not None:
            try:
                self.modules.move_to_end(domain)  # (atomic under the GIL; no lock on the hot path)
            except KeyError:  # dropped by another thread meanwhile: still a valid module
                pass
        return module

    def put(self, domain: str, module: nn.Module, current: Callable[[], bool]) -> nn.Module:
        """Cache `module` if `current()` (its record is still the domain's) under the lock writers take."""
        with self.lock:
            if not current():
                return module
            kept = self.modules.setdefault(domain, module)  # two threads that missed at once: one wins
            while len(self.modules) > self.capacity:
                self.modules.popitem(last=False)
        return kept


class DomainTable(nn.Module):
    """Domain -> module of one adapted layer: live modules for trainable domains, packed buffers for frozen
    ones (see the module docstring). Reads like an `nn.ModuleDict`."""

    def __init__(self, views: int | None = None) -> None:
        super().__init__()
        self._order: dict[str, None] = {}  # every domain, in insertion order
        self._packed: dict[str, Packed] = {}  # the frozen ones (their buffers are also in `_buffers`)
        self._layouts: dict[tuple, Layout] = {}  # by signature
        self._by_state: dict[tuple, tuple[Layout, torch.dtype, torch.device]] = {}  # a file's keys, shapes
        self._views = _Views(VIEWS if views is None else views)

    # ----------------------------------------------------------------- mapping
    def __contains__(self, domain: object) -> bool:
        return domain in self._order

    def __len__(self) -> int:
        return len(self._order)

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._order))

    def keys(self) -> list[str]:
        return list(self._order)

    def values(self) -> list[nn.Module]:
        return [self[d] for d in list(self._order)]

    def items(self) -> list[tuple[str, nn.Module]]:
        return [(d, self[d]) for d in list(self._order)]

    def __getitem__(self, domain: str) -> nn.Module:
        module = self.get(domain)
        if module is None:
            raise KeyError(domain)
        return module

    def get(self, domain: str, default: nn.Module | None = None) -> nn.Module | None:
        """The domain's module (materialised for a packed domain), or `default`."""
        module = self._modules.get(domain)
        if module is None:
            module = self._views.get(domain)
        if module is not None:
            return module
        record = self._packed.get(domain)
        if record is None:
            return default
        return self._views.put(domain, record.module(), lambda: self._packed.get(domain) is record)

    def __setitem__(self, domain: str, module: nn.Module) -> None:
        """Put `module` in (packed if the domain is packed now, else live)."""
        self.put(domain, module, packed=domain in self._packed)

    def __delitem__(self, domain: str) -> None:
        if domain not in self._order:
            raise KeyError(domain)
        with self._views.lock:
            self._modules.pop(domain, None)
            self._buffers.pop(domain, None)
            self._packed.pop(domain, None)
            self._views.modules.pop(domain, None)
            del self._order[domain]

    # ----------------------------------------------------------------- packing
    def put(self, domain: str, module: nn.Module | Packed, *, packed: bool) -> None:
        """Insert or replace `domain`'s module: packed (frozen; the module itself is not kept) or live. A
        `Packed` record (`pack_state`) goes in as it is, or as a live module of its own with `packed=False`."""
        if isinstance(module, Packed) and not packed:
            module = module.module(own=True)
        record = module if isinstance(module, Packed) else self.pack(module) if packed else None
        with self._views.lock:
            if record is not None:
                self._modules.pop(domain, None)
                self._buffers[domain] = record.flat
                self._packed[domain] = record
            else:
                self._buffers.pop(domain, None)
                self._packed.pop(domain, None)
                self._modules[domain] = module
            self._views.modules.pop(domain, None)
            self._order[domain] = None

    def pack(self, module: nn.Module) -> Packed | None:
        """`module`'s tensors packed (copied into one buffer), or None if it cannot be (`packable`)."""
        state = module.state_dict(keep_vars=True)
        if not packable(module, state):
            return None
        signature = _signature(module, state)
        layout = self._layouts.get(signature)
        if layout is None:
            layout = self._layouts.setdefault(signature, _layout(module, state, signature))
        floats = [t for t in state.values() if t.is_floating_point()]
        ref = floats[0] if floats else next(iter(state.values()), torch.zeros(0))
        flat = _flat(layout, state, ref.dtype if floats else torch.float32, ref.device)
        return Packed(layout, flat, tuple(state[k].item() for k in layout.others))

    def pack_state(
        self, state: dict[str, torch.Tensor], build: Callable[[], nn.Module]
    ) -> Packed | nn.Module:
        """A loaded file's tensors of one layer, packed without building a module per domain: `build()`
        (which checks the tensors against the layer) runs once per set of keys and shapes, for its layout
        and the dtype and device the layer's tensors take."""
        key = tuple(sorted((k, tuple(t.shape)) for k, t in state.items()))
        found = self._by_state.get(key)
        if found is None:
            module = build()
            record = self.pack(module)
            if record is not None:
                self._by_state[key] = (record.layout, record.flat.dtype, record.flat.device)
            return module if record is None else record
        layout, dtype, device = found
        cast = {k: state[k].to(device, dtype) for k, _, _ in layout.floats}
        return Packed(
            layout, _flat(layout, cast, dtype, device), tuple(state[k].item() for k in layout.others)
        )

    def held(self, domain: str) -> object:
        """What the table holds for `domain` without materialising it: the live module or the packed buffer."""
        return self._modules[domain] if domain in self._modules else self._packed[domain].flat

    def is_packed(self, domain: str) -> bool:
        return domain in self._packed

    def copy_of(self, domain: str) -> nn.Module:
        """A module of `domain` with its own tensors (not views of the table's buffers)."""
        record = self._packed.get(domain)
        return copy.deepcopy(self[domain]) if record is None else record.module(own=True)

    def unpack(self, domain: str) -> nn.Module:
        """Make a packed domain live again: a module with its own copies of the tensors."""
        if domain not in self._packed:
            return self._modules[domain]
        module = self.copy_of(domain)
        self.put(domain, module, packed=False)
        return module

    def packed_rows(self, domains: tuple[str, ...]) -> tuple[Layout, list[torch.Tensor]] | None:
        """The layout and flat buffers of `domains` when all are packed with one layout and dtype, else None."""
        try:  # (C-level maps: this runs per layer of every mixed batch)
            records = list(map(self._packed.__getitem__, domains))
        except KeyError:
            return None
        flats = list(map(_FLAT, records))
        if len(records) > 1 and (
            len(set(map(id, map(_LAYOUT, records)))) > 1 or len(set(map(_DTYPE, flats))) > 1
        ):
            return None
        return records[0].layout, flats

    def state_of(self, domain: str) -> dict[str, torch.Tensor]:
        """The domain's state dict (views of its buffer for a packed domain)."""
        record = self._packed.get(domain)
        return self[domain].state_dict() if record is None else record.state()

    def _apply(self, fn, recurse: bool = True):  # noqa: ANN001
        with self._views.lock:
            super()._apply(fn, recurse)
            for domain, record in self._packed.items():  # the moved or cast buffers
                self._packed[domain] = record._replace(flat=self._buffers[domain])
            self._views.modules.clear()  # views of the buffers before `.to(...)`
            self._by_state.clear()  # which dtype and device loaded tensors take
        return self

    def extra_repr(self) -> str:
        return f"live={list(self._modules)}, packed={list(self._packed)}"


def _layout(module: nn.Module, state: dict[str, torch.Tensor], signature: tuple) -> Layout:
    floats, offset = [], 0
    for k, t in state.items():
        if t.is_floating_point():
            floats.append((k, t.shape, offset))
            offset += t.numel()
    others = tuple(k for k, t in state.items() if not t.is_floating_point())
    template = copy.deepcopy(module).to("meta").requires_grad_(False).train(False)
    return Layout(template, tuple(floats), others, signature)


def _flat(
    layout: Layout, state: dict[str, torch.Tensor], dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """The floating-point tensors of `state` in the layout's order, as one new buffer."""
    if not layout.floats:  # (a norm without affine parameters or statistics)
        return torch.zeros(0, dtype=dtype, device=device)
    return torch.cat([state[k].detach().reshape(-1) for k, _, _ in layout.floats])
