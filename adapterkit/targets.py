"""Which modules of a timm backbone get which adapter rule (the layer rules of DESIGN §3).

| layer | rule |
|---|---|
| dense k x k `nn.Conv2d` | `parallel` (or `series`) 1x1 adapter, stride-matched, zero-initialised |
| 1x1 `nn.Conv2d`, `nn.Linear` | `lowrank` parallel adapter `beta gamma^T` |
| depthwise / grouped conv | `grouped` 1x1 adapter with the conv's groups (per channel for depthwise) |
| BatchNorm (any `_BatchNorm`, timm `BatchNormAct2d`) | `norm`: one copy per domain, always |
| LayerNorm / GroupNorm / RmsNorm & co | `norm` per domain, or shared and frozen (`norm_policy`) |
| classifier | replaced by one head per domain (see `AdapterModel`) |
| anything else with parameters | stays frozen and shared (logged; an error with `strict=True`) |
"""

from __future__ import annotations

import fnmatch
import logging
from dataclasses import dataclass

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .config import AdapterConfig

logger = logging.getLogger(__name__)

ADAPTER_RULES = ("parallel", "series", "lowrank", "grouped")


@dataclass(frozen=True)
class Target:
    """One module of the backbone and the rule it gets."""

    name: str
    rule: str
    kind: str


def _is_norm(module: nn.Module) -> bool:
    if isinstance(module, (_BatchNorm, nn.LayerNorm, nn.GroupNorm, nn.RMSNorm)):
        return True
    has_own = any(True for _ in module.parameters(recurse=False)) or any(
        True for _ in module.buffers(recurse=False)
    )
    return has_own and "Norm" in type(module).__name__


def default_rule(module: nn.Module, config: AdapterConfig) -> str | None:
    """The rule a module gets by its type alone, or None if no rule covers it."""
    if isinstance(module, nn.Conv2d):
        if module.groups != 1:
            return "grouped"
        if tuple(module.kernel_size) == (1, 1):
            return "lowrank"
        return config.topology
    if isinstance(module, nn.Linear):
        return "lowrank" if config.linear else "frozen"
    if not any(True for _ in module.parameters()) and not any(True for _ in module.buffers()):
        return None  # stateless (a norm without affine or statistics): no per-domain tensors to hold
    if isinstance(module, _BatchNorm):
        return "norm"
    if _is_norm(module):
        return "norm" if config.norm_policy == "domain" else "frozen"
    return None


def _check_override(name: str, module: nn.Module, rule: str) -> None:
    ok = {
        "parallel": isinstance(module, nn.Conv2d) and module.groups == 1,
        "series": isinstance(module, nn.Conv2d),
        "lowrank": isinstance(module, nn.Linear) or (isinstance(module, nn.Conv2d) and module.groups == 1),
        "grouped": isinstance(module, nn.Conv2d),
        "norm": _is_norm(module),
    }.get(rule, True)
    if not ok:
        raise ValueError(
            f"override gives {name!r} ({type(module).__name__}) the rule {rule!r}, which does not apply to "
            "that layer type; see docs/layer-rules.md for the rules each type accepts"
        )


def stage_index(model: nn.Module) -> dict[str, int] | None:
    """Module name -> index of the timm `feature_info` stage it belongs to (stem modules: 0)."""
    info = getattr(model, "feature_info", None)
    if not info:
        return None
    stage_names = [f["module"] for f in info]
    names = [n for n, _ in model.named_modules()]
    order = {n: i for i, n in enumerate(names)}
    stage_pos = [order.get(s, -1) for s in stage_names]
    result = {}
    for n in names:
        inside = [i for i, s in enumerate(stage_names) if n == s or n.startswith(s + ".")]
        if inside:
            result[n] = inside[-1]
            continue
        later = [i for i, p in enumerate(stage_pos) if p > order[n]]
        result[n] = later[0] if later else len(stage_names) - 1
    return result


def _in_placement(part: int, stages: list[str]) -> bool:
    chosen = [s for s in stages if s in ("early", "mid", "late")]
    return not chosen or ("early", "mid", "late")[part] in chosen


def plan(model: nn.Module, config: AdapterConfig) -> list[Target]:
    """The adapter plan for `model` (classifier already removed).

    Raises:
        ValueError: a placement that needs `feature_info` on a model without it, an override that
            does not apply to its layer, or (with `strict=True`) a parameterised layer no rule covers.
    """
    stages = config.stages
    index = None
    if any(s in ("early", "mid", "late") for s in stages):
        index = stage_index(model)
        if index is None:
            raise ValueError(
                f"placement={config.placement!r} needs timm's feature_info to find the stages, and "
                f"{type(model).__name__} has none; use placement='all' with overrides instead"
            )
        n_stages = len(model.feature_info)

    targets: list[Target] = []
    uncovered: list[str] = []
    for name, module in model.named_modules():
        if not name:
            has_own = any(True for _ in module.parameters(recurse=False))
            if has_own:
                uncovered.append(f"{type(module).__name__} (root parameters)")
            continue
        if any(name.startswith(t.name + ".") for t in targets):
            continue  # inside a module that is already wrapped
        rule = next((r for p, r in config.overrides.items() if fnmatch.fnmatchcase(name, p)), None)
        forced = rule is not None
        if forced:
            _check_override(name, module, rule)
        else:
            rule = default_rule(module, config)
        if rule is None:
            if any(True for _ in module.parameters(recurse=False)):
                uncovered.append(f"{name} ({type(module).__name__})")
            continue
        if rule in ("frozen", "skip"):
            continue
        if rule in ADAPTER_RULES and not forced and index is not None:
            part = min(2, index[name] * 3 // n_stages)
            if not _in_placement(part, stages):
                continue
        targets.append(Target(name, rule, type(module).__name__))

    if "half" in stages:
        targets = _every_second_per_block(targets, config)
    if uncovered:
        msg = "no adapter rule covers these layers; they stay frozen and shared: " + ", ".join(uncovered)
        if config.strict:
            raise ValueError(msg + " (strict=True; add overrides or set strict=False)")
        logger.info(msg)
    return targets


def _every_second_per_block(targets: list[Target], config: AdapterConfig) -> list[Target]:
    """Keep every second adapter of each block (its parent module): the paper's 'half' placement."""
    seen: dict[str, int] = {}
    kept = []
    for t in targets:
        if t.rule not in ADAPTER_RULES or t.name in config.overrides:
            kept.append(t)
            continue
        parent = t.name.rpartition(".")[0]
        i = seen.get(parent, 0)
        seen[parent] = i + 1
        if i % 2 == 1:
            kept.append(t)
    return kept
