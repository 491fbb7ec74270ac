"""Layers that wrap a frozen `base_layer` and add one adapter (or norm copy) per domain.

The domain a forward call runs is read from a `DomainRouter` that the owning model passes in; it
is thread-local, so threads serving different domains never see each other's choice, and there
is no global state. With no domain set a wrapper computes exactly its `base_layer`.

In eval mode a parallel adapter is fused into its layer's weight (see `fused.py`): one conv or matmul
per layer instead of two or three. In training, convs stay folded too (`folded.py`: one conv with the merged
kernel forward; backward, the input gradient through it and the adapter's own 1x1 gradient, never the
k x k kernel's); linears keep the low-rank adapter as a separate op; with dropout every adapter stays
separate, since dropout applies to its input alone.
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from .adapters import FullAdapter, LowRankAdapter
from .folded import foldable_in_training, folded_conv2d, folded_linear, tap_input
from .folding import conv_tap, merge_series, not_foldable_reason, pair
from .fused import FusedWeights, merge_conv, merge_linear
from .gathered import Mixed, NotGatherable, conv_forward, linear_forward
from .table import DomainTable

RULES = ("parallel", "series", "lowrank", "grouped")


_UNSET = object()  # a thread that has set no domain (unlike one that set None: the plain backbone)


class DomainRouter:
    """The domain of the forward call running in this thread (None: the plain backbone; `Mixed`: one
    domain per sample, see `gathered.py`).

    A training with gradient checkpointing recomputes the checkpointed blocks in its backward, after the
    forward's `use` has ended and perhaps in autograd's own thread: `hold(domain)` around the backward
    gives those calls (in threads that set no domain themselves) the trained domain."""

    def __init__(self) -> None:
        self._local = threading.local()
        self._held: str | None = None

    @property
    def domain(self) -> str | Mixed | None:
        domain = getattr(self._local, "domain", _UNSET)
        return self._held if domain is _UNSET else domain

    def __deepcopy__(self, memo: dict) -> DomainRouter:
        return DomainRouter()  # a copied model routes its own calls

    @contextmanager
    def use(self, domain: str | Mixed | None) -> Iterator[None]:
        previous = getattr(self._local, "domain", _UNSET)
        self._local.domain = domain
        try:
            yield
        finally:
            self._local.domain = previous  # (_UNSET again where it was: torch.compile cannot trace a del)

    @contextmanager
    def hold(self, domain: str) -> Iterator[None]:
        """`domain` for the calls of every thread that sets none, for the block: the recomputed forward of
        a checkpointed backward (`TrainConfig.grad_checkpointing`)."""
        previous, self._held = self._held, domain
        try:
            yield
        finally:
            self._held = previous


def _setting(name: str) -> property:
    """A read-only view of `base_layer.<name>` (a layer setting such as `out_channels`)."""
    return property(lambda self: getattr(self.base_layer, name), doc=f"`base_layer.{name}`")


class DomainLayer(nn.Module):
    """Base for wrappers: a frozen `base_layer` plus `adapters[domain]` modules (a `DomainTable`).

    Modules that use a wrapped layer without calling it (`F.linear(x, self.qkv.weight, bias)` in BEiT/EVA,
    `self.proj.out_channels`) still work: each wrapper exposes its layer's settings, and its `weight` and
    `bias` are the active domain's, folded the way `export_domain` folds them (weight space).
    """

    fused: FusedWeights | None = None  # eval-mode fused weights, for layers that can fuse

    def __init__(self, base_layer: nn.Module, router: DomainRouter) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.adapters = DomainTable()
        object.__setattr__(self, "router", router)  # shared with the model, not a submodule
        base_layer.requires_grad_(False)

    def route(self, domain: str | Mixed | None = None) -> tuple[str | None, nn.Module | None]:
        """The domain of this call (read from the router unless given) and its adapter, or (None, None)
        for the plain backbone."""
        domain = domain or self.router.domain
        if domain is None:
            return None, None
        if type(domain) is Mixed:
            raise NotGatherable(
                f"a module reads this {type(self).__name__}'s tensors itself, one domain at a time"
            )
        adapter = self._modules["adapters"].get(domain)
        if adapter is None:
            raise KeyError(f"domain {domain!r} was unloaded while this call was running; call again")
        return domain, adapter

    def new_adapter(self, **kwargs) -> nn.Module:
        raise NotImplementedError

    def adapter_from_state(self, state: dict[str, torch.Tensor]) -> nn.Module:
        """Build a domain's adapter whose form and shapes match `state`, and load it (strict)."""
        if "gamma" in state and "beta_own" in state:
            own = state["beta_own"].shape[1]
            adapter = self.new_adapter(
                factored=True, own_columns=own, shared_columns=state["gamma"].shape[1] - own
            )
        elif "alpha" in state:
            adapter = self.new_adapter(factored=False)
        else:
            adapter = self.new_adapter()
        check_state(adapter.state_dict(), state)
        adapter.load_state_dict(state)
        return adapter

    def train(self, mode: bool = True) -> DomainLayer:
        super().train(mode)
        self.base_layer.train(False)  # the shared backbone never updates (BN statistics included)
        if self.fused is not None:
            self.fused.clear()  # also catches weights edited through `.data` (no version bump)
        return self


def check_state(expected: dict[str, torch.Tensor], state: dict[str, torch.Tensor]) -> None:
    """That `state` has exactly the tensors of `expected`, each of its shape."""
    if set(expected) != set(state):
        raise ValueError(f"expected tensors {sorted(expected)}, found {sorted(state)}")
    for key, t in state.items():
        if tuple(t.shape) != tuple(expected[key].shape):
            raise ValueError(
                f"{key}: shape {tuple(t.shape)} does not fit this layer ({tuple(expected[key].shape)})"
            )


def _factors(adapter: nn.Module, beta: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """What the folded training ops take: a full adapter's matrix, or a low-rank one's (basis, gamma)."""
    if isinstance(adapter, LowRankAdapter):
        return adapter.basis(beta), adapter.gamma
    return adapter.weight(beta)


def _channels_last(x: torch.Tensor) -> bool:
    return x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


class AdaptedConv2d(DomainLayer):
    """A conv with a per-domain 1x1 adapter.

    Rules: `parallel` (y = f(x) + alpha(x), stride-matched), `series` (y = f(x) + alpha(f(x))),
    `lowrank` (parallel, alpha = beta gamma^T; default for 1x1 convs), `grouped` (parallel with the
    conv's own groups; per-channel for depthwise convs).
    """

    def __init__(
        self,
        base_layer: nn.Conv2d,
        router: DomainRouter,
        rule: str,
        *,
        rank: int = 8,
        dropout: float = 0.0,
    ) -> None:
        super().__init__(base_layer, router)
        if rule not in RULES:
            raise ValueError(f"unknown adapter rule {rule!r}; use one of {RULES}")
        if rule in ("parallel", "lowrank") and base_layer.groups != 1:
            rule = "grouped"
        self.rule = rule
        self.rank = min(rank, base_layer.in_channels, base_layer.out_channels)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else None
        self.tap, self.offset = conv_tap(base_layer)
        # series adapters act on the conv's output, and non-plain convs do not fold exactly
        self.fusable = rule != "series" and not_foldable_reason(base_layer) is None
        # Training runs the adapter folded into the kernel too (`folded_conv2d`: one conv forward; backward,
        # the input gradient and the adapter's 1x1 weight gradient only); dropout needs the separate op.
        self.train_fused = self.fusable and foldable_in_training(base_layer) and self.dropout is None
        self.fused = FusedWeights()
        self.register_buffer(
            "beta", base_layer.weight.new_zeros(base_layer.out_channels, 0), persistent=False
        )

    def new_adapter(
        self, *, factored: bool | None = None, own_columns: int | None = None, shared_columns: int = 0
    ) -> nn.Module:
        """A fresh adapter for a new domain: full `alpha`, or `LowRankAdapter` when factored.

        Args:
            factored: low-rank form (default: only for the `lowrank` rule).
            own_columns: basis columns of its own (default: the layer's adapter rank).
            shared_columns: leading columns of the shared `beta` the domain builds on.
        """
        conv = self.base_layer
        kw = dict(device=conv.weight.device, dtype=conv.weight.dtype)
        factored = self.rule == "lowrank" if factored is None else factored
        series = self.rule == "series"
        c_in = conv.out_channels if series else conv.in_channels
        stride = 1 if series else conv.stride
        if factored:
            if self.rule == "grouped":
                raise ValueError("grouped/depthwise adapters have no low-rank form; keep them full")
            own = self.rank if own_columns is None else own_columns
            return LowRankAdapter(
                c_in,
                conv.out_channels,
                own_columns=own,
                shared_columns=shared_columns,
                stride=stride,
                conv=True,
                **kw,
            )
        return FullAdapter(c_in, conv.out_channels, groups=conv.groups, stride=stride, conv=True, **kw)

    def _align(self, x: torch.Tensor, out: tuple[int, int]) -> torch.Tensor:
        """The input rows and columns the conv's tap reads for its `out` output positions, so the
        stride-matched 1x1 adapter reads exactly there (zeros where the tap reads padding)."""
        if type(self.base_layer) is not nn.Conv2d:  # Conv2dSame & co: plain stride-matched 1x1
            return x
        return tap_input(x, self.offset, pair(self.base_layer.stride), out)

    in_channels, out_channels = _setting("in_channels"), _setting("out_channels")
    kernel_size, stride, padding = _setting("kernel_size"), _setting("stride"), _setting("padding")
    dilation, groups, padding_mode = _setting("dilation"), _setting("groups"), _setting("padding_mode")

    def _merged(self, domain: str, adapter: nn.Module) -> torch.Tensor:
        """The base kernel with the adapter added at its tap (cached per domain in eval mode)."""
        conv = self._modules["base_layer"]  # dict lookups: this runs for every layer of every call
        beta, weight = self._buffers["beta"], conv._parameters.get("weight")
        weight = conv.weight if weight is None else weight  # (a layer whose weight is computed)
        build = lambda: merge_conv(weight, adapter.weight(beta), self.tap)  # noqa: E731
        if not self.fused.enabled:
            return build()
        return self.fused.weight(domain, (weight, beta, *adapter._parameters.values()), build)

    @property
    def weight(self) -> torch.Tensor:
        """The kernel of the domain of this call, folded as export folds it (the base kernel without one)."""
        domain, adapter = self.route()
        if adapter is None:
            return self.base_layer.weight
        if self.rule == "series":
            conv = self.base_layer
            return merge_series(conv.weight, conv.bias, adapter.weight(self.beta), conv.groups)[0]
        return self._merged(domain, adapter)

    @property
    def bias(self) -> torch.Tensor | None:
        """The bias of the domain of this call (a series adapter maps the bias too)."""
        conv = self.base_layer
        adapter = self.route()[1]
        if adapter is None or self.rule != "series" or conv.bias is None:
            return conv.bias
        return merge_series(conv.weight, conv.bias, adapter.weight(self.beta), conv.groups)[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if type(domain := self.router.domain) is Mixed:
            return conv_forward(self, x, domain)
        domain, adapter = self.route(domain)
        conv = self._modules["base_layer"]
        if adapter is None:
            return conv(x)
        if self.fused.enabled and (self.train_fused if self.training else self.fusable):
            if self.training and torch.is_grad_enabled():
                return folded_conv2d(x, conv, _factors(adapter, self._buffers["beta"]), self.tap, self.offset)
            return conv._conv_forward(x, self._merged(domain, adapter), conv.bias)
        channels_last = self.training and _channels_last(x)
        y = conv(x)
        if self.rule == "series":
            x = y.contiguous() if channels_last else y
            return y + adapter(x if self.dropout is None else self.dropout(x), self.beta)
        if channels_last:
            # torch 2.14's CPU backward of a 1x1 conv on a channels-last input whose weight is computed
            # from a parameter (the adapter's) corrupts memory; the adapter reads a contiguous copy.
            x = x.contiguous()
        x = self._align(x, tuple(y.shape[-2:]))
        delta = adapter(x if self.dropout is None else self.dropout(x), self.beta)
        if delta.shape[-2:] != y.shape[-2:]:
            delta = delta[..., : y.shape[-2], : y.shape[-1]]
        # In place: the conv's output is fresh and autograd does not save it, so training holds one
        # activation-sized temporary less per adapted layer.
        return y.add_(delta)

    @torch.no_grad()
    def fold(self, domain: str) -> nn.Conv2d:
        """A copy of the base conv with this domain's adapter folded into its weight."""
        reason = not_foldable_reason(self.base_layer)
        if reason is not None:
            raise ValueError(f"cannot fold the adapter exactly: {reason}")
        conv = copy.deepcopy(self.base_layer)
        alpha = self.adapters[domain].weight(self.beta)
        if self.rule == "series":
            w, b = merge_series(conv.weight, conv.bias, alpha, conv.groups)
            if b is not None:
                conv.bias.copy_(b)
        else:
            w = merge_conv(conv.weight, alpha, self.tap)
        conv.weight.copy_(w)
        conv.requires_grad_(True)
        return conv


class AdaptedLinear(DomainLayer):
    """An `nn.Linear` with a per-domain low-rank parallel adapter `beta gamma^T`."""

    def __init__(
        self, base_layer: nn.Linear, router: DomainRouter, *, rank: int = 8, dropout: float = 0.0
    ) -> None:
        super().__init__(base_layer, router)
        self.rule = "lowrank"
        self.rank = min(rank, base_layer.in_features, base_layer.out_features)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else None
        # a subclass with its own forward might not compute x @ weight.T + bias
        self.fusable = type(base_layer).forward is nn.Linear.forward
        self.fused = FusedWeights()
        self.register_buffer(
            "beta", base_layer.weight.new_zeros(base_layer.out_features, 0), persistent=False
        )

    def new_adapter(
        self, *, factored: bool | None = None, own_columns: int | None = None, shared_columns: int = 0
    ) -> nn.Module:
        lin = self.base_layer
        kw = dict(device=lin.weight.device, dtype=lin.weight.dtype)
        if factored is False:
            return FullAdapter(lin.in_features, lin.out_features, conv=False, **kw)
        own = self.rank if own_columns is None else own_columns
        return LowRankAdapter(
            lin.in_features,
            lin.out_features,
            own_columns=own,
            shared_columns=shared_columns,
            conv=False,
            **kw,
        )

    in_features = _setting("in_features")
    out_features = _setting("out_features")
    bias = _setting("bias")

    def _merged(self, domain: str, adapter: nn.Module) -> torch.Tensor:
        """The base weight plus the adapter's (cached per domain in eval mode)."""
        lin = self.base_layer
        beta = self._buffers["beta"]
        build = lambda: merge_linear(lin.weight, adapter.weight(beta))  # noqa: E731
        if not self.fused.enabled:
            return build()
        return self.fused.weight(domain, (lin.weight, beta, *adapter._parameters.values()), build)

    @property
    def weight(self) -> torch.Tensor:
        """The weight of the domain of this call, folded as export folds it (the base weight without one)."""
        domain, adapter = self.route()
        return self.base_layer.weight if adapter is None else self._merged(domain, adapter)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if type(domain := self.router.domain) is Mixed:
            return linear_forward(self, x, domain)
        domain, adapter = self.route(domain)
        lin = self._modules["base_layer"]
        if adapter is None:
            return lin(x)
        if (
            self.fusable
            and self.fused.enabled
            and self.dropout is None
            and self.training
            and torch.is_grad_enabled()
        ):
            return folded_linear(x, lin, _factors(adapter, self._buffers["beta"]))
        if not self.training and self.fusable and self.fused.enabled:
            return F.linear(x, self._merged(domain, adapter), lin.bias)
        return lin(x).add_(adapter(x if self.dropout is None else self.dropout(x), self.beta))

    @torch.no_grad()
    def fold(self, domain: str) -> nn.Linear:
        lin = copy.deepcopy(self.base_layer)
        lin.weight.copy_(merge_linear(lin.weight, self.adapters[domain].weight(self.beta)))
        lin.requires_grad_(True)
        return lin
