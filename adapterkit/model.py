"""`AdapterModel`: one frozen timm backbone, many domains, each with its own adapters, norms and head."""

from __future__ import annotations

import copy
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import ModelHubMixin
from torch import nn

from .config import AdapterConfig, DomainInfo, check_domain_name
from .inject import create_backbone, fingerprint, inject, input_channels, reparameterize
from .layers import DomainLayer, DomainRouter


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
        _fingerprint: str | None = None,
    ) -> None:
        # _fingerprint: the backbone's, when the caller already hashed it (load_family checks it before
        # wrapping); hashing a large backbone's weights again would cost as long.
        super().__init__()
        self._hub_mixin_config = None  # we write adapterkit.json ourselves; no config.json
        self.config = config or AdapterConfig()
        self.backbone_name = backbone_name
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
        backbone.reset_classifier(0)
        self.num_features = getattr(backbone, "head_hidden_size", None) or backbone.num_features
        self.in_chans = input_channels(backbone)
        self.backbone = backbone
        self.router = DomainRouter()
        self.targets = inject(backbone, self.config, self.router)
        self.heads = nn.ModuleDict()
        self._domains: dict[str, DomainInfo] = {}
        self._lock = _Lock()
        self.default_domain: str | None = None

    # ----------------------------------------------------------------- construction
    @classmethod
    def from_backbone(
        cls,
        backbone: str | nn.Module,
        config: AdapterConfig | None = None,
        *,
        pretrained: bool | str | Path = False,
        **timm_kwargs: Any,
    ) -> AdapterModel:
        """Attach adapters to a timm backbone.

        Args:
            backbone: a timm model name (`resnet50.a1_in1k`), an `hf-hub:` or `local-dir:` name, or an
                `nn.Module` created by timm.
            config: the adapter rules (default `AdapterConfig()`).
            pretrained: load the backbone's pretrained weights (True), or from this safetensors file.
            **timm_kwargs: passed to `timm.create_model` (for example `drop_path_rate`).
        """
        if isinstance(backbone, nn.Module):
            return cls(backbone, config)
        return cls(create_backbone(backbone, pretrained, **timm_kwargs), config, backbone_name=backbone)

    def layers(self) -> dict[str, DomainLayer]:
        """Adapted layers by their module name in the backbone (as in the unwrapped backbone)."""
        return {n: m for n, m in self.backbone.named_modules() if isinstance(m, DomainLayer)}

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
        new_columns: int | None = None,
    ) -> DomainInfo:
        """Add a domain: fresh zero-initialised adapters, copies of the backbone's norms, a new head.

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
            new_columns: own basis columns per layer for a factored domain (default: the config's rank).
        """
        check_domain_name(name)
        if head not in ("new", "backbone"):
            raise ValueError(f"head={head!r}: use 'new' or 'backbone'")
        if num_classes is None:
            if labels is not None:
                num_classes = len(labels)
            elif head == "backbone" and self.backbone_head is not None:
                num_classes = self.backbone_head.out_features
            else:
                raise ValueError(f"add_domain({name!r}) needs num_classes (or labels, or head='backbone')")
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes={num_classes!r} must be a positive int")
        if labels is not None and len(labels) != num_classes:
            raise ValueError(f"{len(labels)} labels given for num_classes={num_classes}; they must match")
        if head == "backbone":
            if self.backbone_head is None or self.backbone_head.out_features != num_classes:
                raise ValueError(
                    f"head='backbone' needs the backbone's linear classifier with {num_classes} classes; "
                    "use head='new'"
                )
            new_head = copy.deepcopy(self.backbone_head).requires_grad_(True)
        else:
            ref = next(self.backbone.parameters())
            new_head = nn.Linear(self.num_features, num_classes, device=ref.device, dtype=ref.dtype)
        info = DomainInfo(
            name, num_classes, list(labels) if labels else None, data_config, {}, dict(metadata or {})
        )
        adapters = {}
        for layer_name, layer in self.layers().items():
            if factored and layer.rule in ("parallel", "series", "lowrank"):
                adapters[layer_name] = layer.new_adapter(
                    factored=True, rank=new_columns, prefix_rank=layer.beta.shape[1]
                )
            else:
                adapters[layer_name] = layer.new_adapter()
        self._publish(info, adapters, new_head)
        return info

    def _publish(self, info: DomainInfo, adapters: dict[str, nn.Module], head: nn.Module) -> None:
        """Insert a fully built domain; it becomes visible to forward calls only at the very end."""
        with self._lock:
            if info.name in self._domains:
                raise ValueError(
                    f"domain {info.name!r} already exists; remove_domain() it first or pick a new name"
                )
            if any(d.lower() == info.name.lower() for d in self._domains):
                raise ValueError(
                    f"domain {info.name!r} differs from an existing one only by case; pick a new name"
                )
            layers = self.layers()
            missing = set(layers) - set(adapters)
            if missing:
                raise ValueError(f"domain {info.name!r} has no adapter for layers {sorted(missing)[:5]}")
            for layer_name, module in adapters.items():
                layers[layer_name].adapters[info.name] = module.train(self.training)
            self.heads[info.name] = head.train(self.training)
            self._domains[info.name] = info

    def remove_domain(self, name: str) -> None:
        """Remove a domain and all its tensors; other domains are untouched."""
        with self._lock:
            self._check_known(name)
            del self._domains[name]  # unpublish first: no new call can select it
            for layer in self.layers().values():
                del layer.adapters[name]
            del self.heads[name]
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
        revision: str | None = None,
        force: bool = False,
        **hub_kwargs: Any,
    ) -> None:
        """Hot-add one domain from a family folder or Hub repo while other threads keep calling the model.

        Only the family's `adapterkit.json`, its basis (if any) and this domain's file are read. The
        domain becomes visible in one step once fully built; existing domains' outputs do not change.
        """
        from .load import load_domain

        if revision is not None:
            hub_kwargs["revision"] = revision
        load_domain(self, str(source), name, force=force, **hub_kwargs)

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
            for key, t in layer.adapters[domain].state_dict().items():
                state[f"layers.{layer_name}.{key}"] = t
        for key, t in self.heads[domain].state_dict().items():
            state[f"head.{key}"] = t
        return state

    # ----------------------------------------------------------------- forward
    def forward(self, x: torch.Tensor, domain: str | Sequence[str] | None = None) -> torch.Tensor:
        """Logits of `x` for one domain, or one domain per sample.

        With a list of domains the samples are grouped by domain; each group runs exactly as it would
        alone. Heads of different sizes are padded with `-inf`, so softmax, argmax and cross-entropy
        stay correct per sample.
        """
        if not isinstance(x, torch.Tensor) or x.dim() < 2:
            raise ValueError(f"expected an image batch tensor (N, C, H, W), got {type(x).__name__}")
        if self.in_chans is not None and x.shape[1] != self.in_chans:
            raise ValueError(
                f"the backbone expects {self.in_chans} input channels, got {x.shape[1]}: convert images "
                f"(for example PIL's image.convert('RGB') or x.expand(-1, {self.in_chans}, -1, -1))"
            )
        domain = self.default_domain if domain is None else domain
        if domain is None:
            raise ValueError(
                "no domain given: pass domain='name' (or a list, one per sample) or call set_domain()"
            )
        if isinstance(domain, str):
            return self._forward_one(x, domain)
        domain = list(domain)
        if len(domain) != x.shape[0]:
            raise ValueError(f"got {len(domain)} domains for a batch of {x.shape[0]}; pass one per sample")
        for d in dict.fromkeys(domain):
            self._check_known(d)
        groups: dict[str, list[int]] = {}
        for i, d in enumerate(domain):
            groups.setdefault(d, []).append(i)
        if len(groups) == 1:
            return self._forward_one(x, domain[0])
        width = max(self._domains[d].num_classes for d in groups)
        out = None
        for d, idx in groups.items():
            index = torch.tensor(idx, device=x.device)
            logits = self._forward_one(x.index_select(0, index), d)
            if out is None:
                out = logits.new_full((x.shape[0], width), float("-inf"))
            out[index, : logits.shape[1]] = logits
        return out

    def _forward_one(self, x: torch.Tensor, domain: str) -> torch.Tensor:
        head = self.heads[self._check_known(domain)]
        with self.router.use(domain):
            features = self.backbone(x)
        return head(features.flatten(1))  # conv classifiers (DLA, ...) leave (N, C, 1, 1)

    def train(self, mode: bool = True) -> AdapterModel:
        super().train(mode)
        if self.backbone_head is not None:
            self.backbone_head.train(False)
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

    def _save_pretrained(self, save_directory: Path) -> None:
        from .family import save_family

        save_family(self, save_directory)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | Path, **kwargs: Any) -> AdapterModel:  # type: ignore[override]
        """Load a family from a local folder or a Hub repo.

        Args:
            pretrained_model_name_or_path: a family folder or a Hub repo id.
            **kwargs: `domains` (load only these; only their files are downloaded), `backbone` (timm
                name or module; default: the recorded name with pretrained weights), `force`, and the Hub's
                `revision`, `token`, `cache_dir`, `local_files_only`, `force_download`.

        ModelHubMixin.from_pretrained would first probe for a config.json we do not write, so this goes
        straight to `_from_pretrained`.
        """
        return cls._from_pretrained(model_id=str(pretrained_model_name_or_path), **kwargs)

    @classmethod
    def _from_pretrained(cls, *, model_id: str, **kwargs: Any) -> AdapterModel:  # type: ignore[override]
        from .load import load_family

        hub_keys = ("revision", "token", "cache_dir", "local_files_only", "force_download")
        hub_kwargs = {k: kwargs.pop(k) for k in hub_keys if kwargs.get(k) not in (None, False)}
        return load_family(cls, model_id, **hub_kwargs, **kwargs)

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
