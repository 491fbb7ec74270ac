"""Garbage collection of blobs that no commit and no LFS upload references (`adapterkit-registry gc`).

Blobs of rejected commits, of deleted repos and of overwritten files are left in `objects/` by the
write path, which never deletes (a crash can then never lose content). `gc` removes the ones that no
revision of any repo and no uploaded LFS object references. Blobs younger than `grace_s` are kept: a
running server may be about to commit them (it refreshes the time of every blob it reuses).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from .storage import Storage
from .upkeep import referenced_blobs

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class GcReport:
    """What `collect_garbage` found.

    Attributes:
        unreferenced: Blobs that nothing references.
        removed: How many of them were removed (old enough and not a dry run).
        freed_bytes: Bytes removed.
    """

    unreferenced: int
    removed: int
    freed_bytes: int


def collect_garbage(storage: Storage, grace_s: float = 3600, dry_run: bool = False) -> GcReport:
    """Remove unreferenced blobs older than `grace_s` seconds.

    Args:
        storage: The registry storage.
        grace_s: Keep unreferenced blobs modified less than this long ago (in-flight commits).
        dry_run: Only count.

    Returns:
        Counts of unreferenced and removed blobs.
    """
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
    return GcReport(unreferenced, removed, freed)
