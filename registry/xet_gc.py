"""Garbage collection of the Xet store (part of `adapterkit-registry gc`).

A Xet file is referenced while an LFS record of some repo names its hash (every revision that holds
the file's bytes through Xet goes through such a record, and so does an upload not committed yet).
`collect_xet` removes, under the store's apply lock (no shard is registered meanwhile):

* file records (and their SHA-256 index entries) that no repo references, older than `grace_s`;
* xorbs that no remaining file record uses, neither uploaded nor named in a dedupe answer for
  `xorb_grace_s` (default 3 weeks: hf_xet keeps the shards it uploaded, and dedupe answers, in its
  local cache for up to 3 weeks and skips uploading chunks they name, so a xorb removed earlier makes
  that client's next upload of the same content fail with `XorbMissing` until its cache expires);
* shard records whose xorbs are all gone, and dedupe index entries that name only removed shards.

A shard registered after the scan that names a removed xorb is refused (`XorbMissing`) by the
re-check `XetStore` makes under the same lock, so nothing ever references a removed xorb.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from pathlib import Path

from .blobs import atomic_write_json, read_json
from .flock import XET_APPLY_LOCK, file_lock
from .storage import Storage
from .xet_check import pending_files

XORB_GRACE_S = 21 * 24 * 3600
"""Default age (seconds since upload or last dedupe answer) before an unreferenced xorb may go."""


@dataclass(frozen=True)
class XetGcReport:
    """What `collect_xet` found: unreferenced file records and xorbs, how many it removed (or would,
    in a dry run), the shard records it dropped, the bytes freed, and how many it kept as too recent."""

    files: int = 0
    xorbs: int = 0
    removed_files: int = 0
    removed_xorbs: int = 0
    removed_shards: int = 0
    freed_bytes: int = 0
    kept_recent: int = 0


def referenced_files(storage: Storage) -> set[str]:
    """Xet hashes that the LFS records of any repo name."""
    out: set[str] = set()
    for key, _ in storage.list_repos():
        lfs = storage.repo_dir(key) / "lfs"
        for p in lfs.iterdir() if lfs.is_dir() else ():
            try:
                xet = read_json(p).get("xet")
            except (OSError, ValueError, AttributeError):  # removed meanwhile, or not a record
                continue
            if isinstance(xet, str):
                out.add(xet)
    return out


def _age_ok(path: Path, cutoff: float) -> bool:
    try:
        return path.stat().st_mtime <= cutoff
    except FileNotFoundError:
        return False


def collect_xet(
    storage: Storage, grace_s: float = 3600, xorb_grace_s: float = XORB_GRACE_S, dry_run: bool = False
) -> XetGcReport:
    """Remove Xet objects that nothing references (see the module docstring).

    Args:
        storage: The registry storage.
        grace_s: Keep unreferenced file records younger than this (an upload not committed yet).
        xorb_grace_s: Keep unreferenced xorbs uploaded or named in a dedupe answer less long ago.
        dry_run: Only count.
    """
    xet = storage.root / "xet"
    if not (xet / "files").is_dir():
        return XetGcReport()
    live = referenced_files(storage)
    now = time.time()
    with contextlib.nullcontext() if dry_run else file_lock(xet / XET_APPLY_LOCK):
        pending = pending_files_and_xorbs(xet)
        used: set[str] = set(pending[1])
        doomed_files, kept = [], 0
        for path in sorted((xet / "files").glob("*/*.json")):
            record = read_json(path)
            name = record["file_hash"]
            if name not in live and name not in pending[0]:
                if _age_ok(path, now - grace_s):
                    doomed_files.append((path, record))
                    continue
                kept += 1
            used.update(seg[0] for seg in record["segments"])
        doomed_xorbs = []
        for path in sorted((xet / "xorbs").glob("*/*")):
            if path.suffix == ".json" or path.name in used:
                continue
            if _age_ok(path, now - xorb_grace_s):
                doomed_xorbs.append(path)
            else:
                kept += 1
        if dry_run:
            return XetGcReport(len(doomed_files), len(doomed_xorbs), kept_recent=kept)
        freed = _remove(xet, doomed_files, doomed_xorbs)
        shards = _drop_shards(xet)
    return XetGcReport(
        len(doomed_files), len(doomed_xorbs), len(doomed_files), len(doomed_xorbs), shards, freed, kept
    )


def pending_files_and_xorbs(xet: Path) -> tuple[set[str], set[str]]:
    """Files and xorbs named by pending shard journals (being applied, or at the next start)."""
    from .xet_store import XetStore

    store = XetStore(xet, read_only=True)
    xorbs: set[str] = set()
    for journal in store.pending():
        try:
            xorbs.update(read_json(journal)["xorbs"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return pending_files(store), xorbs


def _remove(xet: Path, files: list[tuple[Path, dict]], xorbs: list[Path]) -> int:
    freed = 0
    for path, record in files:
        sha_path = xet / "sha256" / record["sha256"][:2] / f"{record['sha256']}.json"
        try:
            if read_json(sha_path).get("file_hash") == record["file_hash"]:
                sha_path.unlink()
        except (OSError, ValueError):
            pass
        freed += path.stat().st_size
        path.unlink()
    for path in xorbs:
        freed += path.stat().st_size
        path.unlink()  # the bytes first: `has_xorb` is false from here on
        meta = path.with_name(path.name + ".json")
        freed += meta.stat().st_size if meta.exists() else 0
        meta.unlink(missing_ok=True)
    return freed


def _drop_shards(xet: Path) -> int:
    """Remove shard records whose xorbs are all gone, and dedupe index entries naming only those."""
    gone: set[str] = set()
    for path in (xet / "shards").glob("*/*.json"):
        xorbs = read_json(path).get("xorbs") or []
        if not any((xet / "xorbs" / x[:2] / x).is_file() for x in xorbs):
            gone.add(path.stem)
            path.unlink()
    if gone:
        for path in (xet / "chunks").glob("*/*.json"):
            raw = read_json(path)
            entries = [[raw["shard"], ""]] if "shard" in raw else raw.get("shards", [])
            kept = [e for e in entries if e[0] not in gone]
            if not kept:
                path.unlink()
            elif len(kept) != len(entries):
                atomic_write_json(path, {"shards": kept}, xet / "tmp")
    return len(gone)
