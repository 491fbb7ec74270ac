"""Inject: a timm backbone made ready for domains, with every targeted layer wrapped in place.

`create_backbone` builds the timm model, `reparameterize` fuses re-parameterisable branches first (so
adapters sit next to the convs that run at inference), `inject` wraps each layer that `targets.plan`
selects (rules in docs/layer-rules.md), and `fingerprint` identifies the backbone's weights in saved
families.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

from . import backbones as _backbones  # noqa: F401  (registers the paper's backbones with timm)
from .backbone_weights import check_weights_file, safetensors_weights
from .config import AdapterConfig
from .layers import AdaptedConv2d, AdaptedLinear, DomainLayer, DomainNorm, DomainRouter
from .targets import Target, plan

logger = logging.getLogger(__name__)


def fingerprint(module: nn.Module) -> str:
    """A sha256 over the names, dtypes, shapes and bytes of a module's state dict."""
    h = hashlib.sha256()
    for key, t in sorted(module.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return "sha256:" + h.hexdigest()


def create_backbone(
    name: str, pretrained: bool | str | Path = False, *, seed: int = 0, **kwargs: Any
) -> nn.Module:
    """`timm.create_model` for a timm name, `hf-hub:` or `local-dir:` name; a str/Path `pretrained` is a
    weights file (safetensors). Random weights come from `seed`, without touching the global RNG, so
    the same call always builds the same backbone.

    Pretrained weights are read as safetensors only: the source timm would read is resolved first
    (`backbone_weights.safetensors_weights`; only `model.safetensors` is downloaded from the Hub) and
    timm is handed that file; a source with only pickled weights is refused before anything is read.
    """
    path = check_weights_file(Path(pretrained)) if isinstance(pretrained, (str, Path)) else None
    file = path or (safetensors_weights(name, kwargs) if pretrained else None)
    if file is not None:  # timm's `file` source: read with safetensors, whatever the name's own source
        kwargs["pretrained_cfg_overlay"] = {
            **kwargs.get("pretrained_cfg_overlay", {}),
            "file": str(file),
            "source": "file",
        }
    pretrained = bool(pretrained)
    try:
        # timm initialises on the CPU from the global RNG and takes no generator: seed a fork of the CPU
        # generator alone (torch.manual_seed would also reseed every CUDA generator, which fork_rng(devices=[])
        # does not restore), so the caller's RNG state is exactly as before on every device.
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)
            return timm.create_model(name, pretrained=pretrained, **kwargs)
    except RuntimeError as e:
        if "Unknown model" in str(e):
            raise ValueError(
                f"{name!r} is not a timm model; check timm.list_models(), or use 'hf-hub:org/name' or "
                "'local-dir:/path' for a timm-format checkpoint"
            ) from e
        if "No pretrained weights exist" in str(e):
            raise ValueError(
                f"timm has no downloadable weights for {name!r}: pass pretrained=PATH, a safetensors file of "
                "its weights (or pretrained=False for random ones)"
            ) from e
        if path is not None and "state_dict" in str(e):  # the file's tensors are another architecture's
            first = str(e).strip().splitlines()[0].rstrip(":. ")
            raise ValueError(
                f"{path} does not hold weights for {name} ({first}: its tensor names or shapes differ); "
                f"pass the weights file of {name}"
            ) from e
        raise


def weights_record(name: str, pretrained: bool | str | Path, seed: int = 0) -> dict[str, Any]:
    """Where a backbone's weights come from, as a family records it (see docs/format.md)."""
    if isinstance(pretrained, (str, Path)):
        # as given (a symlink stays the link: its target may be swapped)
        path = check_weights_file(Path(pretrained)).absolute()
        return {
            "kind": "file",
            "path": os.path.normpath(path),
            "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
        }
    if not pretrained:
        return {"kind": "random", "seed": seed}
    if name.startswith("hf-hub:"):
        repo, _, revision = name.removeprefix("hf-hub:").partition("@")
        return {"kind": "hf-hub", "repo": repo, "revision": revision or _hub_commit(repo)}
    return {"kind": "local-dir" if name.startswith("local-dir:") else "timm"}


def _hub_commit(repo: str) -> str | None:
    """The commit `main` of a backbone repo points at now (its weights were just downloaded from it)."""
    from huggingface_hub import HfApi

    try:
        return HfApi().model_info(repo).sha
    except Exception:  # noqa: BLE001  (offline or private: the fingerprint still guards the weights)
        return None


def rebuild_backbone(
    name: str, record: dict[str, Any] | None, weights_file: str | Path | None = None
) -> tuple[nn.Module, dict[str, Any]]:
    """The backbone a family recorded (`record`), with its weights; `weights_file` replaces a recorded
    local file that has moved. Families that recorded nothing (format 1) used pretrained weights."""
    record = dict(record or {"kind": "timm"})
    if weights_file is not None:
        record = weights_record(name, weights_file)
    kind = record.get("kind")
    if kind == "hf-hub" and record.get("revision") and "@" not in name:
        name = f"{name}@{record['revision']}"  # the commit whose weights the family was trained on
    if kind == "random":
        return create_backbone(name, False, seed=int(record.get("seed", 0))), record
    if kind == "file":
        if not Path(record["path"]).is_file():
            raise FileNotFoundError(
                f"the family's backbone weights were {record['path']}, which does not exist here: pass "
                "backbone_weights=PATH (CLI: --backbone-weights PATH) with the same file"
            )
        return create_backbone(name, record["path"]), record
    try:
        return create_backbone(name, True), record
    except (OSError, RuntimeError) as e:
        raise ValueError(
            f"could not load the pretrained weights of backbone {name!r} ({e}); go online once so they are "
            "cached, or pass backbone= with the timm module the family was trained on"
        ) from e


def reparameterize(model: nn.Module) -> nn.Module:
    """Fuse re-parameterisable branches (RepVGG, MobileOne, FastViT, RepGhost, ...) before adapters are
    attached, so they sit next to the convs that run at inference.

    Walks the model as timm's `reparameterize_model` does (`fuse()`, `reparameterize()` or
    `switch_to_deploy()` per module), but a module already in its deploy form is left as it is, so a
    model the user re-parameterised (wholly or in part) is accepted too.
    """
    if any(hasattr(m, "reparameterize") or hasattr(m, "switch_to_deploy") for m in model.modules()):
        model.eval()
        with torch.no_grad():
            _reparameterize_children(model, "")
    return model


def _reparameterize_children(parent: nn.Module, prefix: str) -> None:
    for name, child in list(parent.named_children()):
        try:
            if hasattr(child, "fuse"):
                setattr(parent, name, child.fuse())
                child = getattr(parent, name)
            elif hasattr(child, "reparameterize"):
                child.reparameterize()
            elif hasattr(child, "switch_to_deploy"):
                child.switch_to_deploy()
        except AttributeError as e:
            # Its training-time branches are gone (timm deletes them when it re-parameterises), so the
            # user already fused it; timm's methods read those branches before changing anything.
            logger.info("%s%s (%s) is already re-parameterised (%s)", prefix, name, type(child).__name__, e)
        _reparameterize_children(child, f"{prefix}{name}.")


def reset_head(backbone: nn.Module) -> list[str]:
    """`backbone.reset_classifier(0)`; returns the parameterised modules it removed besides the classifier
    (`get_classifier()`): VOLO's auxiliary token head, the BatchNorm of `BNLinear`/`NormLinear` heads.
    When there are any, the backbone's classifier alone does not compute the backbone's logits, so it
    cannot serve as a domain's head (`head="backbone"`)."""
    classifier = backbone.get_classifier() if hasattr(backbone, "get_classifier") else None
    kept = {id(c) for c in (classifier if isinstance(classifier, tuple) else (classifier,))}
    before = {
        name: m
        for name, m in backbone.named_modules()
        if id(m) not in kept and any(True for _ in m.parameters(recurse=False))
    }
    backbone.reset_classifier(0)
    after = {id(m) for m in backbone.modules()}
    return [f"{name} ({type(m).__name__})" for name, m in before.items() if id(m) not in after]


def input_channels(backbone: nn.Module) -> int | None:
    """Image channels the backbone expects (from its pretrained config, else its first conv)."""
    size = (getattr(backbone, "pretrained_cfg", None) or {}).get("input_size")
    if size:
        return int(size[0])
    first = next((m for m in backbone.modules() if isinstance(m, nn.Conv2d)), None)
    return first.in_channels if first is not None else None


def inject(backbone: nn.Module, config: AdapterConfig, router: DomainRouter) -> list[Target]:
    """Replace every layer `plan(backbone, config)` selects with its wrapper; return the plan."""
    targets = plan(backbone, config)
    for target in targets:
        parent_name, _, child = target.name.rpartition(".")
        parent = backbone.get_submodule(parent_name) if parent_name else backbone
        base = getattr(parent, child)
        if target.rule == "norm":
            wrapper: DomainLayer = DomainNorm(base, router)
        elif isinstance(base, nn.Linear):
            wrapper = AdaptedLinear(base, router, rank=config.rank, dropout=config.dropout)
        else:
            wrapper = AdaptedConv2d(base, router, target.rule, rank=config.rank, dropout=config.dropout)
        setattr(parent, child, wrapper)
    return targets


def adapted_layers(backbone: nn.Module) -> dict[str, DomainLayer]:
    """The backbone's adapted layers by module name, in `named_modules` order. The walk stops at each
    adapted layer, so its cost does not grow with the domains loaded (each adds modules below them)."""
    found: dict[str, DomainLayer] = {}
    stack: list[tuple[str, nn.Module]] = [("", backbone)]
    seen: set[int] = set()
    while stack:
        prefix, module = stack.pop()
        if id(module) in seen:  # (a module registered twice counts once, as in `named_modules`)
            continue
        seen.add(id(module))
        if isinstance(module, DomainLayer):
            found[prefix] = module
            continue
        children = [
            (f"{prefix}.{n}" if prefix else n, m) for n, m in module._modules.items() if m is not None
        ]
        stack.extend(reversed(children))
    return found
