"""`DomainNorm`: one copy of a normalisation layer per domain (affine parameters and running statistics).

A domain's norm is a deep copy of the backbone's (trained with the domain, frozen with it); modules that
normalise with a norm's tensors themselves read the active domain's copy through the wrapper.
"""

from __future__ import annotations

import copy
from itertools import chain

import torch
from torch import nn

from .gathered import Mixed
from .gathered_norms import norm_forward
from .wrappers import DomainLayer, check_state


def _domain_setting(name: str) -> property:
    """A read-only view of `<name>` of the active domain's copy of a norm (of `base_layer` without one)."""

    def get(self: DomainLayer) -> object:
        norm = self.route()[1]
        return getattr(self.base_layer if norm is None else norm, name)

    return property(get, doc=f"`{name}` of the domain's norm")


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

    def adapter_from_state(self, state: dict[str, torch.Tensor]) -> nn.Module:
        """A copy of the backbone's norm holding `state`'s tensors (copied once, in the norm's dtypes), built
        without first copying the backbone's tensors."""
        base = self.base_layer
        check_state(base.state_dict(), state)
        replace: dict[int, torch.Tensor] = {}
        for key, t in chain(base.named_parameters(), base.named_buffers()):
            if key in state:
                own = state[key].to(t.device, t.dtype, copy=True)
                replace[id(t)] = nn.Parameter(own) if isinstance(t, nn.Parameter) else own
        return copy.deepcopy(base, replace).requires_grad_(True)  # deepcopy reuses what its memo holds

    # read by modules that normalise with a norm's tensors themselves: the active domain's copy
    weight, bias, eps = _domain_setting("weight"), _domain_setting("bias"), _domain_setting("eps")
    running_mean, running_var = _domain_setting("running_mean"), _domain_setting("running_var")
    num_features, normalized_shape = _domain_setting("num_features"), _domain_setting("normalized_shape")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if type(domain := self.router.domain) is Mixed:
            return norm_forward(self, x, domain)
        norm = self.route(domain)[1]
        return self._modules["base_layer"](x) if norm is None else norm(x)

    def fold(self, domain: str) -> nn.Module:
        norm = self.adapters.copy_of(domain)  # its own tensors, not views of the domain's packed buffer
        norm.train(False)
        return norm
