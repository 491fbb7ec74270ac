"""Reading a family (folder or Hub repo) into a model: checks first, then one atomic publish per domain.

Only JSON and safetensors are read. A fetch function maps a path inside the family to a local file,
so the same code reads a folder or a Hub repo one file at a time (see `hub.hub_fetch`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load
from torch import nn

from .config import AdapterConfig, DomainInfo, check_domain_name
from .family import BASIS_FILE, CONFIG_FILE, FORMAT_VERSION, Fetch, domain_file
from .inject import create_backbone, fingerprint, reparameterize

if TYPE_CHECKING:
    from .model import AdapterModel


def read_config(fetch: Fetch) -> dict[str, Any]:
    path = fetch(CONFIG_FILE)
    try:
        config = json.loads(Path(path).read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(
            f"{CONFIG_FILE} at {path} is not valid JSON ({e}); re-download or re-save the family"
        ) from e
    version = config.get("format_version") if isinstance(config, dict) else None
    if version != FORMAT_VERSION:
        raise ValueError(
            f"{path} has format_version {version!r}; this adapterkit reads version {FORMAT_VERSION}. "
            "Upgrade adapterkit (newer files) or re-save the family."
        )
    for name in config.get("domains", {}):
        check_domain_name(name)
    return config


def read_safetensors(
    path: Path, what: str, sha256: str | None = None
) -> tuple[dict[str, torch.Tensor], dict]:
    """Tensors and metadata of a safetensors file, with a clear error if it is corrupt or truncated."""
    data = Path(path).read_bytes()
    if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256:
        raise ValueError(
            f"{what} at {path} does not match the checksum in {CONFIG_FILE}: the file is corrupt or truncated; "
            "re-download it (force_download=True) or re-save the domain"
        )
    try:
        tensors = load(data)
        header_len = int.from_bytes(data[:8], "little")
        metadata = json.loads(data[8 : 8 + header_len]).get("__metadata__", {}) or {}
    except (SafetensorError, ValueError, json.JSONDecodeError) as e:
        raise ValueError(
            f"{what} at {path} is not a valid safetensors file ({e}): it is corrupt or truncated; "
            "re-download it (force_download=True) or re-save the domain"
        ) from e
    return tensors, metadata


def check_fingerprint(actual: str, config: dict[str, Any], source: str, force: bool) -> None:
    """Refuse a backbone whose weights differ from the family's, unless forced."""
    expected = config["backbone"]["fingerprint"]
    if actual != expected and not force:
        raise ValueError(
            f"the backbone's weights differ from the ones {source} was trained on "
            f"(fingerprint {actual[:19]}... vs {expected[:19]}...; backbone "
            f"{config['backbone'].get('name')!r}). Load the exact backbone weights, or pass force=True to attach "
            "the adapters anyway (outputs will not match the published ones)."
        )


def check_backbone(model: AdapterModel, config: dict[str, Any], source: str, force: bool) -> None:
    """Refuse a backbone whose weights or adapter plan differ from the family's."""
    check_fingerprint(model.fingerprint, config, source, force)
    layers = {t.name: {"rule": t.rule, "kind": t.kind} for t in model.targets}
    if layers != config["layers"]:
        diff = sorted(set(layers).symmetric_difference(config["layers"]))[:5]
        raise ValueError(
            f"the adapter layout of this backbone does not match {source} (differing layers: {diff or 'rules'}); "
            "use the backbone architecture and AdapterConfig the family was built with"
        )


def read_basis(model: AdapterModel, fetch: Fetch, config: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The family's basis per layer, checked to extend the model's current one (append-only)."""
    if not config.get("basis"):
        return {}
    tensors, _ = read_safetensors(fetch(BASIS_FILE), BASIS_FILE)
    layers = model.layers()
    basis = {}
    for key, beta in tensors.items():
        name = key.removesuffix(".beta")
        layer = layers.get(name)
        if (
            layer is None
            or not hasattr(layer, "beta")
            or beta.dim() != 2
            or beta.shape[0] != layer.beta.shape[0]
        ):
            raise ValueError(f"{BASIS_FILE}: {key} {tuple(beta.shape)} does not fit this backbone")
        old = layer.beta
        if old.shape[1] > beta.shape[1] or not torch.equal(beta[:, : old.shape[1]].to(old), old):
            raise ValueError(
                f"{BASIS_FILE}: the basis of {name} does not extend the one this model already uses; "
                "it was re-factorised. Load the family into a fresh AdapterModel instead."
            )
        basis[name] = beta.to(device=old.device, dtype=old.dtype)
    return basis


def install_basis(model: AdapterModel, basis: dict[str, torch.Tensor]) -> None:
    """Swap in longer bases; old domains read the same prefix, so their outputs do not change."""
    layers = model.layers()
    for name, beta in basis.items():
        layers[name].beta = beta


def build_domain(
    model: AdapterModel, name: str, path: Path, sha256: str | None = None, basis: dict | None = None
) -> tuple:
    """Read one domain file and build (info, adapters, head) without touching the model.

    `basis` holds the per-layer bases about to be installed; a domain may not read past them."""
    what = f"domain file for {name!r}"
    tensors, metadata = read_safetensors(path, what, sha256)
    try:
        info = DomainInfo(**json.loads(metadata["adapterkit.domain"]))
    except (KeyError, TypeError, json.JSONDecodeError) as e:
        raise ValueError(
            f"{what} at {path} has no valid adapterkit metadata; it was not written by adapterkit"
        ) from e
    if info.name != name:
        raise ValueError(f"{what} at {path} holds domain {info.name!r}; the file was renamed or misplaced")
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    layers = model.layers()
    by_length = sorted(layers, key=len, reverse=True)
    for key, t in tensors.items():
        if key.startswith("head."):
            prefix = "head"
        else:
            rest = key.removeprefix("layers.")
            prefix = next((n for n in by_length if rest.startswith(n + ".")), None) if rest != key else None
            if prefix is None:
                raise ValueError(f"{what}: tensor {key!r} belongs to no adapted layer of this backbone")
            key = rest
        grouped.setdefault(prefix, {})[key[len(prefix) + 1 :]] = t
    ref = next(model.backbone.parameters())
    adapters = {}
    for layer_name, layer in layers.items():
        if layer_name not in grouped:
            raise ValueError(
                f"{what}: no tensors for layer {layer_name!r}; the file does not fit this backbone"
            )
        try:
            adapters[layer_name] = layer.adapter_from_state(grouped[layer_name]).to(ref.device)
        except ValueError as e:
            raise ValueError(f"{what}: layer {layer_name!r}: {e}") from e
        needed = getattr(adapters[layer_name], "prefix_rank", 0)
        width = (basis or {}).get(layer_name, getattr(layer, "beta", None))
        if needed and (width is None or width.shape[1] < needed):
            raise ValueError(
                f"{what}: layer {layer_name!r} reads {needed} shared basis columns but the basis has "
                f"{0 if width is None else width.shape[1]}; the family's basis.safetensors is missing or older"
            )
    head_state = grouped.get("head", {})
    if set(head_state) != {"weight", "bias"} or head_state["weight"].shape != (
        info.num_classes,
        model.num_features,
    ):
        raise ValueError(
            f"{what}: head tensors do not fit {info.num_classes} classes x {model.num_features} features"
        )
    head = nn.Linear(model.num_features, info.num_classes, device=ref.device, dtype=ref.dtype)
    head.load_state_dict(head_state)
    return info, adapters, head


def local_fetch(directory: Path) -> Fetch:
    def fetch(path: str) -> Path:
        full = directory / path
        if not full.is_file():
            raise FileNotFoundError(f"{full} does not exist; is {directory} an adapterkit family folder?")
        return full

    return fetch


def load_family(
    cls: type[AdapterModel],
    source: str,
    *,
    domains: Iterable[str] | None = None,
    backbone: str | nn.Module | None = None,
    force: bool = False,
    **hub_kwargs: Any,
) -> AdapterModel:
    """Load a family from a folder or a Hub repo id (`hub_kwargs`: revision, token, cache_dir, ...).

    Args:
        domains: load only these domains (only their files are read or downloaded).
        backbone: the backbone to attach to (timm name or module); default: the recorded name,
            created with pretrained weights.
        force: attach even if the backbone's fingerprint differs.
    """
    fetch = source_fetch(source, **hub_kwargs)
    config = read_config(fetch)
    names = list(config["domains"]) if domains is None else list(domains)
    missing = [n for n in names if n not in config["domains"]]
    if missing:
        raise KeyError(
            f"domains {missing} are not in {source} (it has: {', '.join(config['domains']) or 'none'})"
        )
    if backbone is None or isinstance(backbone, str):
        name = backbone or config["backbone"]["name"]
        if name is None:
            raise ValueError(
                f"{source} was built on an nn.Module backbone with no name; pass backbone=<module>"
            )
        try:
            backbone = create_backbone(name, pretrained=True)
        except Exception as e:  # noqa: BLE001  (re-raised with the fix)
            raise ValueError(
                f"could not create backbone {name!r} with pretrained weights ({e}); pass backbone= with the "
                "timm module the family was trained on"
            ) from e
        backbone_name = name
    else:
        backbone_name = config["backbone"]["name"]
    backbone = reparameterize(backbone)
    digest = fingerprint(backbone)
    check_fingerprint(digest, config, source, force)  # before the backbone is wrapped
    adapter_config = AdapterConfig.from_dict(config["adapter_config"])
    model = cls(backbone, adapter_config, backbone_name=backbone_name, _fingerprint=digest)
    check_backbone(model, config, source, force)
    basis = read_basis(model, fetch, config)
    install_basis(model, basis)
    for name in names:
        entry = config["domains"][name]
        model._publish(*build_domain(model, name, fetch(domain_file(name)), entry.get("sha256"), basis))
    return model


def source_fetch(source: str, **hub_kwargs: Any) -> Fetch:
    """A fetch function for a local family folder or a Hub repo id."""
    if Path(source).is_dir():
        if hub_kwargs.get("revision"):
            raise ValueError(f"revision= applies to Hub repos; {source} is a local folder")
        return local_fetch(Path(source))
    from .hub import hub_fetch

    return hub_fetch(source, **hub_kwargs)


def load_domain(
    model: AdapterModel, source: str, name: str, *, force: bool = False, **hub_kwargs: Any
) -> None:
    """Add one domain of a family (folder or Hub repo) to a live model, reading only what it needs.

    Everything is read and checked before the model is touched; the domain becomes visible to
    forward calls in one step, and the outputs of the domains already loaded do not change.
    """
    check_domain_name(name)
    if name in model.domains:
        raise ValueError(f"domain {name!r} is already loaded; unload_domain({name!r}) first to replace it")
    fetch = source_fetch(source, **hub_kwargs)
    config = read_config(fetch)
    if name not in config["domains"]:
        raise KeyError(
            f"domain {name!r} is not in {source} (it has: {', '.join(config['domains']) or 'none'})"
        )
    check_backbone(model, config, source, force)
    basis = read_basis(model, fetch, config)
    built = build_domain(model, name, fetch(domain_file(name)), config["domains"][name].get("sha256"), basis)
    with model._lock:
        install_basis(model, basis)
        model._publish(*built)
