"""adapterkit registry: a self-hostable server speaking the subset of the Hugging Face Hub HTTP API
that `huggingface_hub`, the `hf` CLI, timm and PEFT use.

Example:
    >>> from adapterkit_registry import RegistryServer
    >>> with RegistryServer("/tmp/reg", tokens={"alice-token-0123456789": ("alice", "write")}) as srv:
    ...     pass  # export HF_ENDPOINT=srv.url before importing huggingface_hub  # doctest: +SKIP
"""

from .app import create_app
from .auth import create_token
from .context import RegistryConfig
from .fsck import fsck
from .server import RegistryServer
from .storage import Storage

__all__ = ["RegistryConfig", "RegistryServer", "Storage", "create_app", "create_token", "fsck"]
