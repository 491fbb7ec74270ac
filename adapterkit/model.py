"""`AdapterModel`: one frozen timm backbone, many domains, each with its own adapters, norms and head.

`AdapterModel` is the one owner of the domain table and of the shared basis (docs/architecture.md). Here
are the table, the lock every writer takes, and every method that adds, removes, freezes or restores a
domain; the rest of the class is in mixins: forward, `use_domain` and routing in `model_forward.py`, the
shared basis in `model_basis.py`, files and the Hub (`save_pretrained`, `from_pretrained`, `push_to_hub`,
`export_domain`, `domain_cost`) in `model_hub.py`, each a thin layer over its stage (`mixed.py`, ...).
"""

from __future__ import annotations

import copy
import logging
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import ModelHubMixin
from torch import nn

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
from .layers.plain import PlainPasses
from .layers.table import Packed
from .mixed import MixedExecution
from .model_basis import BasisMixin
from .model_forward import ForwardMixin
from .model_hub import HubMixin
from .signature import DomainSignature
from .transforms import resolve_data_config

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
    ForwardMixin,  # before nn.Module: its `forward` replaces nn.Module's
    BasisMixin,
    HubMixin,  # before ModelHubMixin: its save/load/push methods replace the mixin's
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

    def set_domain(self, name: str) -> None:
        """The domain `forward` uses when none is given."""
        self.default_domain = self._check_known(name)

    def trainable_parameters(self, domain: str) -> list[nn.Parameter]:
        """Every tensor `domain` trains: its adapters, its norms' affine parameters, its head."""
        self._check_known(domain)
        params = [p for layer in self.layers().values() for p in layer.adapters[domain].parameters()]
        return params + list(self.heads[domain].parameters())

    # ----------------------------------------------------------------- modes
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
