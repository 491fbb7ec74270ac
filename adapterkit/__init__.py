"""adapterkit: parallel residual adapters on any timm backbone, trained domain after domain.

Example:
    >>> from adapterkit import AdapterModel
    >>> model = AdapterModel.from_backbone("resnet50.a1_in1k", pretrained=True)
    >>> model.add_domain("gtsrb", num_classes=43)

The names below are imported on first use, so `import adapterkit.cli` (and the commands that need no
model: push, pull, list, info) does not import torch or timm. Using `AdapterModel` registers the
paper's backbones (`cifar_resnet*`, `resnet26_decathlon`) with timm; `import adapterkit.backbones` does
it alone.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_LAZY = {"AdapterConfig": "config", "DomainInfo": "config", "AdapterModel": "model"}

if TYPE_CHECKING:
    from .config import AdapterConfig, DomainInfo
    from .model import AdapterModel

__all__ = ["AdapterConfig", "AdapterModel", "DomainInfo", "__version__"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value  # later lookups skip this function
        return value
    raise AttributeError(f"module 'adapterkit' has no attribute {name!r}")
