"""adapterkit: parallel residual adapters on any timm backbone, trained domain after domain.

Example:
    >>> from adapterkit import AdapterModel
    >>> model = AdapterModel.from_backbone("resnet50.a1_in1k", pretrained=True)
    >>> model.add_domain("gtsrb", num_classes=43)
"""

__version__ = "0.1.0"

from . import backbones  # noqa: F401,E402  (registers the paper's backbones with timm)
from .config import AdapterConfig, DomainInfo  # noqa: E402
from .model import AdapterModel  # noqa: E402

__all__ = ["AdapterConfig", "AdapterModel", "DomainInfo", "__version__"]
