"""Advisory file locks (`flock`) shared by the server and the maintenance commands.

`xet/apply.lock`: held while a shard's records are applied or a xorb and its chunk list are written
(server), and while `backup` re-copies the Xet records or `gc` removes Xet objects, so neither sees a
half-applied shard or a xorb without its chunk list. `maintenance.lock` (at the root): held
exclusively by `backup` and `gc`, which must not run at the same time, and shared by each repo move
(a move renames a repo folder, which a scan would take for a deleted repo).
"""

from __future__ import annotations

import contextlib
import fcntl
from collections.abc import Iterator
from pathlib import Path

from .errors import RegistryError

MAINTENANCE_LOCK = "maintenance.lock"
XET_APPLY_LOCK = "apply.lock"


class LockBusy(RegistryError):
    """A lock asked for without waiting is held by another process (or another open of the file)."""


@contextlib.contextmanager
def file_lock(path: Path, blocking: bool = True, busy: str = "", shared: bool = False) -> Iterator[None]:
    """Hold a `flock` on `path` (created if missing): exclusive, or shared with other shared holders.

    Args:
        path: The lock file.
        blocking: Wait for the lock; otherwise raise at once when it is held incompatibly.
        busy: The refusal message when `blocking` is False and the lock is held.
        shared: Take it shared (`LOCK_SH`): only exclusive holders exclude each other and the shared ones.

    Raises:
        LockBusy: `busy`, when the lock is held and `blocking` is False.
    """
    with open(path, "a+b") as f:
        try:
            fcntl.flock(f, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            raise LockBusy(busy or f"{path} is locked by another process; try again later.") from None
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def maintenance_lock(root: Path, command: str) -> contextlib.AbstractContextManager[None]:
    """The root's maintenance lock for `command` (`backup` or `gc`), refused at once when another holds it
    (another backup or gc, or a repo move in progress)."""
    return file_lock(
        Path(root) / MAINTENANCE_LOCK,
        blocking=False,
        busy=f"another backup, gc or repo move is running on {root}; run `{command}` again when it has finished.",
    )
