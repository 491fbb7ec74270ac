"""fsck of the Xet store: every stored xorb against its hash, every registered file against its xorbs."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from .blobs import read_json
from .xet_format import XetError, file_hash, hash_to_hex, hex_to_hash, parse_xorb

if TYPE_CHECKING:
    from .xet_store import XetStore


def _check_xorb(path: Path) -> str | None:
    name = path.name
    try:
        xorb = parse_xorb(path.read_bytes())
        meta = read_json(path.with_name(name + ".json"))
    except XetError as e:
        return f"xet xorb {name}: {e.message}"
    except (OSError, ValueError) as e:
        return f"xet xorb {name}: unreadable ({e}); re-upload the files that use it"
    if hash_to_hex(xorb.hash) != name:
        return f"xet xorb {name}: its bytes hash to {hash_to_hex(xorb.hash)}; re-upload the files that use it"
    chunks = [
        [hash_to_hex(c.hash) for c in xorb.chunks],
        [c.end for c in xorb.chunks],
        [c.size for c in xorb.chunks],
    ]
    if chunks != [meta.get("hashes"), meta.get("ends"), meta.get("sizes")]:
        return f"xet xorb {name}: its chunk index ({name}.json) disagrees with its bytes"
    return None


def _check_file(store: XetStore, path: Path) -> str | None:
    try:
        record = read_json(path)
        chunks = []
        for xorb, start, end, size in record["segments"]:
            if not store.has_xorb(xorb):
                return f"xet file {record['file_hash']}: xorb {xorb} is missing; re-upload the file"
            meta = read_json(store.xorb_path(xorb).with_name(xorb + ".json"))
            sizes = meta["sizes"][start:end]
            if end > len(meta["sizes"]) or sum(sizes) != size:
                return f"xet file {record['file_hash']}: chunks [{start}, {end}) of xorb {xorb} do not hold {size} bytes"
            chunks.extend(zip((hex_to_hash(h) for h in meta["hashes"][start:end]), sizes, strict=True))
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"xet file record {path.name}: unreadable ({e})"
    if hash_to_hex(file_hash(chunks)) != record["file_hash"] or path.name != record["file_hash"] + ".json":
        return f"xet file {record['file_hash']}: its chunks do not hash to its name; re-upload the file"
    if store.file_by_sha256(record["sha256"]) is None:
        return f"xet file {record['file_hash']}: no sha256 index entry for {record['sha256']}"
    return None


def check_store(store: XetStore) -> list[str]:
    """Every problem in the store, one line each (empty when all is well)."""
    root = store.root
    problems = [
        f"xet shard journal {p.name} was not applied; restart the registry to apply it"
        for p in (root / "pending").glob("*.json")
    ]
    for path in sorted((root / "xorbs").glob("*/*")):
        if path.suffix != ".json":
            problems.append(_check_xorb(path))
    for path in sorted((root / "files").glob("*/*.json")):
        problems.append(_check_file(store, path))
    for path in sorted((root / "shards").glob("*/*.json")):
        try:
            xorbs = read_json(path).get("xorbs")
        except (OSError, ValueError, AttributeError) as e:
            xorbs = repr(e)
        if not isinstance(xorbs, list):
            problems.append(f"xet shard record {path.name}: unreadable ({xorbs!r})")
    return [p for p in problems if p]
