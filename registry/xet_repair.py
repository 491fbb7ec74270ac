"""Recovery and repair of the Xet store: what a crash, or an older version of the registry, left behind.

* **Xorbs a gc left aside.** `xet_gc` moves a candidate xorb to `tmp/gc-<xorb>-<random>` under the
  apply lock and, still under it, puts it back or removes it. One found there by a holder of that lock
  was left by a gc that died in between (after a dedupe answer refreshed the xorb, say): nothing was
  decided, so it is put back (`restore_aside`) and the next gc decides again. If its place holds the
  xorb again (uploaded meanwhile), the aside copy is removed instead. This runs when a writable
  `XetStore` opens (server start), at the start of a gc and in `fsck --repair`, always before the
  stale temporary files are cleared (`clear_tmp` never removes an aside xorb). A server that has run
  since before the gc died puts such a xorb back when a download asks for it (`restore_xorb`), unless a
  gc holds the lock right then (that one is deciding about it).
* **Derived records** (`repair_records`, for `fsck --repair`): a xorb's chunk index
  (`xorbs/ab/<xorb>.json`) missing or disagreeing with its bytes (bytes left without their index by a
  gc before 6bccb3a, when an upload came between its two removals) is rebuilt from the bytes, which
  must hash to the xorb's name; a registered file's missing SHA-256 index entry (`sha256/ab/<sha>.json`)
  is rebuilt from its file record. A missing xorb, file record or shard record cannot be rebuilt (the
  registry keeps neither the shards nor other copies of the bytes): fsck keeps reporting them.
"""

from __future__ import annotations

import logging
import re
import time
from pathlib import Path

from .blobs import atomic_write_json, fsync_dir, read_json
from .flock import XET_APPLY_LOCK, LockBusy, file_lock
from .xet_format import XetError, hash_to_hex, parse_xorb
from .xet_read import xorb_index

logger = logging.getLogger(__name__)

HEX = re.compile(r"[0-9a-f]{64}")
ASIDE = re.compile(r"gc-([0-9a-f]{64})-[0-9a-f]{8}")
"""Name of a xorb a gc moved aside into `tmp/` (`gc-<xorb hash>-<random>`)."""

STALE_TMP_S = 3600
"""Age after which a temporary file (not an aside xorb) is a leftover of interrupted work."""


def aside_xorbs(root: Path) -> dict[str, list[Path]]:
    """Xorbs a gc moved aside into `root/tmp`, by xorb hash (read-only: for fsck)."""
    out: dict[str, list[Path]] = {}
    for p in sorted((root / "tmp").glob("gc-*")) if (root / "tmp").is_dir() else ():
        if m := ASIDE.fullmatch(p.name):
            out.setdefault(m.group(1), []).append(p)
    return out


def chunk_index(path: Path, name: str) -> dict[str, list] | None:
    """The chunk index of the xorb bytes at `path`, or None if they do not parse or hash to `name`."""
    try:
        xorb = parse_xorb(path.read_bytes())
    except (OSError, XetError):
        return None
    return xorb_index(xorb) if hash_to_hex(xorb.hash) == name else None


def _put_back(root: Path, name: str, aside: Path) -> str:
    """Under the apply lock: put one aside xorb back (with its chunk index), or drop a duplicate."""
    dest = root / "xorbs" / name[:2] / name
    if dest.is_file():  # uploaded again meanwhile: that copy stays, the aside one goes
        aside.unlink(missing_ok=True)
        return f"removed the copy of xorb {name} an interrupted gc left aside (the xorb is stored again)"
    meta = dest.with_name(name + ".json")
    dest.parent.mkdir(parents=True, exist_ok=True)
    if not meta.is_file() and (index := chunk_index(aside, name)) is not None:
        atomic_write_json(meta, index, root / "tmp")  # the gc died between removing the index and the bytes
    aside.rename(dest)
    fsync_dir(dest.parent)
    return f"put back xorb {name}, left aside by an interrupted gc"


def restore_aside(root: Path) -> list[str]:
    """Put back every xorb an interrupted gc left aside in `root/tmp` (see the module docstring).

    Takes the apply lock, so a gc in progress (which holds it while its xorb is aside) is never undone.
    Returns one line per xorb handled.
    """
    if not (root / "tmp").is_dir():
        return []
    with file_lock(root / XET_APPLY_LOCK):
        done = [_put_back(root, name, p) for name, paths in aside_xorbs(root).items() for p in paths]
    for line in done:
        logger.warning("xet: %s", line)
    return done


def restore_xorb(root: Path, name: str) -> bool:
    """Put back `name` if an interrupted gc left it aside (a server asked for a xorb it does not hold);
    whether it is stored now. Never waits: while a gc holds the apply lock, its aside xorb is being decided
    and stays missing for now."""
    paths = sorted((root / "tmp").glob(f"gc-{name}-*")) if HEX.fullmatch(name) else []
    if not paths:
        return False
    try:
        with file_lock(root / XET_APPLY_LOCK, blocking=False):
            done = [_put_back(root, name, p) for p in paths if p.exists()]
    except LockBusy:
        return False
    for line in done:
        logger.warning("xet: %s (asked for by a download)", line)
    return (root / "xorbs" / name[:2] / name).is_file()


def clear_tmp(root: Path) -> None:
    """Restore aside xorbs, then remove temporary files older than `STALE_TMP_S` (never an aside xorb:
    one a gc is deciding about right now is old, as its xorb is)."""
    restore_aside(root)
    cutoff = time.time() - STALE_TMP_S
    for p in (root / "tmp").iterdir():
        if not ASIDE.fullmatch(p.name) and p.stat().st_mtime < cutoff:
            p.unlink(missing_ok=True)


def repair_records(root: Path) -> list[str]:
    """Put back aside xorbs, then rebuild the derived records that are missing or wrong (see the module
    docstring); one line each.

    Read without the lock; each record is written under the apply lock, after checking that what it
    derives from is still stored (a gc may have removed it meanwhile)."""
    return restore_aside(root) + _rebuild_chunk_indexes(root) + _rebuild_sha256_entries(root)


def _rebuild_chunk_indexes(root: Path) -> list[str]:
    lines = []
    for path in sorted((root / "xorbs").glob("*/*")):
        if path.suffix == ".json" or (index := chunk_index(path, path.name)) is None:
            continue  # an index, or damaged bytes (fsck reports them: re-upload the files)
        meta = path.with_name(path.name + ".json")
        try:
            current = read_json(meta)
        except (OSError, ValueError):
            current = None
        if isinstance(current, dict) and {k: current.get(k) for k in index} == index:
            continue
        with file_lock(root / XET_APPLY_LOCK):
            if path.is_file():
                atomic_write_json(meta, index, root / "tmp")
                lines.append(f"rebuilt the chunk index of xorb {path.name} from its bytes")
    return lines


def _rebuild_sha256_entries(root: Path) -> list[str]:
    lines = []
    for path in sorted((root / "files").glob("*/*.json")):
        try:
            record = read_json(path)
            sha, name = record["sha256"], record["file_hash"]
        except (OSError, ValueError, KeyError, TypeError):
            continue  # fsck reports it
        if not isinstance(sha, str) or not HEX.fullmatch(sha):
            continue  # fsck reports it
        entry = root / "sha256" / sha[:2] / f"{sha}.json"
        if entry.is_file():
            continue
        with file_lock(root / XET_APPLY_LOCK):
            if path.is_file() and not entry.is_file():
                entry.parent.mkdir(parents=True, exist_ok=True)
                atomic_write_json(entry, {"file_hash": name}, root / "tmp")
                lines.append(f"rebuilt the sha256 index entry of file {name}")
    return lines
