"""fsck of the Xet store: every stored xorb against its hash, every registered file against its xorbs."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from .blobs import read_json
from .xet_format import XetError, file_hash, hash_to_hex, hex_to_hash, parse_xorb
from .xet_read import xorb_index
from .xet_repair import aside_xorbs

REPAIR = "`adapterkit-registry fsck --repair`"

if TYPE_CHECKING:
    from .xet_store import XetStore


def _check_xorb(path: Path) -> str | None:
    name = path.name
    try:
        xorb = parse_xorb(path.read_bytes())
    except XetError as e:
        return f"xet xorb {name}: {e.message}"
    except OSError as e:
        return f"xet xorb {name}: unreadable ({e}); re-upload the files that use it"
    if hash_to_hex(xorb.hash) != name:
        return f"xet xorb {name}: its bytes hash to {hash_to_hex(xorb.hash)}; re-upload the files that use it"
    try:
        meta = read_json(path.with_name(name + ".json"))
    except (OSError, ValueError) as e:
        return f"xet xorb {name}: its chunk index ({name}.json) is unreadable ({e}); {REPAIR} rebuilds it"
    if not isinstance(meta, dict) or xorb_index(xorb) != {
        k: meta.get(k) for k in ("hashes", "ends", "sizes")
    }:
        return (
            f"xet xorb {name}: its chunk index ({name}.json) disagrees with its bytes; {REPAIR} rebuilds it"
        )
    return None


def _check_file(store: XetStore, path: Path, pending: bool, aside: dict) -> str | None:
    try:
        record = read_json(path)
        chunks = []
        for xorb, start, end, size in record["segments"]:
            if not store.has_xorb(xorb):
                fix = f"{REPAIR} puts it back" if xorb in aside else "re-upload the file"
                return f"xet file {record['file_hash']}: xorb {xorb} is missing; {fix}"
            index = store.xorb_path(xorb).with_name(xorb + ".json")
            if not index.is_file():
                return f"xet file {record['file_hash']}: the chunk index of xorb {xorb} is missing; {REPAIR} rebuilds it"
            meta = read_json(index)
            sizes = meta["sizes"][start:end]
            if end > len(meta["sizes"]) or sum(sizes) != size:
                return f"xet file {record['file_hash']}: chunks [{start}, {end}) of xorb {xorb} do not hold {size} bytes"
            chunks.extend(zip((hex_to_hash(h) for h in meta["hashes"][start:end]), sizes, strict=True))
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"xet file record {path.name}: unreadable ({e})"
    if hash_to_hex(file_hash(chunks)) != record["file_hash"] or path.name != record["file_hash"] + ".json":
        return f"xet file {record['file_hash']}: its chunks do not hash to its name; re-upload the file"
    if not pending and store.file_by_sha256(record["sha256"]) is None:
        return f"xet file {record['file_hash']}: no sha256 index entry for {record['sha256']}; {REPAIR} rebuilds it"
    return None


def pending_names(root: Path) -> tuple[set[str], set[str]]:
    """Xet hashes of the files, and the xorbs, named by the pending shard journals of the Xet store at
    `root` (being registered, or at the next start: see `XetStore.pending`)."""
    files: set[str] = set()
    xorbs: set[str] = set()
    for journal in sorted((root / "pending").glob("*.json")):
        try:
            raw = read_json(journal)
            names = [r["file_hash"] for r in raw["files"]]
            xorbs.update(raw["xorbs"])
        except (OSError, ValueError, KeyError, TypeError):
            continue  # removed while read (applied), or left torn by a crash: the next start decides
        files.update(names)
    return files, xorbs


def check_store(store: XetStore) -> list[str]:
    """Every problem in the store, one line each (empty when all is well).

    Pending shard journals are not problems (see `XetStore.pending`): the files they name may lack
    their SHA-256 index entry until the journal is applied, so that entry is not checked for them."""
    root = store.root
    pending, _ = pending_names(root)
    aside = aside_xorbs(root)
    problems: list[str | None] = [
        f"xet xorb {name}: left aside in tmp/ by an interrupted gc; {REPAIR} (or the next server start or gc) "
        "puts it back"
        for name in aside
    ]
    for path in sorted((root / "xorbs").glob("*/*")):
        if path.suffix != ".json":
            problems.append(_check_xorb(path))
    for path in sorted((root / "files").glob("*/*.json")):
        problems.append(_check_file(store, path, path.name.removesuffix(".json") in pending, aside))
    for path in sorted((root / "shards").glob("*/*.json")):
        try:
            xorbs = read_json(path).get("xorbs")
        except (OSError, ValueError, AttributeError) as e:
            xorbs = repr(e)
        if not isinstance(xorbs, list):
            problems.append(f"xet shard record {path.name}: unreadable ({xorbs!r})")
    return [p for p in problems if p]


def store_stats(root: Path) -> dict:
    """Counts and bytes of a Xet store (see `XetStore.stats`)."""
    xorbs = [p for p in (root / "xorbs").glob("*/*") if p.suffix != ".json"]
    files = [read_json(p) for p in (root / "files").glob("*/*.json")]
    return {
        "xorbs": len(xorbs),
        "xorb_bytes": sum(p.stat().st_size for p in xorbs),
        "files": len(files),
        "file_bytes": sum(f["size"] for f in files),
        "shards": sum(1 for _ in (root / "shards").glob("*/*.json")),
        "chunks_indexed": sum(1 for _ in (root / "chunks").glob("*/*.json")),
    }
