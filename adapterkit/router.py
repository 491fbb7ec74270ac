"""Route an image to its domain when nobody says which, without forgetting (signatures: `signature.py`).

Routing costs one pass of the plain frozen backbone (the features every signature reads) plus O(F) per
domain: with the domain's own forward, at most 2 forwards per image whatever the number of domains.
The score of domain d is its signature's log-likelihood per feature; the chosen domain is the best
score, its confidence how typical that score is of the domain's own images (`signature.typicality`), its
margin how far ahead of the runner-up it is. Before any domain runs, a sample whose best score
is below that domain's threshold is unknown (None, `decide`); once it ran through its best domain, a
sample is unknown when its open score is below the domain's `open_threshold` (`decide_open`), which
also reads the domain's head: the decision `route(x, classify=True)` and the inference service make.
"""

from __future__ import annotations

import dataclasses
import json
import math
import warnings
import weakref
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from .signature import (
    MAX_IMAGES,
    MIN_COMPONENTS,
    SIGNATURE_SHARE,
    DomainSignature,
    open_scores,
    typicality,
    user_level,
)
from .transforms import check_batch, resolve_data_config

if TYPE_CHECKING:
    from .model import AdapterModel


@dataclass
class Route:
    """Where `AdapterModel.route` sends each sample.

    Attributes:
        domains: the chosen domain per sample, or None when the sample fits no known domain.
        best: the best-scoring domain per sample, even when it is unknown.
        confidence: how typical each sample is of its best domain (N,): the share of that domain's own
            held-out images whose signature score is at or below the sample's (about 0.5 for a typical
            image, under 0.01 for one stranger than 99 % of them; `signature.typicality`). NaN where the
            domain's signature predates the stored score quantiles (refit it with `model.fit_signature`).
        scores: per-domain scores (N x D), columns in `names` order.
        names: the domains that have a signature.
        margin: the best score minus the second best (N,; per feature, >= 0; inf with one domain): near 0,
            two domains fit the sample about equally.
        posterior: the best domain's posterior under equal priors (N,). The diagonal Gaussians count
            every feature as independent evidence, so it is 1.0 for nearly every sample, unknown ones
            included: read `confidence` or `margin` instead.
        logits: each sample's logits through its best domain, after `route(x, classify=True)`.
        open_scores: then each sample's open score (higher: more like its domain's own images; NaN where
            the signature has no open-set calibration): the per-domain `open_threshold` decides
            `domains`; ranked across domains, it is the unknown detector measured in docs/benchmarks.md.
    """

    domains: list[str | None]
    best: list[str]
    confidence: torch.Tensor
    scores: torch.Tensor
    names: list[str]
    logits: torch.Tensor | None = None
    open_scores: torch.Tensor | None = None
    margin: torch.Tensor | None = None
    posterior: torch.Tensor | None = None


def route(features: torch.Tensor, signatures: dict[str, DomainSignature]) -> Route:
    """Score `features` (N x F, `style_features` of `feature_maps(signatures)`) against every signature;
    see the module docstring."""
    names = list(signatures)
    wrong = unreadable(signatures, features.shape[1])
    if wrong:
        raise ValueError(
            f"the signatures of {wrong} were fitted on other features ({signatures[wrong[0]].num_features} vs "
            f"{features.shape[1]}): another backbone or adapterkit version; refit them with model.fit_signature"
        )
    scores = torch.stack([signatures[n].score(features) for n in names], dim=1)
    return decide(scores, signatures)


def feature_maps(signatures: dict[str, DomainSignature]) -> int:
    """The feature maps every signature reads (`maps` of `style_features`): one pass serves all of them,
    so they must agree."""
    maps = {name: int(s.maps) for name, s in signatures.items()}
    if len(set(maps.values())) > 1:
        raise ValueError(
            f"the signatures read different feature maps ({maps}; 0: every stage's but the last), so one "
            "pass cannot score them all: refit them with one `maps` (model.fit_signature(..., maps=))"
        )
    return next(iter(maps.values()), 0)


def check_maps(model: AdapterModel, domain: str, maps: int, fix: str) -> None:
    """Refuse a signature of `domain` that reads other feature maps (`maps`) than the other domains'
    signatures: one routing pass serves them all, so routing (and the inference service) could not use
    any of them. `fix` names the way out (`{others}`: the maps the others read)."""
    wrong = {d: int(s.maps) for d, s in model.signatures.items() if d != domain and int(s.maps) != maps}
    if wrong:
        others = "/".join(str(m) for m in sorted(set(wrong.values())))
        raise ValueError(
            f"the signature of {domain!r} reads maps={maps} and the signatures of {sorted(wrong)} read "
            f"maps={others} (0: every stage's but the last); one routing pass serves every domain, so they "
            "must agree: " + fix.format(others=others)
        )


def unreadable(signatures: dict[str, DomainSignature], width: int) -> list[str]:
    """The signatures that features `width` wide cannot score: fitted on other features (another
    backbone, or an adapterkit before the layout features of `style_features`: refit them)."""
    return [n for n, s in signatures.items() if s.num_features != width]


def decide(scores: torch.Tensor, signatures: dict[str, DomainSignature]) -> Route:
    """The route from per-domain scores (N x D, columns in `signatures` order; -inf for a domain not
    scored on a sample): the best domain, its confidence and margin, and None where the best score is
    below that domain's threshold. The inference service scores each domain on its own preprocessing and
    decides here (serve_route.py)."""
    names = list(signatures)
    num_features = next(iter(signatures.values())).num_features
    top, index = scores.max(dim=1)
    posterior = torch.softmax(scores * num_features, dim=1).gather(1, index[:, None])[:, 0]
    second = scores.topk(2, dim=1).values[:, 1] if len(names) > 1 else torch.full_like(top, -math.inf)
    thresholds = torch.stack([signatures[n].threshold for n in names]).to(scores.device)[index]
    best = [names[i] for i in index.tolist()]
    known = (top >= thresholds).tolist()
    return Route(
        [b if k else None for b, k in zip(best, known, strict=True)],
        best,
        typicality(top, [signatures[b] for b in best]),
        scores,
        names,
        margin=torch.where(torch.isfinite(top), top - second, math.nan),
        posterior=posterior.nan_to_num(0.0),  # a sample no domain could score
    )


def open_decisions(
    best: torch.Tensor, logits: torch.Tensor, chosen: list[DomainSignature]
) -> tuple[list[bool | None], torch.Tensor]:
    """Per sample (routed to the domain of `chosen[i]`, with signature score `best[i]` and that domain's
    `logits[i]`): whether its open score reaches the domain's `open_threshold` (known), or None where the
    signature has no open-set calibration (written before it); and the open scores (NaN there)."""
    known: list[bool | None] = [None] * len(chosen)
    scores = torch.full((len(chosen),), math.nan, device=logits.device)
    rows = [i for i, s in enumerate(chosen) if s.open_threshold is not None]
    if rows:
        index = torch.tensor(rows, device=logits.device)
        picked = [chosen[i] for i in rows]
        energy = logits.index_select(0, index).float().logsumexp(dim=1)  # (-inf padding adds nothing)
        scores[index] = open_scores(best.to(logits.device).index_select(0, index), energy, picked)
        thresholds = torch.stack([s.open_threshold.to(scores.device) for s in picked])
        for i, fits in zip(rows, (scores[index] >= thresholds).tolist(), strict=True):
            known[i] = fits
    return known, scores


def decide_open(route: Route, logits: torch.Tensor, signatures: dict[str, DomainSignature]) -> Route:
    """The route once each sample ran through its best domain (`logits`): a sample whose best domain
    carries the open-set calibration is unknown when its open score is below that domain's
    `open_threshold`; otherwise (signatures written before it) the signature threshold's decision stands."""
    best = route.scores.max(dim=1).values
    known, scores = open_decisions(best, logits, [signatures[name] for name in route.best])
    domains = [
        d if k is None else (b if k else None)
        for d, b, k in zip(route.domains, route.best, known, strict=True)
    ]
    return dataclasses.replace(route, domains=domains, logits=logits, open_scores=scores)


def style_features(backbone: nn.Module, x: torch.Tensor, maps: int = 0) -> torch.Tensor:
    """What signatures read: per channel, the spatial mean and log standard deviation of the stem's and
    every stage's output but the last (what tells a digit from a traffic sign is image statistics, which
    the early stages carry; on the real sequence dropping the last stage routed better, and the pass
    stops there: two thirds of a CIFAR ResNet's FLOPs, 0.82x of its time), then for each of those maps the
    mean of its central half minus its mean (layout: an object in the middle, or a texture everywhere;
    mean routing 0.956 -> 0.969 on the real sequence). `maps` > 0 reads the first `maps` of timm's
    `feature_info` maps instead (the stem is the first): a shorter pass, for larger images, where the
    early maps route as well (docs/routing.md). Backbones with one stage read it; backbones without
    timm's `forward_intermediates` give their pooled features only."""
    if not hasattr(backbone, "forward_intermediates"):
        return backbone(x).flatten(1).float()
    take = list(range(maps if maps > 0 else max(_feature_map_count(backbone) - 1, 1)))
    rows, centres = [], []
    for t in backbone.forward_intermediates(x, indices=take, stop_early=True, intermediates_only=True):
        t = t.float()
        flat = t.flatten(2) if t.dim() == 4 else t.transpose(1, 2)  # (N, C, positions)
        mean = flat.mean(dim=2)
        rows += [mean, (flat.std(dim=2, correction=0) + 1e-5).log()]
        if t.dim() == 4:  # tokens have no layout
            h, w = t.shape[2:]
            centres.append(t[:, :, h // 4 : h - h // 4, w // 4 : w - w // 4].mean(dim=(2, 3)) - mean)
    return torch.cat(rows + centres, dim=1)


def _feature_map_count(backbone: nn.Module) -> int:
    return len(getattr(backbone, "feature_info", ())) or 1


def collect_features(
    model: AdapterModel, batches: Iterable[torch.Tensor], limit: int = MAX_IMAGES, maps: int = 0
) -> torch.Tensor:
    """`style_features` (of `maps`) of the plain frozen backbone (no domain) for up to `limit` images, in
    eval mode."""
    return collect(model, batches, limit, maps)[0]


def collect(
    model: AdapterModel,
    batches: Iterable[torch.Tensor],
    limit: int = MAX_IMAGES,
    maps: int = 0,
    domain: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`collect_features`, and with `domain` also that domain's head energy (logsumexp of its logits) on
    the same images, in eval mode: what `DomainSignature.fit(..., energies=)` calibrates on."""
    count = _feature_map_count(model.backbone)
    if isinstance(maps, bool) or not isinstance(maps, int) or not 0 <= maps <= count:
        raise ValueError(f"maps={maps!r}: use 0 (the default) or 1-{count}, the backbone's feature maps")
    rows, energies, seen = [], [], 0
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for x in batches:
                x = x[: limit - seen]
                rows.append(style_features(model.backbone, x, maps))
                if domain is not None:
                    energies.append(model(x, domain=domain).float().logsumexp(dim=1))
                seen += rows[-1].shape[0]
                if seen >= limit:
                    break
    finally:
        model.train(was_training)
    if not rows:
        raise ValueError("no images to fit a signature on")
    return torch.cat(rows), torch.cat(energies) if energies else None


def fit_signature(
    model: AdapterModel,
    domain: str,
    batches: Iterable[torch.Tensor],
    budget: float | None,
    components: int,
    maps: int | None,
    calibration: Iterable[torch.Tensor] | None,
) -> DomainSignature:
    """`domain`'s signature from its images, for `AdapterModel.fit_signature` to store (see there)."""
    if maps is None:  # what the other domains' signatures read
        others = [s for d, s in model.signatures.items() if d != domain]
        maps = int(others[0].maps) if others else 0
    check_maps(
        model,
        domain,
        maps,
        f"fit it with maps={{others}} (or leave maps out), or switch every domain to maps={maps}: "
        f"model.signatures.clear(), then fit each with maps={maps}",
    )
    state = model.domain_state_dict(domain)
    nbytes = sum(t.numel() * t.element_size() for k, t in state.items() if not k.startswith("signature."))
    cap = None if budget is None else int(budget * nbytes)
    features, energies = collect(model, batches, maps=maps, domain=domain)
    held = None if calibration is None else collect(model, calibration, maps=maps, domain=domain)
    signature = DomainSignature.fit(
        features,
        components,
        max_bytes=cap,
        energies=energies,
        calibration=held,
        # the default budget's floor (small domains still get a mixture); a budget passed is kept to
        min_components=MIN_COMPONENTS if budget == SIGNATURE_SHARE else 1,
    )
    signature.maps.fill_(maps)
    return signature


def route_batch(model: AdapterModel, x: torch.Tensor, classify: bool) -> Route:
    """`AdapterModel.route`: the signatures' decision, or with `classify` the decision after each sample
    ran through its best domain (one mixed batch). It holds the model's lock throughout, so a domain
    removed or added by another thread meanwhile waits for it: the route reads one consistent set of
    domains."""
    with model._lock:
        names = [d for d in model.domains if d in model.signatures]
        missing = [d for d in model.domains if d not in model.signatures]
        if not names or missing:
            raise ValueError(
                f"routing needs a signature for every domain; {missing or 'all'} have none (trained before "
                "signatures existed, or added without training): call model.fit_signature(domain, batches)"
            )
        signatures = {n: model.signatures[n] for n in names}
        check_batch(x, model.in_chans)  # (as the forward says it: a 1-channel batch is not a conv's error)
        warn_configs(model, names)
        if x.shape[0] == 0:  # an empty batch: nothing to score or run
            empty = Route([], [], x.new_zeros(0), x.new_zeros(0, len(names)), names)
            empty = dataclasses.replace(empty, margin=x.new_zeros(0), posterior=x.new_zeros(0))
            if classify:
                return dataclasses.replace(empty, logits=x.new_zeros(0, 0), open_scores=x.new_zeros(0))
            return empty
        with torch.no_grad():
            routed = route(style_features(model.backbone, x, feature_maps(signatures)), signatures)
            return decide_open(routed, model(x, domain=routed.best), signatures) if classify else routed


_checked: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> the sets of configs checked


def warn_configs(model: AdapterModel, names: list[str]) -> None:
    """Warn once per set of configs when the domains' data configs (preprocessing) differ: `route(x)`
    scores every domain on the one tensor it is given, while each signature was fitted on its own
    domain's preprocessing (the service and `adapterkit predict` preprocess per domain). Each set of stored
    configs is checked once (route runs per call)."""
    stored = {n: model.domain_info(n).data_config for n in names}
    key = json.dumps(stored, sort_keys=True, default=str)
    checked = _checked.setdefault(model, set())
    if key in checked:
        return
    checked.add(key)
    configs = {n: resolve_data_config(model.pretrained_cfg, c) for n, c in stored.items()}
    keys = sorted({k for c in configs.values() for k in c})
    differ = [k for k in keys if len({json.dumps(c.get(k), default=str) for c in configs.values()}) > 1]
    if not differ:
        return
    what = "; ".join(f"{k}: " + ", ".join(f"{n} {configs[n].get(k)}" for n in names) for k in differ)
    warnings.warn(
        f"the domains' data configs differ ({what}), and route(x) scores every domain on the same tensor: "
        "a domain whose preprocessing x does not match scores lower than it should. Preprocess per domain "
        "and decide with adapterkit.router.decide, as the inference service does (docs/routing.md, "
        '"Preprocessing"), or use `adapterkit predict`',
        stacklevel=user_level(),
    )
