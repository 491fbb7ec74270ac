"""How `AdapterModel` runs an eval-mode batch whose samples belong to different domains.

`gathered`: one pass of the frozen layers over the whole batch, each sample's adapters, norms and head
gathered (`layers/gathered.py`); equal to running each domain alone to float rounding. `grouped`: one pass
per domain over its samples, with that domain's fused weights, exactly as it would run alone (also what
training mode and backbones whose modules read a layer's weight themselves get). `auto`, the default,
picks per batch: grouped when its domains have GROUPED_IMAGES images each on average, or when there are at
most GROUPED_DOMAINS of them with GROUPED_FEW images each; measured on CPU, grouped execution wins there on
the CIFAR ResNet-56 and ResNet-50 (fused weights, each pass a fair batch) and gathered execution on smaller
groups (docs/benchmarks.md, "Many domains in one process").
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from torch import nn

from .layers import DomainRouter
from .layers.gathered import Mixed, NotGatherable

logger = logging.getLogger(__name__)

GROUPED_IMAGES, GROUPED_DOMAINS, GROUPED_FEW = 8, 4, 4
MIXED_EXECUTION = ("auto", "gathered", "grouped")


class MixedExecution:
    """One model's choice between gathered and grouped execution: its mode, and whether its backbone can
    gather at all (a property of the backbone's code, probed once)."""

    def __init__(self, backbone: nn.Module, router: DomainRouter) -> None:
        self.backbone, self.router = backbone, router
        self._mode = "auto"
        self.gatherable: bool | None = None

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
        per_domain, n = x.shape[0] / len(mixed.domains), len(mixed.domains)
        fair = per_domain >= GROUPED_IMAGES or (n <= GROUPED_DOMAINS and per_domain >= GROUPED_FEW)
        return not (self._mode == "auto" and fair) and self._can_gather(x, mixed)

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
