"""Garbage collection of the Xet store (part of `adapterkit-registry gc`).

A Xet file is referenced while an LFS record of some repo names its hash (every revision that holds
the file's bytes through Xet goes through such a record, and so does an upload not committed yet).
`collect_xet` removes:

* file records (and their SHA-256 index entries) that no repo references, older than `grace_s`;
* xorbs that no remaining file record uses, neither uploaded, named in a dedupe answer nor used by a
  registered shard for `xorb_grace_s` (default 3 weeks: hf_xet keeps the shards it uploaded, and
  dedupe answers, in its local cache for up to 3 weeks and skips uploading chunks they name, so a xorb
  removed earlier makes that client's next upload of the same content fail with `XorbMissing` until
  its cache expires);
* shard records whose xorbs are all gone, and dedupe index entries that name only removed shards.

The store is scanned without the apply lock (shards keep being registered meanwhile); each candidate
is checked again, and removed, under it. Every write that makes an object live again refreshes its
time (a shard registration rewrites its file records and touches its xorbs; an upload or a dedupe
answer touches the xorb), so the re-check is of the time only: a candidate modified since the scan
stays. A xorb is first moved aside, so a dedupe answer can no longer name it, then its time is read
again (a dedupe answer that touched it just before is seen) and it is put back or removed with its
chunk index (`put_xorb` writes the pair under the same lock: never one without the other). A xorb
left aside by a gc that died before deciding is put back by the next server start, gc or `fsck
--repair` (`xet_repair.restore_aside`). A shard registered afterwards that names a removed xorb is
refused (`XorbMissing`) by the re-check `XetStore` makes under that lock, so nothing ever references a
removed xorb.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from .blobs import read_json
from .flock import XET_APPLY_LOCK, file_lock
from .storage import Storage
from .xet_check import pending_names
from .xet_dedupe import index_entries, unindex_shards
from .xet_repair import restore_aside

XORB_GRACE_S = 21 * 24 * 3600
"""Default age (seconds since upload, last dedupe answer or last shard using it) before an unreferenced
xorb may go."""


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
        xorb_grace_s: Keep unreferenced xorbs uploaded, named in a dedupe answer or used by a shard
            less long ago.
        dry_run: Only count.
    """
    xet = storage.root / "xet"
    if not (xet / "files").is_dir():
        return XetGcReport()
    if not dry_run:  # what an interrupted gc left aside is undecided: put back, and decided again here
        restore_aside(xet)
    now = time.time()
    cutoffs = (now - grace_s, now - xorb_grace_s)
    files, xorbs, kept = _scan(xet, referenced_files(storage), *cutoffs)
    if dry_run:
        return XetGcReport(len(files), len(xorbs), kept_recent=kept)
    with file_lock(xet / XET_APPLY_LOCK):  # no shard is applied and no xorb written meanwhile
        n_files, n_xorbs, freed = _remove(xet, files, xorbs, *cutoffs)
    shards = _drop_shards(xet)
    kept += len(files) - n_files + len(xorbs) - n_xorbs
    return XetGcReport(len(files), len(xorbs), n_files, n_xorbs, shards, freed, kept)


def _scan(
    xet: Path, live: set[str], file_cutoff: float, xorb_cutoff: float
) -> tuple[list[tuple[Path, dict]], list[Path], int]:
    """Candidates (file records, xorbs) and how many unreferenced ones are too recent; without the lock."""
    pending_files, used = pending_names(xet)
    files, kept = [], 0
    for path in sorted((xet / "files").glob("*/*.json")):
        record = read_json(path)
        name = record["file_hash"]
        if name not in live and name not in pending_files:
            if _age_ok(path, file_cutoff):
                files.append((path, record))
                continue
            kept += 1
        used.update(seg[0] for seg in record["segments"])
    xorbs = []
    for path in sorted((xet / "xorbs").glob("*/*")):
        if path.suffix == ".json" or path.name in used:
            continue
        if _age_ok(path, xorb_cutoff):
            xorbs.append(path)
        else:
            kept += 1
    return files, xorbs, kept


def _remove(
    xet: Path, files: list[tuple[Path, dict]], xorbs: list[Path], file_cutoff: float, xorb_cutoff: float
) -> tuple[int, int, int]:
    """Under the apply lock: remove the candidates not modified since the scan (nor named by a shard
    journal); `(file records removed, xorbs removed, bytes freed)`."""
    pending_files, pending_xorbs = pending_names(xet)
    n_files = n_xorbs = freed = 0
    for path, record in files:
        if record["file_hash"] in pending_files or not _age_ok(path, file_cutoff):
            continue  # registered again since the scan
        sha_path = xet / "sha256" / record["sha256"][:2] / f"{record['sha256']}.json"
        try:
            if read_json(sha_path).get("file_hash") == record["file_hash"]:
                sha_path.unlink()
        except (OSError, ValueError):
            pass
        freed += path.stat().st_size
        path.unlink()
        n_files += 1
    for path in xorbs:
        if path.name not in pending_xorbs:
            size = _remove_xorb(xet, path, xorb_cutoff)
            n_xorbs += size is not None
            freed += size or 0
    return n_files, n_xorbs, freed


def _remove_xorb(xet: Path, path: Path, cutoff: float) -> int | None:
    """Remove a xorb and then its chunk index, unless it was touched since the scan; the bytes freed, or
    None if it stays. It is moved aside first: a dedupe answer or upload from then on does not see it,
    and one that touched it before is seen in the time read after the move."""
    if not _age_ok(path, cutoff):  # touched since the scan (by a shard registered meanwhile, say)
        return None
    aside = xet / "tmp" / f"gc-{path.name}-{uuid.uuid4().hex[:8]}"
    try:
        path.rename(aside)
    except FileNotFoundError:
        return None
    if aside.stat().st_mtime > cutoff:  # named in a dedupe answer just before the move
        aside.rename(path)
        return None
    meta = path.with_name(path.name + ".json")
    freed = aside.stat().st_size + (meta.stat().st_size if meta.exists() else 0)
    meta.unlink(missing_ok=True)
    aside.unlink()
    return freed


def _drop_shards(xet: Path) -> int:
    """Remove shard records whose xorbs are all gone, and dedupe index entries naming only those.

    Found without the apply lock; each is checked again, and changed, under it."""

    def all_gone(path: Path) -> bool:
        xorbs = read_json(path).get("xorbs") or []
        return not any((xet / "xorbs" / x[:2] / x).is_file() for x in xorbs)

    candidates = [p for p in sorted((xet / "shards").glob("*/*.json")) if all_gone(p)]
    if not candidates:
        return 0
    gone: set[str] = set()
    with file_lock(xet / XET_APPLY_LOCK):
        for path in candidates:
            if path.is_file() and all_gone(path):
                gone.add(path.stem)
                path.unlink()
    gone = {s for s in gone if not (xet / "shards" / s[:2] / f"{s}.json").is_file()}  # not registered again
    stale = [p for p in (xet / "chunks").glob("*/*.json") if any(e[0] in gone for e in index_entries(p))]
    with file_lock(xet / XET_APPLY_LOCK):
        for path in stale:
            unindex_shards(path, gone, xet / "tmp")
    return len(gone)
