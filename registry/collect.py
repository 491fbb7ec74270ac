"""Garbage collection of blobs and Xet objects that no commit and no LFS upload references
(`adapterkit-registry gc`).

Blobs of rejected commits, of deleted repos and of overwritten files are left in `objects/` by the
write path, which never deletes (a crash can then never lose content). `gc` removes the ones that no
revision of any repo and no uploaded LFS object references. Blobs younger than `grace_s` are kept: a
running server may be about to commit them (it refreshes the time of every blob it reuses). The Xet
store is collected too (`xet_gc`). A collection holds the root's maintenance lock, so it never runs
beside a `backup`, and a repo move (which would rename a folder its scan listed) is refused meanwhile.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from .flock import maintenance_lock
from .storage import Storage
from .upkeep import referenced_blobs
from .xet_gc import XORB_GRACE_S, XetGcReport, collect_xet

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class GcReport:
    """What `collect_garbage` found.

    Attributes:
        unreferenced: Blobs that nothing references.
        removed: How many of them were removed (old enough and not a dry run).
        freed_bytes: Bytes removed.
        xet: What the Xet store's collection found and removed.
    """

    unreferenced: int
    removed: int
    freed_bytes: int
    xet: XetGcReport = XetGcReport()


def collect_garbage(
    storage: Storage, grace_s: float = 3600, dry_run: bool = False, xorb_grace_s: float = XORB_GRACE_S
) -> GcReport:
    """Remove unreferenced blobs older than `grace_s` seconds, and unreferenced Xet objects (`collect_xet`).

    Args:
        storage: The registry storage.
        grace_s: Keep unreferenced blobs and Xet file records modified less than this long ago
            (in-flight commits).
        dry_run: Only count.
        xorb_grace_s: Keep unreferenced xorbs uploaded or named in a dedupe answer less long ago.

    Returns:
        Counts of unreferenced and removed blobs and Xet objects.

    Raises:
        RegistryError: Another gc or a backup holds the root's maintenance lock (not for a dry run).
    """
    if dry_run:
        return _collect(storage, grace_s, True, xorb_grace_s)
    with maintenance_lock(storage.root, "gc"):
        return _collect(storage, grace_s, False, xorb_grace_s)


def _collect(storage: Storage, grace_s: float, dry_run: bool, xorb_grace_s: float) -> GcReport:
    referenced = referenced_blobs(storage)
    cutoff = time.time() - grace_s
    unreferenced = removed = freed = 0
    for path in list(storage.blobs.all()):
        if path.name in referenced:
            continue
        unreferenced += 1
        try:
            st = path.stat()
        except FileNotFoundError:
            continue
        if dry_run or st.st_mtime > cutoff:
            continue
        path.unlink(missing_ok=True)
        removed += 1
        freed += st.st_size
    if removed:
        logger.info("gc removed %d unreferenced blob(s), %d bytes", removed, freed)
    xet = collect_xet(storage, grace_s, xorb_grace_s, dry_run)
    return GcReport(unreferenced, removed, freed, xet)
