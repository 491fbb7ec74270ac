"""Export one domain as a plain timm model: adapters folded into the conv/linear weights, the
domain's norms and head in place, no adapter module left (zero inference overhead)."""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING

import torch
from torch import nn

from .layers import DomainLayer, not_foldable_reason

if TYPE_CHECKING:
    from .model import AdapterModel


def export_domain(model: AdapterModel, domain: str) -> nn.Module:
    """Fold `domain` into a copy of the backbone and return it as a plain timm model.

    Raises:
        ValueError: a layer cannot be folded exactly (Conv2dSame, StdConv2d, ScaledStdConv2d, ...);
            the message names the layer and why. Nothing is modified.
    """
    info = model.domain_info(domain)
    layers = model.layers()
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
    # Copy the backbone but not the other domains' tensors (they are only referenced, then dropped),
    # without touching the live model, which may be serving other threads.
    memo: dict[int, object] = {id(model.router): model.router}
    for layer in layers.values():
        for d, adapter in layer.adapters.items():
            if d != domain:
                memo[id(adapter)] = adapter
    exported = copy.deepcopy(model.backbone, memo)
    for name, layer in list(exported.named_modules()):
        if isinstance(layer, DomainLayer):
            parent_name, _, child = name.rpartition(".")
            parent = exported.get_submodule(parent_name) if parent_name else exported
            setattr(parent, child, layer.fold(domain))
    head = model.heads[domain]
    before = {id(m) for m in exported.modules()}
    exported.reset_classifier(info.num_classes)
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
    cfg = dict(getattr(exported, "pretrained_cfg", {}) or {})
    cfg["num_classes"] = info.num_classes
    if info.labels:
        cfg["label_names"] = list(info.labels)
    if info.data_config:
        cfg.update(
            {k: v for k, v in info.data_config.items() if k in ("mean", "std", "input_size", "crop_pct")}
        )
    exported.pretrained_cfg = cfg
    exported.default_cfg = cfg
    exported.requires_grad_(True)
    return exported.eval()


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
