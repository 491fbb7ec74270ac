"""`AdapterModel`: one frozen timm backbone, many domains, each with its own adapters, norms and head.

Longer than our ~400-line rule on purpose: `AdapterModel` is the one owner of the domain table and of the
shared basis (docs/architecture.md), so every method that changes them lives here, behind one lock and
one set of checks; what only reads them lives in its own module (mixed batches: `mixed.py`; routing:
`router.py`; load, save, push, export: their stages).
"""

from __future__ import annotations

import copy
import logging
import threading
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import ModelHubMixin
from torch import nn

from .basis import check_extends
from .compress import FACTORABLE, column_budget
from .config import AdapterConfig, DomainInfo, check_domain_name, resolve_num_classes
from .inject import (
    adapted_layers,
    create_backbone,
    fingerprint,
    inject,
    input_channels,
    reparameterize,
    reset_head,
    weights_record,
)
from .layers import DomainLayer, DomainRouter
from .layers.gathered import Mixed
from .layers.plain import PlainPasses
from .layers.table import Packed
from .mixed import MixedExecution, padded_rows
from .router import Route, fit_signature, route_batch
from .signature import COMPONENTS, SIGNATURE_SHARE, DomainSignature
from .transforms import check_batch, resolve_data_config

logger = logging.getLogger(__name__)


class _Lock:
    """A re-entrant lock that a deep-copied model replaces with its own."""

    def __init__(self) -> None:
        self._lock = threading.RLock()

    def __enter__(self) -> None:
        self._lock.acquire()

    def __exit__(self, *exc: object) -> None:
        self._lock.release()

    def __deepcopy__(self, memo: dict) -> _Lock:
        return _Lock()


class AdapterModel(
    nn.Module,
    ModelHubMixin,
    library_name="adapterkit",
    tags=["adapterkit", "residual-adapters", "continual-learning"],
    repo_url="https://github.com/adapterkit/adapterkit",
):
    """A frozen backbone with per-domain parallel residual adapters, norms and heads.

    Build one with `AdapterModel.from_backbone("resnet50.a1_in1k")`, then `add_domain`, train the
    tensors from `trainable_parameters(domain)`, and call `model(x, domain="name")`.

    Example:
        >>> model = AdapterModel.from_backbone("test_resnet")
        >>> model.add_domain("digits", num_classes=10)
        >>> model(torch.randn(2, 3, 64, 64), domain="digits").shape
        torch.Size([2, 10])
    """

    def __init__(
        self,
        backbone: nn.Module,
        config: AdapterConfig | None = None,
        *,
        backbone_name: str | None = None,
        backbone_weights: dict[str, Any] | None = None,
        _fingerprint: str | None = None,
    ) -> None:
        # _fingerprint: the backbone's, when the caller already hashed it (load_family checks it before
        # wrapping); hashing a large backbone's weights again would cost as long.
        super().__init__()
        self._hub_mixin_config = None  # we write adapterkit.json ourselves; no config.json
        if config is not None and not isinstance(config, AdapterConfig):
            raise TypeError(
                f"config is a {type(config).__name__}: pass AdapterConfig(...) (AdapterConfig(**d) from a dict)"
            )
        self.config = config or AdapterConfig()
        self.backbone_name = backbone_name
        self.backbone_weights = backbone_weights  # where the weights come from (docs/format.md)
        backbone = reparameterize(backbone)
        backbone.eval().requires_grad_(False)
        self.fingerprint = _fingerprint or fingerprint(backbone)
        self.pretrained_cfg = dict(getattr(backbone, "pretrained_cfg", {}) or {})
        classifier = backbone.get_classifier() if hasattr(backbone, "get_classifier") else None
        self.backbone_head = copy.deepcopy(classifier) if isinstance(classifier, nn.Linear) else None
        if not hasattr(backbone, "reset_classifier"):
            raise TypeError(
                f"{type(backbone).__name__} has no reset_classifier(): adapterkit needs a timm model "
                "(create it with timm.create_model) so it can put one head per domain at the classifier slot"
            )
        if reset_head(backbone):  # the classifier alone does not give the backbone's logits (VOLO, SHViT)
            self.backbone_head = None
        self.num_features = getattr(backbone, "head_hidden_size", None) or backbone.num_features
        self.in_chans = input_channels(backbone)
        self.backbone = backbone
        self.router = DomainRouter()
        self.targets = inject(backbone, self.config, self.router)
        self.heads = nn.ModuleDict()
        self.signatures = nn.ModuleDict()  # domain -> DomainSignature, for domain="auto" (router.py)
        self._domains: dict[str, DomainInfo] = {}
        self._frozen: set[str] = set()  # domains whose tensors never change (published ones)
        self._lock = _Lock()
        self.default_domain: str | None = None
        self._mixed = MixedExecution(backbone, self.router)  # how a batch of several domains runs (mixed.py)
        self._plain = PlainPasses()  # eval-mode one-domain passes without wrapper code (layers/plain.py)
        self.basis_history: list[dict[str, Any]] = []  # the basis operations that built `basis()`
        # (folder, domain) -> sha256 of the domain file this model loaded from or saved to that folder:
        # a save may update its own earlier version, not someone else's same-named domain (family.py)
        self.file_versions: dict[tuple[str, str], str] = {}

    # ----------------------------------------------------------------- construction
    @classmethod
    def from_backbone(
        cls,
        backbone: str | nn.Module,
        config: AdapterConfig | None = None,
        *,
        pretrained: bool | str | Path = False,
        seed: int = 0,
        **timm_kwargs: Any,
    ) -> AdapterModel:
        """Attach adapters to a timm backbone.

        Args:
            backbone: a timm model name (`resnet50.a1_in1k`), an `hf-hub:` or `local-dir:` name, or an
                `nn.Module` created by timm.
            config: the adapter rules (default `AdapterConfig()`).
            pretrained: load the backbone's pretrained weights (True), or from this safetensors file.
                False builds random weights from `seed` (logged as a warning: adapters on a random
                backbone are rarely what you want).
            **timm_kwargs: passed to `timm.create_model` (for example `drop_path_rate`).

        The family records where the weights came from, so `from_pretrained` rebuilds the same backbone.
        """
        if isinstance(backbone, nn.Module):
            return cls(backbone, config)
        module = create_backbone(backbone, pretrained, seed=seed, **timm_kwargs)
        if pretrained is False:
            logger.warning(
                "%s: random backbone weights (seed %d); pass pretrained=True for trained ones", backbone, seed
            )
        weights = weights_record(backbone, pretrained, seed)
        return cls(module, config, backbone_name=backbone, backbone_weights=weights)

    def layers(self) -> dict[str, DomainLayer]:
        """Adapted layers by their module name in the backbone (as in the unwrapped backbone)."""
        return adapted_layers(self.backbone)

    # ----------------------------------------------------------------- domains
    @property
    def domains(self) -> list[str]:
        return list(self._domains)

    def domain_info(self, name: str) -> DomainInfo:
        return self._domains[self._check_known(name)]

    def _check_known(self, name: str) -> str:
        if name not in self._domains:
            known = ", ".join(self._domains) or "none yet"
            raise KeyError(
                f"unknown domain {name!r} (known: {known}); add it with add_domain() or load_domain()"
            )
        return name

    def add_domain(
        self,
        name: str,
        num_classes: int | None = None,
        *,
        labels: Sequence[str] | None = None,
        head: str = "new",
        data_config: dict[str, Any] | None = None,
        metadata: dict[str, Any] | None = None,
        factored: bool = False,
        new_columns: int | float | None = None,
    ) -> DomainInfo:
        """Add a trainable domain: fresh zero-initialised adapters, copies of the backbone's norms, a new head.

        Args:
            name: a safe file name (letters, digits, `_`, `-`).
            num_classes: size of the head (default: `len(labels)`, or the backbone's classes with
                `head="backbone"`).
            labels: class names, stored with the domain.
            head: `new` (a freshly initialised linear head) or `backbone` (a copy of the backbone's own
                classifier; then the model's output equals the backbone's until training).
            data_config: preprocessing (timm data config) stored with the domain.
            metadata: any JSON-serialisable extra information.
            factored: build every dense adapter on the layer's current shared basis `beta` (frozen)
                plus `new_columns` columns of its own (`adapterkit.compress.append_domain` shares them
                afterwards); default: full `alpha` for k x k convs, own low-rank factors for 1x1/linear.
                `train_domain(..., factored=True)` does this with the head seeded from the config.
            new_columns: own basis columns per layer for a factored domain: an int, or a float share of
                C = min(C_out, C_in) (default: the config's rank); capped per layer by C_in and by the
                room left in the basis (`adapterkit.compress.column_budget`), so every column can add
                a direction.
        """
        check_domain_name(name)
        if head not in ("new", "backbone"):
            raise ValueError(f"head={head!r}: use 'new' or 'backbone'")
        if data_config is not None:
            resolve_data_config(self.pretrained_cfg, data_config, what=f"domain {name!r}: data_config")
        backbone_classes = self.backbone_head.out_features if self.backbone_head is not None else None
        num_classes = resolve_num_classes(name, num_classes, labels, head, backbone_classes)
        if head == "backbone":
            new_head = copy.deepcopy(self.backbone_head).requires_grad_(True)
        else:
            ref = next(self.backbone.parameters())
            new_head = nn.Linear(self.num_features, num_classes, device=ref.device, dtype=ref.dtype)
        info = DomainInfo(
            name, num_classes, list(labels) if labels else None, data_config, {}, dict(metadata or {})
        )
        adapters = {}
        for layer_name, layer in self.layers().items():
            if factored and layer.rule in FACTORABLE:
                own = column_budget(layer, new_columns)
                adapters[layer_name] = layer.new_adapter(
                    factored=True, own_columns=own, shared_columns=layer.beta.shape[1]
                )
            else:
                adapters[layer_name] = layer.new_adapter()
        self.publish_domain(info, adapters, new_head, trainable=True)
        return info

    def publish_domain(
        self,
        info: DomainInfo,
        adapters: dict[str, nn.Module | Packed],
        head: nn.Module,
        *,
        basis: dict[str, torch.Tensor] | None = None,
        history: list[dict[str, Any]] | None = None,
        signature: DomainSignature | None = None,
        trainable: bool = False,
    ) -> None:
        """Insert a fully built domain (with the longer `basis` it needs, if any) in one step.

        Forward calls see the domain only once everything is in place. A published domain is frozen
        (`trainable=False`): its tensors, norm statistics included, never change until
        `set_trainable(name)`.
        """
        with self._lock:
            name = info.name
            if name in self._domains:
                raise ValueError(
                    f"domain {name!r} already exists; remove_domain() it first or pick a new name"
                )
            if any(d.lower() == name.lower() for d in self._domains):
                raise ValueError(
                    f"domain {name!r} differs from an existing one only by case; pick a new name"
                )
            layers = self.layers()
            missing = set(layers) - set(adapters)
            if missing:
                raise ValueError(f"domain {name!r} has no adapter for layers {sorted(missing)[:5]}")
            if basis:
                self.extend_basis(basis, history=history)
            # Modes first: a concurrent call may use the domain the moment it is in the table.
            if trainable:  # packed records (`load.build_domain`) become modules of their own
                adapters = {
                    n: a.module(own=True) if isinstance(a, Packed) else a for n, a in adapters.items()
                }
            for module in [*adapters.values(), head]:
                if isinstance(module, nn.Module):
                    module.requires_grad_(trainable).train(self.training and trainable)
            (self._frozen.discard if trainable else self._frozen.add)(name)
            for layer_name, module in adapters.items():  # a frozen domain is packed (layers/table.py)
                layers[layer_name].adapters.put(name, module, packed=not trainable)
            self.heads[name] = head
            if signature is not None:
                self.signatures[name] = signature
            self._domains[name] = info  # last: from here on forward calls can select it

    def remove_domain(self, name: str) -> None:
        """Remove a domain, its tensors and its cached fused weights; other domains are untouched."""
        with self._lock:
            self._check_known(name)
            del self._domains[name]  # unpublish first: no new call can select it
            for layer in self.layers().values():
                del layer.adapters[name]
                if layer.fused is not None:
                    layer.fused.evict(name)
            self._plain.evict(name)
            del self.heads[name]
            if name in self.signatures:
                del self.signatures[name]
            self._frozen.discard(name)
            if self.default_domain == name:
                self.default_domain = None

    def unload_domain(self, name: str) -> None:
        """Drop a domain from a running model (same as `remove_domain`; the family files stay)."""
        self.remove_domain(name)

    def load_domain(
        self,
        source: str | Path,
        name: str,
        *,
        as_name: str | None = None,
        revision: str | None = None,
        force: bool = False,
        **hub_kwargs: Any,
    ) -> None:
        """Hot-add one domain from a family folder or Hub repo while other threads keep calling the model.

        Only the family's `adapterkit.json`, its basis (if any) and this domain's files are read. The
        domain becomes visible in one step once fully built; existing domains' outputs do not change.
        `as_name` loads it under another name.
        """
        from .load import load_domain

        if revision is not None:
            hub_kwargs["revision"] = revision
        load_domain(self, str(source), name, as_name=as_name, force=force, **hub_kwargs)

    def set_trainable(self, name: str, trainable: bool = True) -> None:
        """Let a domain's tensors train (gradients, norm statistics in train mode), or freeze them.

        A frozen domain's norms run on their stored statistics whatever `model.training` says, so no
        call pattern can make a published domain drift. `add_domain` makes trainable domains,
        loading makes frozen ones.
        """
        with self._lock:
            self._check_known(name)
            (self._frozen.discard if trainable else self._frozen.add)(name)
            for layer in self.layers().values():
                table = layer.adapters
                if trainable:  # live modules with their own tensors (layers/table.py)
                    table.unpack(name).requires_grad_(True).train(self.training)
                elif not table.is_packed(name):  # packed (a module that cannot be stays live, frozen)
                    table.put(name, table[name].requires_grad_(False).train(False), packed=True)
            self.heads[name].requires_grad_(trainable).train(self.training and trainable)

    def is_trainable(self, name: str) -> bool:
        return self._check_known(name) not in self._frozen

    @contextmanager
    def rollback(self, name: str) -> Iterator[None]:
        """On any error in the block, put `name` back as it was before: removed if it was new, else its
        modules, tensors (norm statistics included), entry, signature and trainable flag restored."""
        if name not in self._domains:
            try:
                yield
            except BaseException:
                if name in self._domains:
                    self.remove_domain(name)
                raise
            return
        info, trainable = copy.deepcopy(self._domains[name]), self.is_trainable(name)
        adapters = {n: layer.adapters[name] for n, layer in self.layers().items()}
        head, signature = self.heads[name], self.signatures[name] if name in self.signatures else None
        saved = [(m, copy.deepcopy(m.state_dict())) for m in [*adapters.values(), head]]
        default = self.default_domain == name
        try:
            yield
        except BaseException:
            with self._lock:
                if name in self._domains:
                    self.remove_domain(name)
                for module, state in saved:
                    module.load_state_dict(state)
                self.publish_domain(info, adapters, head, signature=signature, trainable=trainable)
                if default:
                    self.default_domain = name
            raise

    def _live_modules(self, name: str) -> list[nn.Module]:
        """The domain's modules that `train()` reaches: its head, and adapters that are not packed."""
        tables = [layer.adapters for layer in self.layers().values()]
        return [t[name] for t in tables if not t.is_packed(name)] + [self.heads[name]]

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

    # ----------------------------------------------------------------- shared basis
    def basis(self) -> dict[str, torch.Tensor]:
        """The shared basis `beta` of every layer that has one (C_out x K)."""
        return {
            n: m.beta
            for n, m in self.layers().items()
            if getattr(m, "beta", None) is not None and m.beta.shape[1]
        }

    def extend_basis(
        self,
        basis: dict[str, torch.Tensor],
        *,
        adapters: dict[str, dict[str, nn.Module]] | None = None,
        history: list[dict[str, Any]] | None = None,
    ) -> None:
        """Install a basis that extends the current one (append-only), and optionally new adapters.

        Old domains read only the prefix they were built on, so their outputs do not change; a basis
        that is not an extension is refused. `adapters` maps domain -> layer -> adapter (a domain
        re-expressed on the longer basis); `history` is the basis operations that built `basis`.
        """
        with self._lock:
            current = self.basis()
            merged = dict(current)
            for name, beta in basis.items():
                if name in current and current[name].shape[1] > beta.shape[1]:
                    check_extends({name: beta}, current, "the new basis")  # a prefix of ours: keep ours
                else:
                    merged[name] = beta
            check_extends(current, merged, "the new basis")
            self._install_basis({n: b for n, b in merged.items() if b is not current.get(n)}, adapters or {})
            if history is not None:
                self.basis_history = list(history)

    def replace_basis(
        self,
        basis: dict[str, torch.Tensor],
        adapters: dict[str, dict[str, nn.Module]],
        *,
        history: list[dict[str, Any]] | None = None,
    ) -> None:
        """Install a re-factorised basis with every domain re-expressed on it (changes old domains'
        outputs by their reconstruction error; see `compress.refactorize`)."""
        with self._lock:
            missing = sorted(set(self._domains) - set(adapters))
            if missing:
                raise ValueError(f"replace_basis needs new adapters for every domain; missing {missing}")
            self._install_basis(basis, adapters)
            if history is not None:
                self.basis_history = list(history)

    def _install_basis(
        self, basis: dict[str, torch.Tensor], adapters: dict[str, dict[str, nn.Module]]
    ) -> None:
        layers = self.layers()
        unknown = sorted(n for n in basis if getattr(layers.get(n), "beta", None) is None)
        if unknown:
            raise ValueError(f"layers {unknown[:5]} have no shared basis in this model")
        for name, beta in basis.items():
            if beta.dim() != 2 or beta.shape[0] != layers[name].beta.shape[0]:
                raise ValueError(f"basis of {name}: shape {tuple(beta.shape)} does not fit the layer")
        for domain, by_layer in adapters.items():
            self._check_known(domain)
            for name in by_layer:
                if name not in layers:
                    raise ValueError(f"adapter for {name!r}, which is not an adapted layer")
        for name, beta in basis.items():
            layers[name].beta = beta
            if layers[name].fused is not None:
                layers[name].fused.clear()  # weights keyed on the old basis tensor are never served again
        for domain, by_layer in adapters.items():
            trainable = domain not in self._frozen
            for name, module in by_layer.items():
                module.requires_grad_(trainable).train(self.training and trainable)
                layers[name].adapters.put(domain, module, packed=not trainable)

    def set_domain(self, name: str) -> None:
        """The domain `forward` uses when none is given."""
        self.default_domain = self._check_known(name)

    def trainable_parameters(self, domain: str) -> list[nn.Parameter]:
        """Every tensor `domain` trains: its adapters, its norms' affine parameters, its head."""
        self._check_known(domain)
        params = [p for layer in self.layers().values() for p in layer.adapters[domain].parameters()]
        return params + list(self.heads[domain].parameters())

    def domain_state_dict(self, domain: str) -> dict[str, torch.Tensor]:
        """All of a domain's tensors (parameters and norm statistics): `layers.<layer>.<tensor>`, `head.<tensor>`."""
        self._check_known(domain)
        state = {}
        for layer_name, layer in self.layers().items():
            for key, t in layer.adapters.state_of(domain).items():
                state[f"layers.{layer_name}.{key}"] = t
        for key, t in self.heads[domain].state_dict().items():
            state[f"head.{key}"] = t
        if domain in self.signatures:
            for key, t in self.signatures[domain].state_dict().items():
                state[f"signature.{key}"] = t
        return state

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

    def train(self, mode: bool = True) -> AdapterModel:
        """Train or eval mode. Frozen domains (see `set_trainable`) stay in eval behaviour either way,
        and so do the shared backbone's own layers."""
        super().train(mode)
        self._plain.clear()
        if self.backbone_head is not None:
            self.backbone_head.train(False)
        if mode:
            for name in self._frozen:
                for module in self._live_modules(name):
                    module.train(False)
        return self

    # ----------------------------------------------------------------- accounting
    def backbone_parameter_count(self) -> int:
        """Parameters of the backbone without its classifier (the paper's unit for "#par")."""
        return sum(p.numel() for n, p in self.backbone.named_parameters() if ".adapters." not in f".{n}")

    def domain_cost(self, domain: str) -> dict[str, float]:
        """Parameters and bytes `domain` adds, and their share of the backbone's parameters."""
        state = self.domain_state_dict(domain)
        params = sum(p.numel() for p in self.trainable_parameters(domain))
        nbytes = sum(t.numel() * t.element_size() for t in state.values())
        backbone = self.backbone_parameter_count()
        return {"parameters": params, "bytes": nbytes, "fraction_of_backbone": params / backbone}

    # ----------------------------------------------------------------- export and files
    def export_domain(self, name: str) -> nn.Module:
        """A plain timm model for one domain with its adapters folded in (see `export.py`)."""
        from .export import export_domain

        return export_domain(self, name)

    def save_pretrained(  # type: ignore[override]
        self,
        save_directory: str | Path,
        *,
        push_to_hub: bool = False,
        repo_id: str | None = None,
        overwrite: bool = False,
        **push_kwargs: Any,
    ) -> str | None:
        """Write the family folder (`family.save_family`: the folder's other domains are kept; a family of
        another layout, on other weights or with a basis this model's does not extend is refused before
        anything is written, and so is a same-named domain of other content that this model did not load
        from or save to that folder, unless `overwrite=True`). With `push_to_hub=True` also push to
        `repo_id` (default: the folder's name), passing `push_kwargs` to `push_to_hub`, and return the
        commit URL."""
        if push_kwargs and not push_to_hub:
            raise TypeError(
                f"save_pretrained got {sorted(push_kwargs)}, which apply only with push_to_hub=True"
            )
        self._save_pretrained(Path(save_directory), overwrite=overwrite)
        return self.push_to_hub(repo_id or Path(save_directory).name, **push_kwargs) if push_to_hub else None

    def _save_pretrained(self, save_directory: Path, overwrite: bool = False) -> None:
        from .family import save_family

        save_family(self, save_directory, overwrite=overwrite)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | Path, **kwargs: Any) -> AdapterModel:  # type: ignore[override]
        """Load a family from a local folder or a Hub repo.

        Args:
            pretrained_model_name_or_path: a family folder or a Hub repo id.
            **kwargs: `domains` (load only these; only their files are downloaded; `[]` for none),
                `backbone` (timm name or module; default: the recorded backbone with its recorded
                weights), `backbone_weights` (a local file replacing a recorded one that moved), `force`,
                and the Hub's `revision`, `token`, `cache_dir`, `local_files_only`, `force_download`.

        Returns the model in eval mode with every loaded domain frozen (see `set_trainable`).

        ModelHubMixin.from_pretrained would first probe for a config.json we do not write, so this goes
        straight to `_from_pretrained`.
        """
        return cls._from_pretrained(model_id=str(pretrained_model_name_or_path), **kwargs)

    @classmethod
    def _from_pretrained(cls, *, model_id: str, **kwargs: Any) -> AdapterModel:  # type: ignore[override]
        from .load import HUB_KEYS, load_family

        hub_kwargs = {k: kwargs.pop(k) for k in HUB_KEYS if k in kwargs}
        return load_family(
            cls, model_id, **{k: v for k, v in hub_kwargs.items() if v not in (None, False)}, **kwargs
        )

    def push_to_hub(  # type: ignore[override]
        self,
        repo_id: str,
        *,
        domains: list[str] | None = None,
        private: bool | None = None,
        branch: str | None = None,
        revision: str | None = None,
        commit_message: str | None = None,
        token: str | None = None,
        force: bool = False,
    ) -> str:
        """Publish domains (default: all) to a Hub repo, keeping the domains already there.

        Only the pushed domains' files, the basis, `adapterkit.json` and the model card are written;
        the backbone is never uploaded. `revision` is another name for `branch`, as in `upload_folder`.
        """
        from .hub import push_to_hub

        if branch is not None and revision is not None and branch != revision:
            raise ValueError(f"branch={branch!r} and revision={revision!r} disagree; pass one of them")
        return push_to_hub(
            self,
            repo_id,
            domains=domains,
            private=private,
            branch=branch or revision,
            commit_message=commit_message,
            token=token,
            force=force,
        )
