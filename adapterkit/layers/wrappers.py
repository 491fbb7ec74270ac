"""Layers that wrap a frozen `base_layer` and add one adapter (or norm copy) per domain.

The domain a forward call runs is read from a `DomainRouter` that the owning model passes in; it
is thread-local, so threads serving different domains never see each other's choice, and there
is no global state. With no domain set a wrapper computes exactly its `base_layer`.

In eval mode a parallel adapter is fused into its layer's weight (see `fused.py`): one conv or matmul
per layer instead of two or three. In training, 1x1 convs stay fused too (the merged weight's gradient
costs what the adapter's would, and the adapter's own thin convs are saved); k x k convs and linears keep
the adapter as a separate op, cheaper to differentiate (a 1x1 or low-rank weight gradient instead of the
layer's full one); with dropout every adapter stays separate, since dropout applies to its input alone.
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
from .fused import FusedWeights, merge_conv, merge_linear

RULES = ("parallel", "series", "lowrank", "grouped")


class DomainRouter:
    """The domain of the forward call running in this thread (None: the plain backbone)."""

    def __init__(self) -> None:
        self._local = threading.local()

    @property
    def domain(self) -> str | None:
        return getattr(self._local, "domain", None)

    def __deepcopy__(self, memo: dict) -> DomainRouter:
        return DomainRouter()  # a copied model routes its own calls

    @contextmanager
    def use(self, domain: str | None) -> Iterator[None]:
        previous = self.domain
        self._local.domain = domain
        try:
            yield
        finally:
            self._local.domain = previous


class DomainLayer(nn.Module):
    """Base for wrappers: a frozen `base_layer` plus `adapters[domain]` modules."""

    fused: FusedWeights | None = None  # eval-mode fused weights, for layers that can fuse

    def __init__(self, base_layer: nn.Module, router: DomainRouter) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.adapters = nn.ModuleDict()
        object.__setattr__(self, "router", router)  # shared with the model, not a submodule
        base_layer.requires_grad_(False)

    def route(self) -> tuple[str | None, nn.Module | None]:
        """The domain of this call and its adapter, or (None, None) for the plain backbone."""
        domain = self.router.domain
        if domain is None:
            return None, None
        adapter = self._modules["adapters"]._modules.get(domain)
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
        expected = adapter.state_dict()
        if set(expected) != set(state):
            raise ValueError(f"expected tensors {sorted(expected)}, found {sorted(state)}")
        for key, t in state.items():
            if tuple(t.shape) != tuple(expected[key].shape):
                raise ValueError(
                    f"{key}: shape {tuple(t.shape)} does not fit this layer ({tuple(expected[key].shape)})"
                )
        adapter.load_state_dict(state)
        return adapter

    def train(self, mode: bool = True) -> DomainLayer:
        super().train(mode)
        self.base_layer.train(False)  # the shared backbone never updates (BN statistics included)
        if self.fused is not None:
            self.fused.clear()  # also catches weights edited through `.data` (no version bump)
        return self


def _pair(v: int | tuple[int, ...]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def conv_tap(conv: nn.Conv2d) -> tuple[tuple[int, int], tuple[int, int]]:
    """Kernel tap the stride-matched 1x1 adapter stands for, and the input offset it reads at.

    The tap is the kernel centre ((k - 1) // 2 per dimension). The adapter reads input position
    `i * stride + offset`, which is exactly where that tap of the k x k conv reads, so folding the
    adapter into the tap is exact (for plain zero-padded `nn.Conv2d`; see `foldable`).
    """
    k, d = _pair(conv.kernel_size), _pair(conv.dilation)
    if isinstance(conv.padding, str):
        pad = (
            (0, 0)
            if conv.padding == "valid"
            else tuple(di * (ki - 1) // 2 for ki, di in zip(k, d, strict=True))
        )
    else:
        pad = _pair(conv.padding)
    tap = ((k[0] - 1) // 2, (k[1] - 1) // 2)
    offset = (tap[0] * d[0] - pad[0], tap[1] * d[1] - pad[1])
    return tap, offset


def not_foldable_reason(conv: nn.Module) -> str | None:
    """Why folding an adapter into this conv would not be exact, or None if it is."""
    if type(conv) is nn.Linear:
        return None
    if type(conv) is not nn.Conv2d:
        name = type(conv).__name__
        if "Same" in name:
            why = "it pads asymmetrically depending on the input size, so no single kernel tap matches the adapter"
        elif "Std" in name:
            why = "it standardises its weight before use, so a weight added to its kernel is rescaled"
        else:
            why = "it is not a plain nn.Conv2d, so adding to its weight is not known to add the adapter's output"
        return f"{name}: {why}"
    if conv.padding_mode != "zeros":
        _, offset = conv_tap(conv)
        if min(offset) < 0:
            return f"padding_mode={conv.padding_mode!r} pads the tap the adapter is folded into"
    return None


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
        # A 1x1 conv also trains fused: its merged weight's gradient costs what the adapter's own would,
        # and the adapter's separate convs (two thin ones when low-rank) are saved. A k x k conv trains
        # unfused: a fused weight would need the k x k weight gradient, 9x a 1x1 one for 3x3.
        self.train_fused = self.fusable and _pair(base_layer.kernel_size) == (1, 1) and self.dropout is None
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

    def _align(self, x: torch.Tensor) -> torch.Tensor:
        """Shift the input so the 1x1 adapter reads where the conv's tap reads."""
        if type(self.base_layer) is not nn.Conv2d:  # Conv2dSame & co: plain stride-matched 1x1
            return x
        oh, ow = self.offset
        if oh < 0 or ow < 0:
            x = F.pad(x, (max(-ow, 0), 0, max(-oh, 0), 0))
        return x[..., max(oh, 0) :, max(ow, 0) :] if (oh > 0 or ow > 0) else x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        domain, adapter = self.route()
        conv = self.base_layer
        if adapter is None:
            return conv(x)
        if (self.train_fused if self.training else self.fusable) and self.fused.enabled:
            beta = self._buffers["beta"]  # dict lookups: this runs for every layer of every call
            weight = self.fused.weight(
                domain,
                (conv.weight, beta, *adapter._parameters.values()),
                lambda: merge_conv(conv.weight, adapter.weight(beta), self.tap),
            )
            return conv._conv_forward(x, weight, conv.bias)
        y = conv(x)
        if self.rule == "series":
            return y + adapter(y if self.dropout is None else self.dropout(y), self.beta)
        x = self._align(x)
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
        alpha = self.adapters[domain].weight(self.beta).float()
        w = conv.weight.float()
        if self.rule == "series":
            g = conv.groups
            cg = conv.out_channels // g
            a = alpha.view(g, cg, cg)
            wg = w.view(g, cg, -1)
            w = (wg + torch.bmm(a, wg)).view_as(w)
            if conv.bias is not None:
                b = conv.bias.float().view(g, cg, 1)
                conv.bias.copy_((b + torch.bmm(a, b)).view(-1))
        else:
            w[:, :, self.tap[0], self.tap[1]] += alpha
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        domain, adapter = self.route()
        lin = self.base_layer
        if adapter is None:
            return lin(x)
        if not self.training and self.fusable and self.fused.enabled:
            beta = self._buffers["beta"]
            weight = self.fused.weight(
                domain,
                (lin.weight, beta, *adapter._parameters.values()),
                lambda: merge_linear(lin.weight, adapter.weight(beta)),
            )
            return F.linear(x, weight, lin.bias)
        return lin(x).add_(adapter(x if self.dropout is None else self.dropout(x), self.beta))

    @torch.no_grad()
    def fold(self, domain: str) -> nn.Linear:
        lin = copy.deepcopy(self.base_layer)
        lin.weight.add_(self.adapters[domain].weight(self.beta).to(lin.weight.dtype))
        lin.requires_grad_(True)
        return lin


class DomainNorm(DomainLayer):
    """One copy of a normalisation layer per domain: affine parameters and running statistics.

    Works for any norm module (BatchNorm1d/2d, timm BatchNormAct2d with its activation, LayerNorm,
    GroupNorm, ...): each domain starts from a deep copy of the backbone's layer.
    """

    rule = "norm"

    def new_adapter(self, **kwargs) -> nn.Module:
        norm = copy.deepcopy(self.base_layer)
        norm.requires_grad_(True)
        return norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        norm = self.route()[1]
        return self.base_layer(x) if norm is None else norm(x)

    def fold(self, domain: str) -> nn.Module:
        norm = copy.deepcopy(self.adapters[domain])
        norm.train(False)
        return norm
