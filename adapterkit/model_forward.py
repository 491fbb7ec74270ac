"""`AdapterModel`'s forward pass and routing: how a call's domain (one, one per sample, or `"auto"`)
reaches the layers, and the domain signatures `"auto"` routes by.

A mixin of `AdapterModel` (model.py), split out for size; it only reads the domain table, under the
model's lock where a call must see one set of domains, and writes nothing but a domain's signature
(`fit_signature`). Mixed batches: `mixed.py`; the routing maths: `router.py`.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager

import torch

from .layers.gathered import Mixed
from .mixed import padded_rows
from .router import Route, fit_signature, route_batch
from .signature import COMPONENTS, SIGNATURE_SHARE, DomainSignature
from .transforms import check_batch


class ForwardMixin:
    """`forward`, `use_domain`, `fit_signature` and `route` of `AdapterModel` (see its docstring)."""

    @contextmanager
    def use_domain(self, name: str) -> Iterator[None]:
        """Route calls of the backbone made inside the block through `name`, e.g. for features:
        `with model.use_domain("gtsrb"): feats = model.backbone.forward_features(x)`."""
        with self.router.use(self._check_known(name)):
            yield

    # ----------------------------------------------------------------- routing (router.py)
    def fit_signature(
        self,
        domain: str,
        batches: Iterable[torch.Tensor],
        budget: float | None = SIGNATURE_SHARE,
        components: int = COMPONENTS,
        maps: int | None = None,
        calibration: Iterable[torch.Tensor] | None = None,
    ) -> DomainSignature:
        """Record `domain`'s signature from batches of its (preprocessed) images; other domains' stay
        as they are. `train_domain` does this on the training images; use it for domains you train
        yourself or loaded without one. The domain runs over the same images too: its head's energies
        calibrate the unknown decision of `route(x, classify=True)` (router.py). `budget`: the
        signature's bytes at most, as a share of the domain's adapter bytes (it keeps as many of the
        `components` mixture components as fit, at least one; the default share at least
        `signature.MIN_COMPONENTS`); None: no cap. `maps`: the backbone's
        first feature maps the signature reads (`router.style_features`; 0: every stage's but the last);
        every domain's must agree, so None reads what the other domains' signatures read (0 when there
        are none). `calibration`: batches of the domain's images it did not train on (a validation
        split); the unknown decision is calibrated on them (`train_domain` passes its `eval_data`)."""
        self._check_known(domain)
        signature = fit_signature(self, domain, batches, budget, components, maps, calibration)
        with self._lock:
            self._check_known(domain)
            self.signatures[domain] = signature
        return signature

    def route(self, x: torch.Tensor, *, classify: bool = False) -> Route:
        """The domain of each sample (None: unknown), its confidence and every domain's score.

        By the signatures alone, before any domain runs; with `classify=True` each sample then runs
        through its best domain (one mixed batch, as `domain="auto"`), `logits` holds the result, and a
        sample is unknown when its open score (signature score, and where the image sits among its
        domain's own images by that score and by the domain's head energy) is below the domain's
        calibrated threshold: this catches more images of unknown domains (docs/routing.md)."""
        return route_batch(self, x, classify)

    # ----------------------------------------------------------------- forward
    def forward(self, x: torch.Tensor, domain: str | Sequence[str] | None = None) -> torch.Tensor:
        """Logits of `x` for one domain, one domain per sample, or `"auto"`.

        With a list of domains in eval mode the frozen layers run once over the batch and each sample's
        adapters, norms and head are gathered (`mixed_execution = "gathered"`, equal to running each
        domain alone to float rounding). With `"grouped"`, in training mode, or for a backbone whose
        modules read a layer's weight themselves, each domain's group runs exactly as it would alone.
        `"auto"` (the default) groups a batch whose domains have 8 images each on average, or at most 4
        domains with 4 each (2 each on a compute-bound model on CPU: `mixed.py`; fused weights, each pass a
        fair batch), and gathers the rest. Heads of
        different sizes are padded with `-inf`, so softmax, argmax and cross-entropy stay correct per
        sample. `domain="auto"` sends each sample to its best-scoring domain (`route(x)` also says which
        samples fit no domain, and how confident each choice is).
        """
        check_batch(x, self.in_chans)
        try:
            return self._forward(x, domain)
        except RuntimeError as e:
            weight = next(self.backbone.parameters())
            if x.dtype != weight.dtype:
                raise ValueError(
                    f"the images are {x.dtype} and the model is {weight.dtype}: pass x.to({weight.dtype}) "
                    f"(or run under torch.autocast)"
                ) from e
            if x.device != weight.device:
                raise ValueError(
                    f"the images are on {x.device} and the model on {weight.device}: pass x.to({str(weight.device)!r})"
                ) from e
            raise

    def _forward(self, x: torch.Tensor, domain: str | Sequence[str] | None) -> torch.Tensor:
        if domain == "auto":
            with self._lock:  # routed and run on one set of domains: a removal meanwhile waits
                return self._forward(x, self.route(x).best)
        domains = self._resolve_domains(domain, x.shape[0])
        if isinstance(domains, str):
            return self._forward_one(x, domains)
        mixed = Mixed.of(domains, x.device)
        width = max(self._domains[d].num_classes for d in mixed.domains)
        if self._mixed.gathers(x, mixed, self.training):
            with self.router.use(mixed):
                features = self.backbone(x).flatten(1)
            return padded_rows(mixed, width, lambda d, rows: self.heads[d](features.index_select(0, rows)))
        return padded_rows(mixed, width, lambda d, rows: self._forward_one(x.index_select(0, rows), d))

    @property
    def mixed_execution(self) -> str:
        """How an eval-mode batch that mixes domains runs: `auto`, `gathered` or `grouped` (see `forward`)."""
        return self._mixed.mode

    @mixed_execution.setter
    def mixed_execution(self, value: str) -> None:
        self._mixed.mode = value

    def _resolve_domains(self, domain: str | Sequence[str] | None, batch: int) -> str | list[str]:
        """The call's domain (one name) or one per sample, each checked once."""
        domain = self.default_domain if domain is None else domain
        if domain is None:
            raise ValueError(
                "no domain given: pass domain='name' (or a list, one per sample) or call set_domain()"
            )
        if isinstance(domain, str):
            return self._check_known(domain)
        domain = list(domain)
        if not domain:
            raise ValueError("domain=[]: pass one domain per sample, or one name (an empty batch then runs)")
        if len(domain) != batch:
            raise ValueError(f"got {len(domain)} domains for a batch of {batch}; pass one per sample")
        unique = list(dict.fromkeys(domain))
        for d in unique:
            self._check_known(d)
        return unique[0] if len(unique) == 1 else domain

    def _forward_one(self, x: torch.Tensor, domain: str) -> torch.Tensor:
        head = self.heads[domain]
        with self.router.use(domain):  # (wrappers a plain tree keeps read the domain here)
            plain = None if self.training else self._plain.module(self.backbone, domain)
            features = (self.backbone if plain is None else plain)(x)
        return head(features.flatten(1))  # conv classifiers (DLA, ...) leave (N, C, 1, 1)
