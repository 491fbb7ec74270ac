"""`AdapterConfig`: which layers of a backbone get which adapter, and how."""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field
from typing import Any

TOPOLOGIES = ("parallel", "series")
PLACEMENTS = ("all", "early", "mid", "late", "half")
OVERRIDE_RULES = ("parallel", "series", "lowrank", "grouped", "norm", "frozen", "skip")
NORM_POLICIES = ("domain", "frozen")


@dataclass
class AdapterConfig:
    """How adapters are attached to a backbone.

    Args:
        topology: `parallel` (y = f*x + alpha*x, the 2018 paper) or `series` (y = f*x + alpha*(f*x),
            the 2017 residual adapters) for dense k x k convs.
        placement: stages that get adapters: `all`, `early` / `mid` / `late` (first, second, last
            third of timm's `feature_info` stages), or `half` (every second adaptable layer inside each
            block, i.e. the second conv of each basic block). A list combines stages, e.g. ["mid", "late"].
        rank: rank of the low-rank adapters on 1x1 convs and `nn.Linear` (int, capped at the layer's
            smaller side).
        norm_policy: `domain` gives every domain its own LayerNorm/GroupNorm affine copy; `frozen` keeps
            the backbone's. BatchNorm is always per domain (its statistics are domain data).
        dropout: dropout applied to an adapter's input while training (the paper's regulariser).
        linear: adapt `nn.Linear` layers (low rank). 1x1 convs are always low rank.
        overrides: fnmatch pattern on module names -> rule (`parallel`, `series`, `lowrank`, `grouped`,
            `norm`, `frozen`, `skip`); the first matching pattern wins and beats placement.
        strict: raise on parameterised layers no rule covers instead of logging that they stay frozen.

    Example:
        >>> AdapterConfig(topology="series", placement=["late"]).placement
        ['late']
    """

    topology: str = "parallel"
    placement: str | list[str] = "all"
    rank: int = 8
    norm_policy: str = "domain"
    dropout: float = 0.0
    linear: bool = True
    overrides: dict[str, str] = field(default_factory=dict)
    strict: bool = False

    def __post_init__(self) -> None:
        if self.topology not in TOPOLOGIES:
            raise ValueError(f"topology={self.topology!r} is not supported; use one of {TOPOLOGIES}")
        stages = [self.placement] if isinstance(self.placement, str) else list(self.placement)
        bad = [p for p in stages if p not in PLACEMENTS]
        if bad or not stages:
            raise ValueError(
                f"placement={self.placement!r} is not supported; use one or more of {PLACEMENTS}"
            )
        if "all" in stages and len(stages) > 1:
            raise ValueError("placement 'all' cannot be combined with other placements; pass 'all' alone")
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"rank={self.rank!r} must be a positive int (for example 8)")
        if self.norm_policy not in NORM_POLICIES:
            raise ValueError(f"norm_policy={self.norm_policy!r} is not supported; use one of {NORM_POLICIES}")
        if not (isinstance(self.dropout, (int, float)) and 0.0 <= self.dropout < 1.0) or math.isnan(
            self.dropout
        ):
            raise ValueError(f"dropout={self.dropout!r} must be in [0, 1)")
        for pattern, rule in self.overrides.items():
            if rule not in OVERRIDE_RULES:
                raise ValueError(f"override {pattern!r} -> {rule!r}: rule must be one of {OVERRIDE_RULES}")

    @property
    def stages(self) -> list[str]:
        return [self.placement] if isinstance(self.placement, str) else list(self.placement)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AdapterConfig:
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(
                f"unknown AdapterConfig fields {unknown}; this file may come from a newer adapterkit"
            )
        return cls(**data)


DOMAIN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")


def check_domain_name(name: object) -> str:
    """Return `name` if it is a safe domain name (it becomes a file name), else raise ValueError."""
    if name == "auto":
        raise ValueError(
            "'auto' is reserved (model(x, domain='auto') routes each image): pick another domain name"
        )
    if not isinstance(name, str) or not DOMAIN_NAME.match(name):
        raise ValueError(
            f"domain name {name!r} is not a safe file name: use 1-64 letters, digits, '_' or '-', "
            "starting with a letter or digit (for example 'gtsrb' or 'flowers-90')"
        )
    return name


@dataclass
class DomainInfo:
    """What the model knows about a domain besides its tensors."""

    name: str
    num_classes: int
    labels: list[str] | None = None
    data_config: dict[str, Any] | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def resolve_num_classes(
    name: str, num_classes: int | None, labels: Any, head: str, backbone_classes: int | None
) -> int:
    """A new domain's head size from what `add_domain` was given, checked."""
    if num_classes is None:
        if labels is not None:
            num_classes = len(labels)
        elif head == "backbone" and backbone_classes is not None:
            num_classes = backbone_classes
        else:
            raise ValueError(f"add_domain({name!r}) needs num_classes (or labels, or head='backbone')")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes={num_classes!r} must be a positive int")
    if labels is not None and len(labels) != num_classes:
        raise ValueError(f"{len(labels)} labels given for num_classes={num_classes}; they must match")
    if head == "backbone" and backbone_classes != num_classes:
        raise ValueError(
            f"head='backbone' needs the backbone's linear classifier with {num_classes} classes; use head='new'"
        )
    return num_classes
