"""The on-disk format of a family: a backbone's fingerprint, the adapter rules, a shared basis and
one safetensors file per domain. See docs/format.md.

    adapterkit.json              format version, backbone name + fingerprint, rules, domain table
    basis.safetensors            shared `beta` per layer (only when a basis exists)
    domains/<name>.safetensors   everything one domain owns; metadata holds its DomainInfo
    README.md                    model card (written by the Hub mixin)

Only safetensors and JSON are written; nothing is pickled. Reading is in `load.py`.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import save
from torch import nn

from .config import check_domain_name

if TYPE_CHECKING:
    from .model import AdapterModel

FORMAT_VERSION = 1
CONFIG_FILE = "adapterkit.json"
BASIS_FILE = "basis.safetensors"
Fetch = Callable[[str], Path]


def domain_file(name: str) -> str:
    """Path of a domain's file inside a family (the name is validated first)."""
    return f"domains/{check_domain_name(name)}.safetensors"


def atomic_write(path: Path, data: bytes) -> None:
    """Write `data` to `path` via a temporary file and a rename: readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _write_if_changed(path: Path, data: bytes) -> None:
    if not (path.is_file() and path.read_bytes() == data):
        atomic_write(path, data)


# ---------------------------------------------------------------------- encode
def save_canonical(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    """safetensors bytes with a sorted header: the library's metadata order varies between calls,
    and equal content must give equal bytes (old domain files stay byte-identical, uploads no-op)."""
    data = save(tensors, metadata=metadata)
    n = int.from_bytes(data[:8], "little")
    header = json.dumps(json.loads(data[8 : 8 + n]), sort_keys=True, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)
    return len(header).to_bytes(8, "little") + header + data[8 + n :]


def domain_bytes(model: AdapterModel, name: str) -> bytes:
    """The safetensors bytes of one domain (deterministic: same tensors, same bytes)."""
    state = {k: v.detach().cpu().contiguous() for k, v in model.domain_state_dict(name).items()}
    meta = {"format": "pt", "adapterkit.format_version": str(FORMAT_VERSION)}
    meta["adapterkit.domain"] = json.dumps(model.domain_info(name).to_dict(), sort_keys=True)
    return save_canonical(state, meta)


def basis_bytes(model: AdapterModel) -> bytes | None:
    """The shared basis of every layer that has one, or None."""
    state = {f"{n}.beta": m.beta.detach().cpu().contiguous() for n, m in model.layers().items() if _width(m)}
    if not state:
        return None
    return save_canonical(state, {"format": "pt", "adapterkit.format_version": str(FORMAT_VERSION)})


def _width(layer: nn.Module) -> int:
    beta = getattr(layer, "beta", None)
    return 0 if beta is None else beta.shape[1]


def family_config(model: AdapterModel, domains: dict[str, dict[str, Any]]) -> dict[str, Any]:
    from . import __version__

    basis = {n: _width(m) for n, m in model.layers().items() if _width(m)}
    return {
        "format_version": FORMAT_VERSION,
        "library": "adapterkit",
        "library_version": __version__,
        "backbone": {
            "name": model.backbone_name,
            "fingerprint": model.fingerprint,
            "num_features": model.num_features,
            "in_chans": model.in_chans,
        },
        "adapter_config": model.config.to_dict(),
        "layers": {t.name: {"rule": t.rule, "kind": t.kind} for t in model.targets},
        "basis": {"file": BASIS_FILE, "ranks": basis} if basis else None,
        "domains": domains,
    }


def domain_entry(model: AdapterModel, name: str, data: bytes) -> dict[str, Any]:
    info = model.domain_info(name).to_dict()
    cost = model.domain_cost(name)
    return {
        "file": domain_file(name),
        "sha256": hashlib.sha256(data).hexdigest(),
        "num_classes": info["num_classes"],
        "labels": info["labels"],
        "metrics": info["metrics"],
        "parameters": cost["parameters"],
        "bytes": cost["bytes"],
    }


def family_files(
    model: AdapterModel, domains: Iterable[str] | None = None, previous: dict[str, Any] | None = None
) -> dict[str, bytes]:
    """Every file of a family as bytes: the given domains, the basis, `adapterkit.json`, `README.md`.

    `previous` is an existing `adapterkit.json`; its domain entries are kept when it was built on the
    same backbone, so a family grows one domain at a time.
    """
    from .card import model_card

    names = list(model.domains if domains is None else domains)
    for name in names:
        model.domain_info(name)  # KeyError for unknown domains before anything is built
    table: dict[str, dict[str, Any]] = {}
    if previous and previous.get("backbone", {}).get("fingerprint") == model.fingerprint:
        table = dict(previous.get("domains", {}))
    files = {}
    for name in names:
        files[domain_file(name)] = data = domain_bytes(model, name)
        table[name] = domain_entry(model, name, data)
    basis = basis_bytes(model)
    if basis is not None:
        files[BASIS_FILE] = basis
    config = family_config(model, dict(sorted(table.items())))
    files[CONFIG_FILE] = (json.dumps(config, indent=2, sort_keys=True) + "\n").encode()
    files["README.md"] = model_card(config).encode()
    return files


def save_family(model: AdapterModel, directory: str | Path, domains: Iterable[str] | None = None) -> Path:
    """Write a family folder. Domains already in the folder (same backbone) are kept, and a file is
    rewritten only when its bytes change, so adding a domain writes one new domain file."""
    directory = Path(directory)
    previous = None
    if (directory / CONFIG_FILE).is_file():
        previous = json.loads((directory / CONFIG_FILE).read_text())
        previous["domains"] = {
            n: e for n, e in previous.get("domains", {}).items() if (directory / domain_file(n)).is_file()
        }
    files = family_files(model, domains, previous)
    config = files.pop(CONFIG_FILE)
    for path, data in files.items():
        _write_if_changed(directory / path, data)
    atomic_write(directory / CONFIG_FILE, config)  # last: the folder is complete once it names a domain
    return directory
