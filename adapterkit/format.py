"""The on-disk format of a family (see docs/format.md): names, atomic writes and readers.

    adapterkit.json              format version, backbone (name, weights, fingerprint), adapter rules, basis
    basis.safetensors            shared `beta` per layer (only when a basis exists)
    domains/<name>.safetensors   everything one domain owns
    domains/<name>.json          that domain's entry: classes, labels, metrics, sizes, sha256 of its tensors
    README.md                    model card

Each domain's metadata lives next to its tensors, so adding files never drops a domain: a folder or a
repo holds the domains whose two files it holds (format versions 2 and 3; 3 marks domain files whose
routing signatures may hold 8-bit codes, which releases before it cannot read). Version 1 kept the domain
table in `adapterkit.json`; it is still read.

Only JSON and safetensors are read or written; nothing is pickled. This module imports neither torch
nor safetensors at import time, so commands that only read JSON start fast.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .config import check_domain_name

logger = logging.getLogger(__name__)

if TYPE_CHECKING:
    import torch

# 3: version 2's files, with signatures that may hold 8-bit codes; 4: signatures that may also hold an
# open-set calibration (signature.py)
FORMAT_VERSION = 4
READABLE_VERSIONS = (1, 2, 3, 4)
CONFIG_FILE = "adapterkit.json"
BASIS_FILE = "basis.safetensors"
DOMAINS_DIR = "domains"
Fetch = Callable[[str], Path]


def domain_file(name: str) -> str:
    """Path of a domain's tensors inside a family (the name is validated first)."""
    return f"{DOMAINS_DIR}/{check_domain_name(name)}.safetensors"


def domain_entry_file(name: str) -> str:
    """Path of a domain's JSON entry inside a family."""
    return f"{DOMAINS_DIR}/{check_domain_name(name)}.json"


def _domain_files(paths: list[str]) -> dict[str, set[str]]:
    """Domain name -> the kinds of its files (`json`, `safetensors`) that a listing of family files holds."""
    found: dict[str, set[str]] = {}
    for path in paths:
        folder, _, file = path.rpartition("/")
        stem, dot, ext = file.rpartition(".")
        if folder == DOMAINS_DIR and dot and ext in ("json", "safetensors"):
            try:
                found.setdefault(check_domain_name(stem), set()).add(ext)
            except ValueError:
                continue  # not a file adapterkit writes; never a path we would open
    return found


def domain_names(paths: list[str]) -> list[str]:
    """The domains a listing of family files holds complete (both files), sorted."""
    return sorted(n for n, kinds in _domain_files(paths).items() if len(kinds) == 2)


def half_domains(paths: list[str]) -> dict[str, str]:
    """Domains of which a listing holds only one of the two files: name -> that file."""
    return {
        n: f"{DOMAINS_DIR}/{n}.{kind}"
        for n, kinds in sorted(_domain_files(paths).items())
        if len(kinds) == 1
        for kind in kinds
    }


# ---------------------------------------------------------------------- writing
def atomic_write(path: Path, data: bytes) -> None:
    """Write `data` to `path` via a temporary file and a rename: readers never see half a file.

    The file gets the permissions a plain `open(path, "wb")` would (0666 less the umask), not the
    0600 of a temporary file, so a web server or another user can read a published family."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)  # the only portable way to read it; restored at once
    os.umask(mask)
    return mask


def write_if_changed(path: Path, data: bytes) -> bool:
    """`atomic_write` unless the file already holds exactly `data`; True if it wrote."""
    if path.is_file() and path.read_bytes() == data:
        return False
    atomic_write(path, data)
    return True


def json_bytes(obj: Any) -> bytes:
    """Sorted, indented JSON: the same content always gives the same bytes."""
    return (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode()


def save_canonical(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    """safetensors bytes with a sorted header: the library's metadata order varies between calls,
    and equal content must give equal bytes (old domain files stay byte-identical, uploads no-op)."""
    from safetensors.torch import save

    data = save(tensors, metadata=metadata)
    n = int.from_bytes(data[:8], "little")
    header = json.dumps(json.loads(data[8 : 8 + n]), sort_keys=True, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)
    return len(header).to_bytes(8, "little") + header + data[8 + n :]


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ---------------------------------------------------------------------- reading
def read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        value = json.loads(Path(path).read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(
            f"{what} at {path} is not valid JSON ({e}); re-download or re-save the family"
        ) from e
    if not isinstance(value, dict):
        raise ValueError(f"{what} at {path} is not a JSON object; re-download or re-save the family")
    return value


def read_config(
    fetch: Fetch,
    files: list[str] | None = None,
    domains: Iterable[str] | None = None,
    where: str = "the family",
) -> dict[str, Any]:
    """The family's `adapterkit.json` with its domain table, whatever the format version.

    Args:
        fetch: maps a path inside the family to a local file.
        files: every path in the family (a folder listing or the repo's files); version 2 families
            find their domains there.
        domains: read only these domains' entries (a Hub repo then downloads only their JSON); a name
            the family lacks raises KeyError listing the ones it has.
        where: the family's name in messages.

    Returns:
        The family config; `domains` maps each (requested) domain to its entry.
    """
    path = fetch(CONFIG_FILE)
    config = read_json(path, CONFIG_FILE)
    version = config.get("format_version")
    if version not in READABLE_VERSIONS:
        raise ValueError(
            f"{path} has format_version {version!r}; this adapterkit reads versions {READABLE_VERSIONS}. "
            "Upgrade adapterkit (newer files) or re-save the family."
        )
    table = config.get("domains", {}) if version == 1 else dict.fromkeys(domain_names(files or []))
    for name in table:
        check_domain_name(name)
    halves = {} if version == 1 else half_domains(files or [])
    names = list(table) if domains is None else list(domains)
    missing = [n for n in names if n not in table]
    if missing:
        half = [f"{n} has only {halves[n]}" for n in missing if n in halves]
        raise KeyError(
            f"domains {missing} are not in {where} (it has: {', '.join(table) or 'none'})"
            + (f"; {'; '.join(half)} (a domain needs both its .json and .safetensors)" if half else "")
        )
    if domains is None and halves:
        logger.warning(
            "%s: domain(s) %s have one of their two files and are not loaded (%s); copy or push the missing one",
            where,
            ", ".join(halves),
            "; ".join(f"{n}: {f}" for n, f in halves.items()),
        )
    config["domains"] = {n: table[n] if version == 1 else read_domain_entry(fetch, n) for n in names}
    return config


def read_domain_entry(fetch: Fetch, name: str) -> dict[str, Any]:
    path = domain_entry_file(name)
    entry = read_json(fetch(path), path)
    if entry.get("name") != name:
        raise ValueError(f"{path} describes domain {entry.get('name')!r}; the file was renamed or misplaced")
    return entry


def read_safetensors(
    path: Path, what: str, expected_sha256: str | None = None
) -> tuple[dict[str, torch.Tensor], dict]:
    """Tensors and metadata of a safetensors file, with a clear error if it is corrupt or truncated."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    data = Path(path).read_bytes()
    if expected_sha256 is not None and sha256(data) != expected_sha256:
        raise ValueError(
            f"{what} at {path} does not match its recorded checksum: the file is corrupt or truncated; "
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
