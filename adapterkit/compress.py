"""The shared basis on a live model: the paper's joint compression, the incremental append-only basis,
and explicit global re-factorisation (the maths is in `basis.py`).

Every dense adapter (parallel/series k x k, low-rank 1x1 and linear) of a domain can be written
`beta[:, :k_t] @ gamma_t^T` with the layer's shared `beta`. Grouped/depthwise adapters stay full.

- `append_domain`: after training a new domain, move what it needs into the shared basis by appending
  columns. Old domains read only their prefix, so their outputs stay bit-identical.
- `refactorize`: joint SVD over all domains (the paper's compression); reports each domain's
  reconstruction error and, given an `evaluate` function, its accuracy change; replaces the basis
  only with `apply=True`. `compress` is the same with `apply=True`.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from .basis import extend_basis, joint_compress
from .layers import DomainLayer, LowRankAdapter

if TYPE_CHECKING:
    from .model import AdapterModel

FACTORABLE = ("parallel", "series", "lowrank")
Evaluate = Callable[["AdapterModel", str], float]


def factorable_layers(model: AdapterModel) -> dict[str, DomainLayer]:
    """The adapted layers whose adapters can share a basis (not grouped/depthwise, not norms)."""
    return {n: m for n, m in model.layers().items() if m.rule in FACTORABLE}


def _prefix_adapter(layer: DomainLayer, gamma: torch.Tensor) -> LowRankAdapter:
    """A domain adapter that reads the first `gamma.shape[1]` columns of the shared basis only."""
    adapter = layer.new_adapter(factored=True, own_columns=0, shared_columns=gamma.shape[1])
    with torch.no_grad():
        adapter.gamma.copy_(gamma)
    return adapter


@dataclass
class BasisReport:
    """What a basis operation did: per-layer ranks and errors, per-domain errors and accuracy change.

    `errors[layer][domain]` is the relative Frobenius error of the domain's new adapter against its
    old one; `domain_errors[domain]` the mean over layers. `exact`: nothing was projected (every
    direction kept; outputs unchanged up to float round-off), true for an `append_domain` without a
    budget and for a re-factorisation only at `energy=1.0`.
    """

    ranks: dict[str, int]
    errors: dict[str, dict[str, float]]
    domain_errors: dict[str, float]
    accuracy_before: dict[str, float] = field(default_factory=dict)
    accuracy_after: dict[str, float] = field(default_factory=dict)
    parameters: dict[str, Any] = field(default_factory=dict)
    applied: bool = False
    exact: bool = True

    @property
    def accuracy_change(self) -> dict[str, float]:
        return {d: self.accuracy_after[d] - self.accuracy_before[d] for d in self.accuracy_after}


def _domain_means(errors: dict[str, dict[str, float]]) -> dict[str, float]:
    per_domain: dict[str, list[float]] = {}
    for layer_errors in errors.values():
        for d, e in layer_errors.items():
            per_domain.setdefault(d, []).append(e)
    return {d: sum(v) / len(v) for d, v in per_domain.items()}


def column_budget(layer: DomainLayer, new_columns: int | float | None = None) -> int:
    """Own basis columns a new factored domain gets at `layer`: rank, not count, sets the limit.

    The budget (an int, a float share of C = min(C_out, C_in), or None for the layer's adapter rank) is
    capped by C_in (a domain's own part, `beta_own @ gamma_own^T`, has rank at most C_in: columns beyond
    it would add nothing) and by the room left in the basis (C_out - K). A 3-channel stem gets 3 columns
    at most, so every column a domain hands over with `append_domain` adds a direction.

    Example:
        >>> from adapterkit import AdapterModel
        >>> model = AdapterModel.from_backbone("test_resnet")
        >>> column_budget(model.layers()["conv1"], 8)  # the stem: 3 input channels
        3
    """
    c_out, k = layer.beta.shape
    c_in = adapter_inputs(layer)
    if new_columns is None:
        budget = layer.rank
    elif isinstance(new_columns, bool) or not isinstance(new_columns, (int, float)):
        raise ValueError(f"new_columns={new_columns!r}: pass an int >= 0 or a float share of C in (0, 1]")
    elif isinstance(new_columns, float):
        if not 0.0 < new_columns <= 1.0:
            raise ValueError(f"float new_columns={new_columns!r} must be a share of C in (0, 1]")
        budget = math.ceil(new_columns * min(c_out, c_in) - 1e-9)
    elif new_columns < 0:
        raise ValueError(f"new_columns={new_columns} is negative; pass an int >= 0 or a float share")
    else:
        budget = new_columns
    return max(0, min(budget, c_in, c_out - k))


def adapter_inputs(layer: DomainLayer) -> int:
    """C_in of a dense adapter at `layer` (a series adapter reads the conv's output)."""
    base = layer.base_layer
    if hasattr(base, "in_features"):
        return base.in_features
    return base.out_channels if layer.rule == "series" else base.in_channels


def _hand_over(adapter: LowRankAdapter, beta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """A factored domain's own columns appended as they are, bit-exact; None if some add no direction.

    Each column is scaled by a power of two to a norm in [0.5, 1) and its `gamma` column by the inverse:
    exact in floating point, so the domain's output does not change by a bit, and a later domain training
    its `gamma` against these columns sees no badly scaled direction.
    """
    own, k = adapter.beta_own.detach(), beta.shape[1]
    if adapter.shared_columns != k or k + own.shape[1] > beta.shape[0]:
        return None
    if extend_basis(beta.detach(), own, energy=1.0).residual_rank < own.shape[1]:
        return None  # a column in the span of the basis or of the others: re-express instead
    _, exponent = torch.frexp(torch.linalg.vector_norm(own, dim=0))
    gamma = adapter.gamma.detach().clone()
    gamma[:, k:] = torch.ldexp(gamma[:, k:], exponent)
    return torch.cat([beta, torch.ldexp(own, -exponent)], dim=1), gamma


# Over 60 lines with its docstring; the steps are one exact hand-over or one extension per layer.
@torch.no_grad()
def append_domain(
    model: AdapterModel, domain: str, *, new_columns: int | float | None = None, energy: float | None = None
) -> BasisReport:
    """Share a trained domain's adapters through the basis, appending columns; old domains unchanged.

    Without a budget the append is exact or refused. A domain trained in factored form on the whole
    current basis (`train_domain(..., factored=True)`) hands its own columns over as they are (its output
    unchanged, bit for bit); any other adapter (a full one, or own columns that add no direction) is
    re-expressed on the basis plus every direction of its residual (its output unchanged up to float
    round-off). If a layer has no room for those directions, `ValueError` names the layers and nothing
    changes. A budget, `new_columns` (most columns appended per layer: an int, or a share of C) or
    `energy` (share of the residual's energy), is the explicit opt-in to a projection: the report's
    `errors` and `domain_errors` give its price, and `exact` says whether any was paid.

    Returns:
        per-layer basis width and the domain's reconstruction error per layer.
    """
    model.domain_info(domain)
    exact_only = new_columns is None and energy is None
    basis: dict[str, torch.Tensor] = {}
    adapters: dict[str, LowRankAdapter] = {}
    errors: dict[str, dict[str, float]] = {}
    short, exact = [], True
    for name, layer in factorable_layers(model).items():
        adapter, beta = layer.adapters[domain], layer.beta
        own = adapter.beta_own if isinstance(adapter, LowRankAdapter) else None
        if own is not None and own.shape[1] == 0:
            continue  # already expressed on the shared basis
        handed = _hand_over(adapter, beta) if own is not None and exact_only else None
        if handed is not None:
            (basis[name], gamma), err = handed, 0.0
        else:
            budget = {"energy": 1.0} if exact_only else {"new_columns": new_columns, "energy": energy}
            ext = extend_basis(beta, adapter.weight(beta).detach(), **budget)
            if not ext.exact:
                exact = False
                short.append(
                    f"{name} (needs {ext.residual_rank} columns, room for {beta.shape[0] - beta.shape[1]})"
                )
            basis[name] = torch.cat([beta, ext.new_columns], dim=1)
            gamma, err = ext.gamma, ext.error
        adapters[name] = _prefix_adapter(layer, gamma)
        errors[name] = {domain: err}
    if exact_only and short:
        raise ValueError(
            f"append_domain({domain!r}) cannot be exact: the basis has no room left at {', '.join(short[:3])}"
            f"{f' and {len(short) - 3} more layers' if len(short) > 3 else ''}. Nothing was changed. Pass "
            "new_columns= or energy= to accept a projection there (the report gives its error), or "
            "refactorize the family"
        )
    record = {"op": "append", "domain": domain, "new_columns": new_columns, "energy": energy}
    model.extend_basis(basis, adapters={domain: adapters}, history=model.basis_history + [record])
    ranks = {n: m.beta.shape[1] for n, m in factorable_layers(model).items()}
    report = BasisReport(ranks, errors, _domain_means(errors), parameters=parameter_report(model))
    report.applied, report.exact = True, exact
    return report


@torch.no_grad()
def _joint_factors(model: AdapterModel, domains: list[str], basis_rank, energy) -> tuple[dict, dict, dict]:
    """Per layer: the new basis, each domain's gamma, each domain's error."""
    bases, gammas, errors = {}, {}, {}
    for name, layer in factorable_layers(model).items():
        alphas = [layer.adapters[d].weight(layer.beta).detach() for d in domains]
        jb = joint_compress(alphas, basis_rank=basis_rank, energy=energy)
        bases[name] = jb.beta
        gammas[name] = dict(zip(domains, jb.gammas, strict=True))
        errors[name] = dict(zip(domains, jb.errors, strict=True))
    return bases, gammas, errors


def _install(model: AdapterModel, bases: dict, gammas: dict, record: dict[str, Any]) -> None:
    layers = model.layers()
    adapters: dict[str, dict[str, LowRankAdapter]] = {}
    for name, per_domain in gammas.items():
        for d, g in per_domain.items():
            adapters.setdefault(d, {})[name] = _prefix_adapter(layers[name], g)
    model.replace_basis(bases, adapters, history=[record])


def refactorize(
    model: AdapterModel,
    *,
    basis_rank: int | float | None = None,
    energy: float | None = None,
    evaluate: Evaluate | None = None,
    apply: bool = False,
) -> BasisReport:
    """Joint SVD of every domain's adapters per layer (the paper's compression, §3.4).

    Args:
        basis_rank: basis width K per layer: an int, or a float share of C (0.5 gives the paper's K = C/2).
        energy: keep this share of the stacked adapters' energy instead.
        evaluate: `evaluate(model, domain) -> accuracy`; when given, each domain's accuracy is measured
            before and after (on a copy when `apply=False`).
        apply: replace the model's basis and every domain's adapters. This changes old domains'
            outputs (by the reported errors), so it is never done implicitly.
    """
    domains = model.domains
    if not domains:
        raise ValueError("the model has no domains to factorise; add and train some first")
    bases, gammas, errors = _joint_factors(model, domains, basis_rank, energy)
    before = {d: evaluate(model, d) for d in domains} if evaluate else {}
    target = model if apply else copy.deepcopy(model) if evaluate else None
    if target is not None:
        _install(target, bases, gammas, {"op": "refactorize", "basis_rank": basis_rank, "energy": energy})
    after = {d: evaluate(target, d) for d in domains} if evaluate else {}
    ranks = {n: b.shape[1] for n, b in bases.items()}
    params = parameter_report(target) if target is not None else {}
    report = BasisReport(ranks, errors, _domain_means(errors), before, after, params, applied=apply)
    report.exact = energy == 1.0
    return report


def compress(
    model: AdapterModel,
    *,
    basis_rank: int | float | None = None,
    energy: float | None = None,
    evaluate: Evaluate | None = None,
) -> BasisReport:
    """`refactorize(..., apply=True)`: compress all domains onto a shared basis of rank K (the paper's
    joint compression; `basis_rank=0.5` gives K = C/2)."""
    return refactorize(model, basis_rank=basis_rank, energy=energy, evaluate=evaluate, apply=True)


def parameter_report(model: AdapterModel) -> dict[str, Any]:
    """Parameters the way the paper reports them: the family's total relative to one backbone.

    `relative` = (backbone + shared basis + every domain's own tensors) / backbone, e.g. "2x" for ten
    domains with full adapters, lower once compressed.
    """
    backbone = model.backbone_parameter_count()
    basis = sum(b.numel() for b in model.basis().values())
    domains = {d: model.domain_cost(d)["parameters"] for d in model.domains}
    total = backbone + basis + sum(domains.values())
    return {
        "backbone": backbone,
        "basis": basis,
        "domains": domains,
        "total": total,
        "relative": total / backbone,
    }
