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
    old one; `domain_errors[domain]` the mean over layers.
    """

    ranks: dict[str, int]
    errors: dict[str, dict[str, float]]
    domain_errors: dict[str, float]
    accuracy_before: dict[str, float] = field(default_factory=dict)
    accuracy_after: dict[str, float] = field(default_factory=dict)
    parameters: dict[str, Any] = field(default_factory=dict)
    applied: bool = False

    @property
    def accuracy_change(self) -> dict[str, float]:
        return {d: self.accuracy_after[d] - self.accuracy_before[d] for d in self.accuracy_after}


def _domain_means(errors: dict[str, dict[str, float]]) -> dict[str, float]:
    per_domain: dict[str, list[float]] = {}
    for layer_errors in errors.values():
        for d, e in layer_errors.items():
            per_domain.setdefault(d, []).append(e)
    return {d: sum(v) / len(v) for d, v in per_domain.items()}


@torch.no_grad()
def append_domain(
    model: AdapterModel, domain: str, *, new_columns: int | float | None = None, energy: float | None = None
) -> BasisReport:
    """Share a trained domain's adapters through the basis, appending columns; old domains unchanged.

    A domain trained in factored form on the whole current basis (`add_domain(factored=True)`) hands
    its own columns over exactly when no budget is given. Otherwise (a full adapter, or a budget)
    its adapter is projected on the basis and the residual's leading directions are appended under the
    `new_columns` (most columns appended per layer: an int, or a share of C) or `energy` (share of the
    residual) budget; default energy 0.95.

    Returns:
        per-layer basis width and the domain's reconstruction error per layer.
    """
    model.domain_info(domain)
    exact_ok = new_columns is None and energy is None
    if exact_ok:
        energy = 0.95
    basis: dict[str, torch.Tensor] = {}
    adapters: dict[str, LowRankAdapter] = {}
    errors: dict[str, dict[str, float]] = {}
    for name, layer in factorable_layers(model).items():
        adapter, beta = layer.adapters[domain], layer.beta
        c_out, width = beta.shape
        own = adapter.beta_own if isinstance(adapter, LowRankAdapter) else None
        if own is not None and own.shape[1] == 0:
            continue  # already expressed on the shared basis
        if exact_ok and own is not None and adapter.shared_columns == width and width + own.shape[1] <= c_out:
            basis[name] = torch.cat([beta, own.detach()], dim=1)
            gamma, err = adapter.gamma.detach().clone(), 0.0
        else:
            ext = extend_basis(beta, adapter.weight(beta).detach(), new_columns=new_columns, energy=energy)
            basis[name] = torch.cat([beta, ext.new_columns], dim=1)
            gamma, err = ext.gamma, ext.error
        adapters[name] = _prefix_adapter(layer, gamma)
        errors[name] = {domain: err}
    record = {"op": "append", "domain": domain, "new_columns": new_columns, "energy": energy}
    model.extend_basis(basis, adapters={domain: adapters}, history=model.basis_history + [record])
    ranks = {n: m.beta.shape[1] for n, m in factorable_layers(model).items()}
    return BasisReport(ranks, errors, _domain_means(errors), parameters=parameter_report(model), applied=True)


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
    return BasisReport(ranks, errors, _domain_means(errors), before, after, params, applied=apply)


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
