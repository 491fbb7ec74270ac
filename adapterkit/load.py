"""Reading a family (folder or Hub repo) into a model: every file read and checked before the model
is touched, then one `publish_domain` per domain.

Only JSON and safetensors are read. The backbone is rebuilt from what the family records (timm's
pretrained weights, an `hf-hub:` repo, a local weights file, or a seeded random initialisation) and
checked against the recorded fingerprint.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .config import AdapterConfig, DomainInfo, check_domain_name
from .family import remember_loaded
from .format import BASIS_FILE, domain_file, read_config, read_safetensors
from .inject import fingerprint, rebuild_backbone, reparameterize
from .layers.table import Packed, settings_of
from .signature import DomainSignature
from .sources import Source, open_source
from .transforms import resolve_data_config

if TYPE_CHECKING:
    from .model import AdapterModel


FORCE_ADVICE = (
    "Load the exact backbone weights, or pass force=True to attach the adapters anyway (outputs will not "
    "match the published ones)."
)


def check_fingerprint(
    actual: str, config: dict[str, Any], source: str, force: bool, advice: str = FORCE_ADVICE
) -> None:
    """Refuse a backbone whose weights differ from the family's, unless forced; `advice` says what to do."""
    expected = config["backbone"]["fingerprint"]
    if actual != expected and not force:
        raise ValueError(
            f"the backbone's weights differ from the ones {source} was trained on "
            f"(fingerprint {actual[:19]}... vs {expected[:19]}...; backbone "
            f"{config['backbone'].get('name')!r}). {advice}"
        )


def check_backbone(
    model: AdapterModel, config: dict[str, Any], source: str, force: bool, advice: str = FORCE_ADVICE
) -> None:
    """Refuse a backbone whose adapter plan (architecture) or weights differ from the family's; the plan
    first, since no `force` can attach adapters to layers that are not there."""
    layers = {t.name: {"rule": t.rule, "kind": t.kind} for t in model.targets}
    if layers != config["layers"]:
        differing = sorted(set(layers).symmetric_difference(config["layers"]))
        raise _layout_error(config, source, differing, None if advice is FORCE_ADVICE else advice)
    check_fingerprint(model.fingerprint, config, source, force, advice)


def check_architecture(module: nn.Module, config: dict[str, Any], source: str) -> None:
    """Before a backbone is wrapped: refuse one that lacks a layer the family adapted (another
    architecture, which no `force` can attach to)."""
    names = {n for n, _ in module.named_modules()}
    missing = [n for n in config["layers"] if n not in names]
    if missing:
        raise _layout_error(config, source, missing)


def _layout_error(
    config: dict[str, Any], source: str, differing: list[str], advice: str | None = None
) -> ValueError:
    """`advice`: what to do instead of rebuilding the backbone (a service cannot: serve_domains.py)."""
    name = config["backbone"].get("name")
    fix = advice or (
        f"use the backbone architecture{f' ({name!r})' if name else ''} and AdapterConfig the family was "
        "built with"
    )
    built = f"built on {name!r}; " if name else ""
    return ValueError(
        f"the adapter layout of this backbone does not match {source} ({built}differing layers: "
        f"{differing[:5] or 'rules'}). {fix[0].upper()}{fix[1:]}"
    )


def read_basis(model: AdapterModel, source: Source, config: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The family's basis per layer, shaped for this model (whether it extends the model's current basis
    is checked by `AdapterModel.extend_basis`)."""
    if not config.get("basis"):
        return {}
    tensors, _ = read_safetensors(source.fetch(BASIS_FILE), BASIS_FILE)
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
        basis[name] = beta.to(device=layer.beta.device, dtype=layer.beta.dtype)
    return basis


def _group(model: AdapterModel, tensors: dict[str, torch.Tensor], what: str) -> dict[str, dict]:
    """A domain file's tensors by owner: each adapted layer's name, and `head`."""
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    names = set(model.layers())
    for key, t in tensors.items():
        if key.startswith(("head.", "signature.")):
            prefix = key.partition(".")[0]
        else:
            rest = key.removeprefix("layers.")
            prefix = rest.rpartition(".")[0] if rest != key else ""
            while prefix and prefix not in names:  # the longest layer name the key starts with
                prefix = prefix.rpartition(".")[0]
            if not prefix:
                raise ValueError(f"{what}: tensor {key!r} belongs to no adapted layer of this backbone")
            key = rest
        grouped.setdefault(prefix, {})[key[len(prefix) + 1 :]] = t
    return grouped


def build_domain(
    model: AdapterModel, name: str, path: Path, sha256: str | None = None, basis: dict | None = None
) -> tuple[DomainInfo, dict[str, nn.Module | Packed], nn.Module, DomainSignature | None]:
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
    if info.data_config is not None:  # refused here, before a request could allocate what it asks for
        resolve_data_config(model.pretrained_cfg, info.data_config, what=f"{what} at {path}: data config")
    grouped = _group(model, tensors, what)
    ref = next(model.backbone.parameters())
    adapters = {}
    for layer_name, layer in model.layers().items():
        if layer_name not in grouped:
            raise ValueError(
                f"{what}: no tensors for layer {layer_name!r}; the file does not fit this backbone"
            )
        state = grouped[layer_name]
        build = lambda: layer.adapter_from_state(state).to(ref.device)  # noqa: B023, E731 (called at once)
        try:
            # packed as loaded domains are kept (layers/table.py), without a module per domain
            adapters[layer_name] = layer.adapters.pack_state(state, build)
        except ValueError as e:
            raise ValueError(f"{what}: layer {layer_name!r}: {e}") from e
        needed = getattr(settings_of(adapters[layer_name]), "shared_columns", 0)
        width = (basis or {}).get(layer_name, getattr(layer, "beta", None))
        if needed and (width is None or width.shape[1] < needed):
            raise ValueError(
                f"{what}: layer {layer_name!r} reads {needed} shared basis columns but the basis has "
                f"{0 if width is None else width.shape[1]}; the family's basis.safetensors is missing or older"
            )
    head_state = grouped.get("head", {})
    shape = (info.num_classes, model.num_features)
    if set(head_state) != {"weight", "bias"} or head_state["weight"].shape != shape:
        raise ValueError(
            f"{what}: head tensors do not fit {info.num_classes} classes x {model.num_features} features"
        )
    head = nn.Linear(model.num_features, info.num_classes, device=ref.device, dtype=ref.dtype)
    head.load_state_dict(head_state)
    return info, adapters, head, _signature(grouped.get("signature"), what, ref.device)


def _signature(state: dict | None, what: str, device) -> DomainSignature | None:
    """The domain's routing signature, or None for a file written before signatures existed."""
    if state is None:
        return None
    mean, log_var = state.get("mean"), state.get("log_var")
    if mean is not None and mean.dim() == 1 and "log_weight" not in state:  # one Gaussian (before mixtures)
        state = dict(state, mean=mean[None], log_var=log_var[None] if log_var is not None else None)
        state["log_weight"] = torch.zeros(1)
    shape = (
        tuple(state["mean"].shape) if state.get("mean") is not None and state["mean"].dim() == 2 else (1, 0)
    )
    signature = DomainSignature(shape[1], shape[0], device=device)
    try:
        signature.load_state_dict(state)
    except RuntimeError as e:
        raise ValueError(f"{what}: its signature is malformed ({e}); re-save the domain") from e
    return signature


HUB_KEYS = {"revision", "token", "cache_dir", "local_files_only", "force_download"}  # passed to the Hub


def _architecture(name: str) -> str | None:
    """A timm name without its pretrained tag (`resnet50.a1_in1k` -> `resnet50`); None for `hf-hub:` and
    `local-dir:` names, whose architecture is in their files."""
    from timm.models import get_arch_name

    return None if ":" in name else get_arch_name(name)


def _backbone_for(config: dict[str, Any], source: str, backbone: str | nn.Module | None, weights: Any):
    """(module, name, weights record): the recorded backbone rebuilt, or the one the caller gives."""
    recorded = config["backbone"]
    if isinstance(backbone, nn.Module):
        return backbone, recorded["name"], recorded.get("weights")
    name = backbone or recorded["name"]
    if name is None:
        raise ValueError(f"{source} was built on an nn.Module backbone with no name; pass backbone=<module>")
    archs = {_architecture(name), _architecture(recorded["name"] or name)}
    if None not in archs and len(archs) > 1:
        raise ValueError(
            f"{source} was trained on backbone {recorded['name']!r}, and backbone={name!r} is another "
            "architecture, whose layers its domains do not fit: leave backbone= out (the recorded backbone is "
            "rebuilt), or pass the module it was trained on"
        )
    module, record = rebuild_backbone(
        name, recorded.get("weights") if name == recorded["name"] else None, weights
    )
    return module, name, record


def load_family(
    cls: type[AdapterModel],
    source: str,
    *,
    domains: Iterable[str] | None = None,
    backbone: str | nn.Module | None = None,
    backbone_weights: str | Path | None = None,
    force: bool = False,
    **hub_kwargs: Any,
) -> AdapterModel:
    """Load a family from a folder or a Hub repo id (`hub_kwargs`: revision, token, cache_dir, ...).

    Args:
        domains: load only these domains (only their files are read or downloaded); `[]` opens the
            family with no domain, for training a new one into it.
        backbone: the backbone to attach to (timm name or module); default: the recorded one, rebuilt
            with the recorded weights.
        backbone_weights: a local safetensors file to use instead of a recorded one that has moved.
        force: attach even if the backbone's fingerprint differs.
    """
    unknown = sorted(set(hub_kwargs) - HUB_KEYS)
    if unknown:
        raise TypeError(
            f"unknown argument(s) {unknown}: from_pretrained takes domains, backbone, "
            f"backbone_weights, force and {sorted(HUB_KEYS)}"
        )
    if isinstance(domains, str):
        raise TypeError(f"domains={domains!r}: pass a list of names, domains=[{domains!r}]")
    src = open_source(source, **hub_kwargs)
    config = read_config(src.fetch, src.files, domains, where=src.label)
    names = list(config["domains"])
    module, name, record = _backbone_for(config, source, backbone, backbone_weights)
    module = reparameterize(module)
    digest = fingerprint(module)
    check_architecture(module, config, source)  # before the backbone is wrapped
    check_fingerprint(digest, config, source, force)
    adapter_config = AdapterConfig.from_dict(config["adapter_config"])
    model = cls(module, adapter_config, backbone_name=name, backbone_weights=record, _fingerprint=digest)
    check_backbone(model, config, source, force)
    basis = read_basis(model, src, config)
    history = (config.get("basis") or {}).get("history", [])
    if basis:
        model.extend_basis(basis, history=history)
    for name in names:
        entry = config["domains"][name]
        path = src.fetch(domain_file(name))
        info, adapters, head, signature = build_domain(model, name, path, entry.get("sha256"))
        model.publish_domain(info, adapters, head, signature=signature)
        remember_loaded(model, source, name, path, entry.get("sha256"))  # changes may be saved back there
    return model.eval()


def load_domain(
    model: AdapterModel,
    source: str,
    name: str,
    *,
    as_name: str | None = None,
    force: bool = False,
    **hub_kwargs: Any,
) -> None:
    """Add one domain of a family (folder or Hub repo) to a live model, reading only what it needs.

    Everything is read and checked before the model is touched; the domain (and any basis columns it
    needs) becomes visible to forward calls in one step, and the domains already loaded do not change.
    `as_name` loads it under another name (for example a second revision beside the first).
    """
    check_domain_name(name)
    target = check_domain_name(as_name or name)
    if target in model.domains:
        raise ValueError(
            f"domain {target!r} is already loaded; unload_domain({target!r}) first to replace it"
        )
    src = open_source(source, **hub_kwargs)
    config = read_config(src.fetch, src.files, [name], where=src.label)
    check_backbone(model, config, source, force)
    basis = read_basis(model, src, config)
    path = src.fetch(domain_file(name))
    info, adapters, head, signature = build_domain(
        model, name, path, config["domains"][name].get("sha256"), basis
    )
    info.name = target
    if signature is not None:  # a signature the loaded domains' cannot share a routing pass with
        from .router import check_maps

        fix = "refit it with maps={others} (model.fit_signature(domain, batches, maps={others})), save it and add it again"
        check_maps(model, target, int(signature.maps), fix)
    history = (config.get("basis") or {}).get("history", [])
    model.publish_domain(info, adapters, head, basis=basis or None, history=history, signature=signature)
    if target == name:
        remember_loaded(model, source, name, path, config["domains"][name].get("sha256"))
