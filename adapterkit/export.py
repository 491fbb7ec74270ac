"""Export one domain as a plain timm model: adapters folded into the conv/linear weights, the
domain's norms and head in place, no adapter module left (zero inference overhead)."""

from __future__ import annotations

import copy
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .format import CONFIG_FILE, atomic_write
from .layers import DomainLayer, not_foldable_reason
from .transforms import DATA_CONFIG_KEYS, resolve_data_config

if TYPE_CHECKING:
    from .config import DomainInfo
    from .model import AdapterModel

SOURCE_KEYS = (
    "tag",
    "source",
    "url",
    "file",
    "hf_hub_id",
    "hf_hub_filename",
    "origin_url",
    "paper_name",
    "paper_ids",
)


def export_domain(model: AdapterModel, domain: str) -> nn.Module:
    """Fold `domain` into a copy of the backbone and return it as a plain timm model.

    Raises:
        ValueError: a layer cannot be folded exactly (Conv2dSame, StdConv2d, ScaledStdConv2d, ...);
            the message names the layer and why. Nothing is modified.
    """
    info = model.domain_info(domain)
    layers = model.layers()
    _check_foldable(layers, domain)
    exported = _folded_copy(model, layers, domain)
    _place_head(model, exported, info.num_classes, domain)
    cfg = _exported_cfg(model, exported, info, domain)
    exported.pretrained_cfg = cfg
    exported.default_cfg = cfg
    exported.requires_grad_(True)
    return exported.eval()


def _check_foldable(layers: dict[str, DomainLayer], domain: str) -> None:
    """Refuse, before anything is copied, when a layer's adapter cannot be folded into its weights exactly."""
    refused = []
    for name, layer in layers.items():
        reason = None if layer.rule == "norm" else not_foldable_reason(layer.base_layer)
        if reason:
            refused.append(f"{name}: {reason}")
    if refused:
        raise ValueError(
            f"cannot export domain {domain!r} as a plain model: folding would not be exact for "
            + "; ".join(refused[:3])
            + (f" (and {len(refused) - 3} more)" if len(refused) > 3 else "")
            + ". Serve it unfolded with AdapterModel, or attach adapters with an override that skips these layers."
        )


def _folded_copy(model: AdapterModel, layers: dict[str, DomainLayer], domain: str) -> nn.Module:
    """A copy of the backbone with each `DomainLayer` replaced by its base layer with `domain` folded in."""
    # Copy the backbone but not the other domains' tensors (they are only referenced, then dropped),
    # without touching the live model, which may be serving other threads.
    memo: dict[int, object] = {id(model.router): model.router}
    for layer in layers.values():
        for d in layer.adapters:
            if d != domain:
                held = layer.adapters.held(d)  # a live module or a packed buffer
                memo[id(held)] = held
    exported = copy.deepcopy(model.backbone, memo)
    for name, layer in list(exported.named_modules()):
        if isinstance(layer, DomainLayer):
            parent_name, _, child = name.rpartition(".")
            parent = exported.get_submodule(parent_name) if parent_name else exported
            setattr(parent, child, layer.fold(domain))
    return exported


def _place_head(model: AdapterModel, exported: nn.Module, num_classes: int, domain: str) -> None:
    """Give `exported` a classifier of the domain's size holding the domain's head weights."""
    head = model.heads[domain]
    before = {id(m) for m in exported.modules()}
    exported.reset_classifier(num_classes)
    classifiers = exported.get_classifier()
    # distilled models (DeiT, LeViT) average two heads: give both the domain's head
    classifiers = classifiers if isinstance(classifiers, tuple) else (classifiers,)
    for classifier in classifiers:
        if not isinstance(classifier, (nn.Linear, nn.Conv2d)):
            raise ValueError(
                f"cannot export domain {domain!r}: the backbone's classifier is a {type(classifier).__name__}, "
                "not a linear layer, so the domain's linear head has no exact place in a plain timm model"
            )
    _check_head_is_classifier(exported, before, classifiers, domain)
    for classifier in classifiers:
        with torch.no_grad():
            classifier.weight.copy_(head.weight.view_as(classifier.weight))  # Linear or 1x1 conv head
            classifier.bias.copy_(head.bias)


def _exported_cfg(model: AdapterModel, exported: nn.Module, info: DomainInfo, domain: str) -> dict[str, Any]:
    """The exported model's `pretrained_cfg`: the backbone's, less its source, with the domain's classes,
    label names and preprocessing."""
    from . import __version__

    cfg = dict(getattr(exported, "pretrained_cfg", {}) or {})
    for key in SOURCE_KEYS:  # the backbone's own weights and results, which these weights no longer are
        cfg.pop(key, None)
    cfg["description"] = (
        f"domain {domain!r} of an adapterkit family on {model.backbone_name or type(model.backbone).__name__} "
        f"(backbone fingerprint {model.fingerprint}), adapters folded in"
    )
    cfg["notes"] = f"exported by adapterkit {__version__}"
    cfg["num_classes"] = info.num_classes
    if info.labels:
        cfg["label_names"] = list(info.labels)
    resolved = resolve_data_config(
        model.pretrained_cfg, info.data_config
    )  # the domain's, over the backbone's
    cfg.update({k: tuple(v) if isinstance(v, list) else v for k, v in resolved.items()})
    return cfg


def save_export(model: AdapterModel, domain: str, output: str | Path) -> nn.Module:
    """Export `domain` (`export_domain`) into a timm model folder: `model.safetensors` and `config.json` with
    the domain's preprocessing (its data config) and label names, which
    `timm.create_model("local-dir:OUTPUT", pretrained=True)` loads (for adapterkit's CIFAR ResNets, after
    `import adapterkit.backbones`). Each file is replaced whole, readable as a family's files are (0666 less
    the umask). Returns the exported model."""
    from timm.models import save_for_hf

    output = Path(output)
    check_output(output)
    exported = export_domain(model, domain)
    cfg = exported.pretrained_cfg
    data_config = {k: cfg[k] for k in DATA_CONFIG_KEYS if k in cfg}  # as export_domain set them
    labels = {"label_names": cfg["label_names"]} if "label_names" in cfg else None
    output.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=output, prefix=".export-") as tmp:
        save_for_hf(exported, tmp, model_config=labels, safe_serialization=True, data_config=data_config)
        for path in sorted(Path(tmp).iterdir()):
            atomic_write(output / path.name, path.read_bytes())
    return exported


def check_output(output: Path) -> None:
    """Refuse an export folder that is a file, or a family folder (its `adapterkit.json`): the export's
    `config.json` and `model.safetensors` would land among the family's files."""
    if output.exists() and not output.is_dir():
        raise ValueError(
            f"{output} is a file; the export is a folder (model.safetensors, config.json): pass a folder"
        )
    if (output / CONFIG_FILE).is_file():
        raise ValueError(
            f"{output} is an adapterkit family folder ({CONFIG_FILE}); the export is a plain timm model and"
            " would mix its files into the family's: pass a new folder, e.g. "
            f"{output.name or 'family'}-export/ beside it"
        )


def _check_head_is_classifier(
    exported: nn.Module, before: set[int], classifiers: tuple[nn.Module, ...], domain: str
) -> None:
    """Refuse when `reset_classifier` built more than the classifier(s) the domain's head fills: an auxiliary
    head (VOLO's token-labelling `aux_head`) or a norm before the linear (`NormLinear`, `BNLinear`) would
    run with fresh weights the adapted model never had."""
    filled = {id(c) for c in classifiers}
    extra = [
        f"{name} ({type(m).__name__})"
        for name, m in exported.named_modules()
        if id(m) not in before and id(m) not in filled and any(True for _ in m.parameters(recurse=False))
    ]
    if extra:
        raise ValueError(
            f"cannot export domain {domain!r}: the backbone's head has more than a linear classifier ("
            + ", ".join(extra[:3])
            + "), which the domain's linear head has no weights for; serve it unfolded with AdapterModel"
        )
