"""How `AdapterModel` runs an eval-mode batch whose samples belong to different domains.

`gathered`: one pass of the frozen layers over the whole batch, each sample's adapters, norms and head
gathered (`layers/gathered.py`); equal to running each domain alone to float rounding. `grouped`: one pass
per domain over its samples, with that domain's fused weights, exactly as it would run alone (also what
training mode and backbones whose modules read a layer's weight themselves get). `auto`, the default,
picks per batch: grouped when its domains have GROUPED_IMAGES images each on average, or when there are at
most GROUPED_DOMAINS of them with GROUPED_FEW images each (2 on a compute-bound model). Compute-bound: on
CPU, at least COMPUTE_BOUND_FLOPS per adapted layer and image (counted once per input shape by torch's
FlopCounterMode over one image), where a pass over 2 images costs per image about what a large batch does.
Measured on CPU (docs/benchmarks.md, "Many domains in one process"): grouped execution wins on the CIFAR
ResNet-56 and ResNet-50 when each domain's pass is a fair batch (fused weights) and gathered execution on
smaller groups; on ResNet-50 at 128 px (27 MFLOPs a layer) also at 8 images over 4 domains (grouped 0.93x
of one domain's batch, gathered 0.86x, in process), where on the CIFAR ResNet-56 (2.3 MFLOPs a layer)
passes of 2 images cost per image about twice a large batch's. GPUs keep the rule for overhead-bound
models (not measured).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .layers import DomainLayer, DomainRouter
from .layers.gathered import Mixed, NotGatherable

logger = logging.getLogger(__name__)

GROUPED_IMAGES, GROUPED_DOMAINS, GROUPED_FEW, GROUPED_FEW_COMPUTE = 8, 4, 4, 2
COMPUTE_BOUND_FLOPS = 8e6  # per adapted layer and image, between the two models measured (2.3 and 27 M)
MIXED_EXECUTION = ("auto", "gathered", "grouped")


class MixedExecution:
    """One model's choice between gathered and grouped execution: its mode, and whether its backbone can
    gather at all (a property of the backbone's code, probed once)."""

    def __init__(self, backbone: nn.Module, router: DomainRouter) -> None:
        self.backbone, self.router = backbone, router
        self._mode = "auto"
        self.gatherable: bool | None = None
        self._flops: dict[tuple, float] = {}  # FLOPs per adapted layer and image, by input shape and device

    @property
    def mode(self) -> str:
        return self._mode

    @mode.setter
    def mode(self, value: str) -> None:
        if value not in MIXED_EXECUTION:
            raise ValueError(f"mixed_execution={value!r}: use one of {MIXED_EXECUTION}")
        self._mode = value

    def gathers(self, x: torch.Tensor, mixed: Mixed, training: bool) -> bool:
        """Whether this mixed batch runs gathered (see the module docstring)."""
        if training or self._mode == "grouped":
            return False
        return not (self._mode == "auto" and self._fair(x, mixed)) and self._can_gather(x, mixed)

    def _fair(self, x: torch.Tensor, mixed: Mixed) -> bool:
        """Whether each domain's pass is a fair batch, so `auto` runs the domains grouped."""
        per_domain, n = x.shape[0] / len(mixed.domains), len(mixed.domains)
        if per_domain >= GROUPED_IMAGES or (n <= GROUPED_DOMAINS and per_domain >= GROUPED_FEW):
            return True
        return n <= GROUPED_DOMAINS and per_domain >= GROUPED_FEW_COMPUTE and self._compute_bound(x, mixed)

    def _compute_bound(self, x: torch.Tensor, mixed: Mixed) -> bool:
        """Whether the model does at least COMPUTE_BOUND_FLOPS per adapted layer and image on CPU."""
        if x.device.type != "cpu":
            return False
        key = (x.device, x.dtype, tuple(x.shape[1:]))
        if key not in self._flops:
            layers = sum(isinstance(m, DomainLayer) for m in self.backbone.modules())
            with torch.no_grad(), self.router.use(mixed.domains[0]), FlopCounterMode(display=False) as count:
                self.backbone(x[:1])
            self._flops[key] = count.get_total_flops() / max(layers, 1)
        return self._flops[key] >= COMPUTE_BOUND_FLOPS

    def _can_gather(self, x: torch.Tensor, mixed: Mixed) -> bool:
        """Whether every layer sees the batch's samples as its rows, found once by running one and two
        samples gathered: a layer that reads its weight itself, runs on windows or on a fixed-size table
        (relative positions) fails one of the two (layers/gathered.py)."""
        if self.gatherable is None:
            try:
                with torch.no_grad():
                    for n in (1, 2):
                        probe = Mixed.of(list(mixed.domains[:n]), x.device)
                        with self.router.use(probe):
                            self.backbone(x[:n])
                self.gatherable = True
            except NotGatherable as e:
                logger.info("mixed batches run one domain group at a time: %s", e)
                self.gatherable = False
        return self.gatherable


def padded_rows(
    mixed: Mixed, width: int, logits_of: Callable[[str, torch.Tensor], torch.Tensor]
) -> torch.Tensor:
    """Each domain's logits for its rows (`logits_of(domain, rows)`) in one tensor of `width` columns,
    padded with `-inf`, so softmax, argmax and cross-entropy stay correct per sample."""
    out = None
    for d, rows in zip(mixed.domains, mixed.rows, strict=True):
        logits = logits_of(d, rows)
        if out is None:
            out = logits.new_full((mixed.index.shape[0], width), float("-inf"))
        out[rows, : logits.shape[1]] = logits
    return out
