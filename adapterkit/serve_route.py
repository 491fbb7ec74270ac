"""Routing in the inference service: images whose request names no domain (issue 16).

An image with no `domain` (or `"domain": "auto"`) is decoded once in the worker pool and preprocessed
once per distinct data config among the loaded domains (usually one). A domain's signature was fitted on
its own images preprocessed with its own config (`train_domain`), so each domain is scored on the image
as preprocessed with that config: in the batch worker, one pass of the plain frozen backbone's early
stages per distinct config (`router.style_features`), every signature's score, then one decision over
all domains (`router.decide`: best domain, confidence). The image then joins the batch's mixed-domain
forward with its best domain's tensor, and after it is unknown when its open score is below that domain's
`open_threshold` (`router.open_decisions`); a signature without the open-set calibration (fitted before
it) decides before the forward, by its threshold, and its unknown images skip the forward. With a single
config this is exactly `model.route(x, classify=True)`.

A routed image's answer carries `"routed": true`, `"unknown": false`, the routing `"confidence"` (how
typical the image is of the chosen domain: `signature.typicality`; null for a signature fitted before the
score quantiles) and `"margin"` (best minus second-best score; null with one domain) next to the usual
fields. An image that fits no loaded domain is answered (status 200) without a class:
`{"domain": null, "routed": true, "unknown": true, "nearest": <best-scoring domain>, "confidence": ...}`.
A routed image whose domain was removed between routing and the forward is answered alone with
`{"domain": null, "routed": true, "error": {"code": "domains_changed", "message": ...}}` (send it again);
the request's other images are answered as usual.
A loaded domain without a signature makes routing refuse (409 `no_signature`, naming the fix); requests
that name their domains are served as before. Images are routed among the domains loaded when their batch
runs; a domain hot-added meanwhile with a data config no other loaded domain has is left out of the
routing of the images that were already preprocessed.
"""

from __future__ import annotations

import dataclasses
import json
import math
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from .router import decide, feature_maps, open_decisions, style_features, unreadable
from .serve_errors import ServeError
from .serve_images import decode_image
from .serve_predict import prediction
from .serve_schema import AUTO

if TYPE_CHECKING:
    from .model import AdapterModel
    from .serve_batching import Item
    from .serve_domains import Domains
    from .serve_images import Preprocessors

__all__ = ["AUTO", "ImageError", "Router", "Routed", "answer", "metric_labels", "no_signature"]


@dataclass
class Routed:
    """Where routing sent one image: `domain` (None: unknown), the `nearest` domain, the confidence
    (`Route.confidence`, None where it is NaN) and margin (None where not finite), the chosen domain's
    labels (read while it was certainly loaded), the data config of its tensor, and whether the unknown
    decision waits for the domain's logits (its signature has the open-set calibration)."""

    domain: str | None
    nearest: str
    confidence: float | None
    labels: list[str] | None = None
    key: str | None = None
    score: float = -math.inf  # the nearest domain's signature score
    pending: bool = False  # runs through `nearest`, known or not once its logits are in (open_decisions)
    margin: float | None = None


@dataclass
class ImageError:
    """One image's error, answered in its row (`{"error": {"code", "message"}}`) while the request's
    other images are answered as usual."""

    code: str
    message: str


def finite(value: float) -> float | None:
    """`value`, or None (JSON null) where it is NaN or infinite."""
    return value if math.isfinite(value) else None


def no_signature(missing: list[str]) -> ServeError:
    if not missing:  # no domain loaded at all
        return ServeError(
            503,
            "not_ready",
            "no domain is loaded, so no image can be routed; hot-add one with POST /v1/domains",
        )
    return ServeError(
        409,
        "no_signature",
        f"images without a domain are routed by every loaded domain's signature, and {missing} have none "
        "(trained before signatures existed, or added without training): name each image's domain, or fit "
        "the signatures (model.fit_signature(domain, batches); train_domain records one), save the family "
        "and load it again (or hot-add those domains again)",
        missing=missing,
    )


def signature_mismatch(wrong: list[str]) -> ServeError:
    return ServeError(
        409,
        "signature_mismatch",
        f"the signatures of {wrong} were fitted on other features (another backbone or adapterkit version, "
        "or different `maps`), so images cannot be routed: name each image's domain, or refit them with "
        "model.fit_signature",
        missing=wrong,
    )


class Router:
    """Routes the images of a batch that name no domain, then runs the batch (`Domains.run`)."""

    def __init__(self, model: AdapterModel, preprocessors: Preprocessors, domains: Domains) -> None:
        self.model, self.preprocessors, self.domains = model, preprocessors, domains
        self._groups: tuple[tuple, dict[str, list[str]]] = ((), {})
        self._lock = threading.Lock()

    def check(self) -> None:
        """409 now, before any image is decoded, when routing cannot run."""
        missing = [d for d in self.model.domains if d not in self.model.signatures]
        if missing or not self.model.domains:
            raise no_signature(missing)

    def groups(self) -> dict[str, list[str]]:
        """The loaded domains by data config (its JSON, resolved against the backbone's)."""
        from .transforms import resolve_data_config

        infos = []
        for d in self.model.domains:
            try:
                infos.append((d, self.model.domain_info(d).data_config))
            except KeyError:  # removed while we looked
                continue
        key = tuple((d, json.dumps(c, sort_keys=True, default=str)) for d, c in infos)
        cached_key, groups = self._groups
        if cached_key != key:
            groups = {}
            for d, config in infos:
                resolved = resolve_data_config(self.model.pretrained_cfg, config)
                groups.setdefault(json.dumps(resolved, sort_keys=True, default=str), []).append(d)
            with self._lock:
                self._groups = (key, groups)
        return groups

    def views(self, data: bytes, what: str, max_pixels: int) -> dict[str, torch.Tensor]:
        """Decode `data` once; its tensor for each distinct data config (runs in the worker pool)."""
        image = decode_image(data, what, max_pixels)
        out = {}
        for key, members in self.groups().items():
            try:
                preprocess = self.preprocessors.get(members[0])
            except KeyError:  # unloaded meanwhile
                continue
            try:
                out[key] = preprocess(image)
            except ValueError as e:  # a mode the backbone cannot take
                raise ServeError(422, "unsupported_image", f"{what}: {e}") from e
        return out

    # ------------------------------------------------------------------ in the batch worker
    def run(self, items: list[Item]) -> list[Any]:
        """Route the batch's images that name no domain, then one forward for the others and the routed
        ones; per item its logits row, None for an unknown image (its `routed` says so), or a ServeError."""
        results: list[Any] = [None] * len(items)
        auto = [i for i, item in enumerate(items) if item.views is not None and item.routed is None]
        if auto:
            with self.domains.forward_lock:  # no removal halfway through scoring
                decisions = self._route([items[i] for i in auto])
            for i, decision in zip(auto, decisions, strict=True):
                if isinstance(decision, ServeError):
                    results[i] = decision
                    continue
                items[i].routed = decision
                if decision.domain is not None and decision.key is not None:
                    items[i].domain, items[i].x = decision.domain, items[i].views[decision.key]
        run = [i for i, item in enumerate(items) if results[i] is None and item.x is not None]
        for i, result in zip(run, self.domains.run([items[i] for i in run]), strict=True):
            if items[i].routed is not None and isinstance(result, ServeError):
                result = ImageError(  # its domain was unloaded between routing and the forward: this
                    "domains_changed",  # image alone is answered so, the request's others as usual
                    f"domain {items[i].domain!r} was unloaded while the image was being routed; send the "
                    "image again to route it among the domains loaded now",
                )
            results[i] = result
        self._decide_open([(items[i], results[i]) for i in run if isinstance(results[i], torch.Tensor)])
        return results

    def _decide_open(self, done: list[tuple[Item, torch.Tensor]]) -> None:
        """After the forward: an image whose decision was pending becomes unknown when its open score is
        below its domain's `open_threshold` (`router.open_decisions`)."""
        with self.domains.forward_lock:  # no removal between reading a signature and deciding
            signatures = self.model.signatures
            pending = [(item, row) for item, row in done if item.routed and item.routed.pending]
            pending = [(item, row) for item, row in pending if item.domain in signatures]
            if not pending:
                return
            chosen = [signatures[item.domain] for item, _ in pending]
            best = torch.tensor([item.routed.score for item, _ in pending])
            width = max(row.shape[0] for _, row in pending)
            pad = [F.pad(row, (0, width - row.shape[0]), value=-math.inf) for _, row in pending]
            known = open_decisions(best, torch.stack(pad), chosen)[0]
        for (item, _), fits in zip(pending, known, strict=True):
            if fits is False:  # (None: a domain re-added meanwhile without the calibration keeps it)
                item.routed = dataclasses.replace(item.routed, domain=None, labels=None)

    def _route(self, items: list[Item]) -> list[Any]:
        names = list(self.model.domains)
        missing = [d for d in names if d not in self.model.signatures]
        if missing or not names:
            return [no_signature(missing)] * len(items)
        signatures = {d: self.model.signatures[d] for d in names}
        try:
            maps = feature_maps(signatures)
        except ValueError:
            return [signature_mismatch(names)] * len(items)
        scores = torch.full((len(items), len(names)), -math.inf)
        keys = {}
        for key, members in self.groups().items():
            rows = [j for j, item in enumerate(items) if key in item.views]
            members = [d for d in members if d in signatures]
            if not rows or not members:
                continue
            x = torch.stack([items[j].views[key] for j in rows]).to(self.domains.device)
            with torch.inference_mode():
                features = style_features(self.model.backbone, x, maps)
                wrong = unreadable({d: signatures[d] for d in members}, features.shape[1])
                if wrong:
                    return [signature_mismatch(wrong)] * len(items)
                for d in members:
                    scores[rows, names.index(d)] = signatures[d].score(features).float().cpu()
                    keys[d] = key
        route = decide(scores, signatures)
        best = scores.max(dim=1).values.tolist()
        scored = torch.isfinite(scores).any(dim=1).tolist()
        out = []
        for j, (chosen, ok) in enumerate(zip(route.domains, scored, strict=True)):
            nearest = route.best[j]
            pending = ok and signatures[nearest].open_threshold is not None
            chosen = nearest if pending else chosen if ok else None
            labels = self.model.domain_info(chosen).labels if chosen is not None else None
            confidence, margin = finite(float(route.confidence[j])), finite(float(route.margin[j]))
            out.append(
                Routed(chosen, nearest, confidence, labels, keys.get(chosen), best[j], pending, margin)
            )
        return out


def answer(item: Item, row: Any, labels: list[str] | None, top_k: int, return_logits: bool) -> dict:
    """One image's answer: `prediction`, plus where routing sent it when the request named no domain."""
    routed: Routed | None = item.routed
    if routed is None:
        return prediction(item.domain, row, labels, top_k, return_logits)
    if isinstance(row, ImageError):
        return {"domain": None, "routed": True, "error": {"code": row.code, "message": row.message}}
    how = {"routed": True, "confidence": routed.confidence, "margin": routed.margin}
    if routed.domain is None:
        return {"domain": None, **how, "unknown": True, "nearest": routed.nearest}
    out = prediction(routed.domain, row, routed.labels, top_k, return_logits)
    return {**out, **how, "unknown": False}


def metric_labels(domains: list[str], predictions: list[dict] | None, loaded: set[str]) -> list[str]:
    """The `domain` label of each image of a request (`domains`: as the request named them) in the
    predictions metrics: a routed image answered counts under the domain it was routed to (`_unknown`
    when it fits none, `auto` when routing did not answer it), a domain no longer loaded under `_other`,
    so the labels stay within the loaded domains."""
    out = []
    for i, d in enumerate(domains):
        if d == AUTO and predictions is not None:
            p = predictions[i]
            d = p["domain"] or ("_unknown" if p.get("unknown") else AUTO)
        out.append(d if d in loaded or d in (AUTO, "_unknown") else "_other")
    return out
