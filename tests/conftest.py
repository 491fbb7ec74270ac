"""Shared test fixtures.

Registry part: `huggingface_hub` reads `HF_ENDPOINT`, `HF_HOME` and `HF_HUB_DISABLE_TELEMETRY` when it
is imported, and timm imports it, so they are set here at import time, before any test module is
collected. The `registry` fixture then serves that endpoint from an in-process adapterkit registry
(the real client over real HTTP on loopback, never a mock).
"""

from __future__ import annotations

import atexit
import os
import shutil
import socket
import sys
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


REGISTRY_PORT = _free_port()
REGISTRY_TMP = Path(tempfile.mkdtemp(prefix="adapterkit-registry-tests-"))
atexit.register(shutil.rmtree, REGISTRY_TMP, ignore_errors=True)
os.environ["HF_ENDPOINT"] = f"http://127.0.0.1:{REGISTRY_PORT}"
os.environ["HF_HOME"] = str(REGISTRY_TMP / "hf_home")
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
for _var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE", "HF_HUB_DISABLE_XET", "HF_HUB_CACHE"):
    os.environ.pop(_var, None)
if "huggingface_hub" in sys.modules:
    warnings.warn(
        "huggingface_hub was imported before tests/conftest.py set HF_ENDPOINT; registry tests may hit the wrong endpoint.",
        stacklevel=1,
    )


@dataclass
class Registry:
    """A running registry for tests.

    Attributes:
        url: Base URL (also exported as `HF_ENDPOINT`).
        root: Folder holding the registry state.
        tokens: `"alice"` and `"bob"` (write tokens for their namespaces) and `"read"` (a read-only
            token of alice).
        server: The `RegistryServer`.
    """

    url: str
    root: Path
    tokens: dict[str, str] = field(default_factory=dict)
    server: Any = None


@pytest.fixture(scope="session")
def registry():
    """Session-wide registry serving `HF_ENDPOINT`, with tokens for alice, bob and a read-only one."""
    from adapterkit_registry import RegistryServer

    root = REGISTRY_TMP / "root"
    tokens = {
        "alice": "alice-write-token-for-tests",
        "bob": "bob-write-token-for-tests",
        "read": "alice-read-token",
    }
    users = {
        tokens["alice"]: ("alice", "write"),
        tokens["bob"]: ("bob", "write"),
        tokens["read"]: ("alice", "read"),
    }
    with RegistryServer(root, port=REGISTRY_PORT, tokens=users) as server:
        yield Registry(url=server.url, root=root, tokens=tokens, server=server)
