"""Saving a family: a model's domains, basis and rules encoded as the files of `format.py`.

Every file is deterministic (same tensors, same bytes), so saving again or adding a domain leaves the
other domains' files byte-identical, and a Hub upload of unchanged files is a no-op. Reading is in
`load.py`; pushing to the Hub in `hub.py`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .format import (
    BASIS_FILE,
    CONFIG_FILE,
    FORMAT_VERSION,
    atomic_write,
    domain_entry_file,
    domain_file,
    json_bytes,
    read_config,
    read_safetensors,
    save_canonical,
    sha256,
    write_if_changed,
)
from .sources import Source, local_source

if TYPE_CHECKING:
    from .model import AdapterModel


def _key(directory: str | Path, name: str) -> tuple[str, str]:
    return str(Path(directory).resolve()), name


def remember_loaded(
    model: AdapterModel, source: str | Path, name: str, path: Path, digest: str | None = None
) -> None:
    """Record that `model` loaded domain `name` from the family folder `source` (file `path`, whose
    `digest` the load checked, if its entry had one); a Hub source records nothing."""
    if Path(source).is_dir():
        model.file_versions[_key(source, name)] = digest or sha256(Path(path).read_bytes())


def domain_bytes(model: AdapterModel, name: str) -> bytes:
    """The safetensors bytes of one domain; its `DomainInfo` is in the metadata, so the file describes
    itself."""
    state = {k: v.detach().cpu().contiguous() for k, v in model.domain_state_dict(name).items()}
    meta = {"format": "pt", "adapterkit.format_version": str(FORMAT_VERSION)}
    meta["adapterkit.domain"] = json.dumps(model.domain_info(name).to_dict(), sort_keys=True)
    return save_canonical(state, meta)


def domain_entry(model: AdapterModel, name: str, data: bytes) -> dict[str, Any]:
    """The JSON written next to a domain's tensors: what listing a family shows without reading them."""
    cost = model.domain_cost(name)
    return model.domain_info(name).to_dict() | {
        "file": domain_file(name),
        "sha256": sha256(data),
        "parameters": cost["parameters"],
        "bytes": cost["bytes"],
    }


def basis_bytes(model: AdapterModel) -> bytes | None:
    """The shared basis of every layer that has one, or None."""
    basis = model.basis()
    if not basis:
        return None
    state = {f"{n}.beta": b.detach().cpu().contiguous() for n, b in basis.items()}
    return save_canonical(state, {"format": "pt", "adapterkit.format_version": str(FORMAT_VERSION)})


def family_config(model: AdapterModel) -> dict[str, Any]:
    """`adapterkit.json`: what every domain of the family shares."""
    from . import __version__

    basis = model.basis()
    return {
        "format_version": FORMAT_VERSION,
        "library": "adapterkit",
        "library_version": __version__,
        "backbone": {
            "name": model.backbone_name,
            "weights": model.backbone_weights,
            "fingerprint": model.fingerprint,
            "num_features": model.num_features,
            "in_chans": model.in_chans,
        },
        "adapter_config": model.config.to_dict(),
        "layers": {t.name: {"rule": t.rule, "kind": t.kind} for t in model.targets},
        "basis": (
            {
                "file": BASIS_FILE,
                "ranks": {n: b.shape[1] for n, b in basis.items()},
                "history": model.basis_history,
            }
            if basis
            else None
        ),
    }


def family_files(
    model: AdapterModel, domains: Iterable[str] | None = None, others: dict[str, dict] | None = None
) -> dict[str, bytes]:
    """The files that publish `domains` (default: all): their tensors and entries, the basis,
    `adapterkit.json` and the model card. `others` are entries of domains already in the destination,
    listed in the card too."""
    from .card import model_card

    names = list(model.domains if domains is None else domains)
    for name in names:
        model.domain_info(name)  # KeyError for unknown domains before anything is built
    files, table = {}, dict(others or {})
    for name in names:
        files[domain_file(name)] = data = domain_bytes(model, name)
        table[name] = domain_entry(model, name, data)
        files[domain_entry_file(name)] = json_bytes(table[name])
    basis = basis_bytes(model)
    if basis is not None:
        files[BASIS_FILE] = basis
    config = family_config(model)
    files[CONFIG_FILE] = json_bytes(config)
    files["README.md"] = model_card(config | {"domains": dict(sorted(table.items()))}).encode()
    return files


def family_basis(source: Source, config: dict[str, Any]) -> dict:
    """The shared basis a family's files hold (layer -> beta), or {} without one."""
    if not config.get("basis"):
        return {}
    tensors, _ = read_safetensors(source.fetch(BASIS_FILE), BASIS_FILE)
    return {k.removesuffix(".beta"): t for k, t in tensors.items()}


def check_compatible(
    local: dict[str, Any], remote: dict[str, Any], where: str, force: bool | None, new: str = "repo or folder"
) -> None:
    """A family has one backbone: another architecture or adapter layout (rules, topology) is always
    refused (its domains could not load); other weights of the same layout only with `force` (None: no
    force to offer)."""
    if remote["layers"] != local["layers"]:
        raise ValueError(
            f"{where} holds a family on another backbone architecture or adapter layout "
            f"({remote['backbone'].get('name')!r}, not {local['backbone'].get('name')!r}; or another "
            f"AdapterConfig): its domains and these could not load into one model; use a new {new}"
        )
    if remote["backbone"]["fingerprint"] != local["backbone"]["fingerprint"] and not force:
        anyway = "" if force is None else ", or pass force=True (--force) to publish there anyway"
        raise ValueError(
            f"{where} holds a family trained on other backbone weights ({remote['backbone'].get('name')!r}); "
            f"use a new {new}{anyway}"
        )


def folder_entries(model: AdapterModel, directory: Path) -> dict[str, dict]:
    """Entries of the domains a folder already holds (any version). A family of another layout or on
    other weights, or whose basis the model's does not extend, is refused: saving would break its domains."""
    if directory.exists() and not directory.is_dir():
        raise ValueError(f"{directory} is a file: save_pretrained writes a folder; pass a folder's path")
    if not (directory / CONFIG_FILE).is_file():
        return {}
    source = local_source(directory)
    config = read_config(source.fetch, source.files)
    check_compatible(family_config(model), config, str(directory), force=None, new="folder to save into")
    if config.get("basis"):
        from .basis import check_extends

        check_extends(
            family_basis(source, config), model.basis(), f"this model's basis (against {directory})"
        )
    return {n: e for n, e in config["domains"].items() if (directory / domain_file(n)).is_file()}


def check_replacements(
    model: AdapterModel, directory: Path, files: dict[str, bytes], overwrite: bool
) -> None:
    """Refuse to replace a domain file of `directory` by different bytes unless `overwrite`, or the file
    is the version of that domain this model loaded from the folder or saved there (then the change is
    this model's own: a retrained or resumed domain). Identical bytes are a no-op."""
    if overwrite:
        return
    known = model.file_versions
    clashes, recast = [], []
    for name in model.domains:
        path = directory / domain_file(name)
        if domain_file(name) not in files or not path.is_file():
            continue
        data, new = path.read_bytes(), files[domain_file(name)]
        on_disk = sha256(data)
        if on_disk == sha256(new):
            continue
        if known.get(_key(directory, name)) != on_disk:
            clashes.append(name)
        elif (was := _dtypes(data)) != (now := _dtypes(new)):
            recast.append(f"{name!r} ({'/'.join(sorted(was))} -> {'/'.join(sorted(now))})")
    if recast:
        raise ValueError(
            f"saving would rewrite {', '.join(recast)} of {directory} in another dtype (after model.half() or "
            "model.to(dtype), say), losing the precision it was saved in; nothing was written. Save into "
            "another folder, cast the model back first, or pass overwrite=True (CLI: --overwrite) to rewrite it"
        )
    if clashes:
        names = ", ".join(map(repr, clashes))
        raise ValueError(
            f"{directory} already holds a different domain {names} (not the version this model loaded from "
            f"or saved to that folder); saving would replace it and nothing was written. Pass overwrite=True "
            f"(`model.save_pretrained(folder, overwrite=True)`; CLI: --overwrite) to replace "
            "it, rename yours, or save into another folder"
        )


def _dtypes(data: bytes) -> set[str]:
    """The floating-point dtypes of a safetensors file's tensors (F32, BF16, ...), from its header."""
    header = json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])
    dtypes = (entry["dtype"] for key, entry in header.items() if key != "__metadata__")
    return {d for d in dtypes if d.startswith(("F", "BF"))}


def save_family(
    model: AdapterModel,
    directory: str | Path,
    domains: Iterable[str] | None = None,
    *,
    overwrite: bool = False,
) -> Path:
    """Write a family folder. Domains already in the folder (same backbone) are kept, and a file is
    rewritten only when its bytes change, so adding a domain writes its two files (and the basis).

    A domain the folder already holds with other content is replaced only with `overwrite=True`, or
    when the folder's file is the version this model loaded from it or saved there (`check_replacements`).
    """
    directory = Path(directory)
    others = folder_entries(model, directory)
    files = family_files(model, domains, others)
    check_replacements(model, directory, files, overwrite)
    for name, entry in others.items():  # a version-1 folder: give its domains their own entries
        if not (directory / domain_entry_file(name)).is_file() and domain_entry_file(name) not in files:
            files[domain_entry_file(name)] = json_bytes(entry | {"name": name})
    config = files.pop(CONFIG_FILE)
    for path, data in files.items():
        write_if_changed(directory / path, data)
    atomic_write(directory / CONFIG_FILE, config)
    for name in model.domains:
        if domain_file(name) in files:
            model.file_versions[_key(directory, name)] = sha256(files[domain_file(name)])
    return directory


PULLED_FILE = ".adapterkit-pulled.json"
"""In a family folder: the SHA-256 of each domain file as `pull_family` last wrote it, so a later pull can
tell a domain unchanged since (updated freely) from one trained or edited here (kept unless `overwrite`)."""


def pulled_versions(directory: Path) -> dict[str, str]:
    """Domain name -> SHA-256 of its file as last pulled into `directory` ({} when nothing was)."""
    path = directory / PULLED_FILE
    try:
        record = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        raise ValueError(
            f"{path} is not valid JSON ({e}); delete it (a later pull then needs overwrite)"
        ) from e
    return {str(k): str(v) for k, v in record.get("domains", {}).items()}


def check_pull(
    directory: Path, remote: Source, config: dict[str, Any], names: list[str], overwrite: bool
) -> None:
    """Refuse a pull that would replace a domain of `directory` which differs from the remote's and is not
    the version an earlier pull wrote (so it was trained, resumed or edited here), unless `overwrite`."""
    if overwrite:
        return
    pulled = pulled_versions(directory)
    clashes = []
    for name in names:
        path = directory / domain_file(name)
        if not path.is_file():
            continue
        theirs = config["domains"][name].get("sha256") or sha256(remote.fetch(domain_file(name)).read_bytes())
        on_disk = sha256(path.read_bytes())
        if on_disk not in (theirs, pulled.get(name)):
            clashes.append(name)
    if clashes:
        raise ValueError(
            f"{directory} holds {', '.join(map(repr, clashes))} changed since it was last pulled (trained, "
            "resumed or saved there) and different from the remote's; pulling would replace it and nothing "
            "was written. Push yours first, pull into another folder, or pass overwrite=True (CLI: "
            "--overwrite) to replace it with the remote's"
        )


def record_pulled(directory: Path, files: dict[str, str]) -> None:
    """Note the SHA-256 of the domain files a pull wrote (name -> digest), beside the earlier ones."""
    versions = pulled_versions(directory) | files
    atomic_write(directory / PULLED_FILE, json_bytes({"domains": dict(sorted(versions.items()))}))
