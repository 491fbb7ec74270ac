"""Advisory file locks (`flock`) shared by the server and the maintenance commands.

`xet/apply.lock`: held while a shard's records are applied (server) and while `backup` copies the Xet
records or `gc` removes Xet objects, so neither sees a half-applied shard. `maintenance.lock` (at the
root): held by `backup` and `gc`, which must not run at the same time.
"""

from __future__ import annotations

import contextlib
import fcntl
from collections.abc import Iterator
from pathlib import Path

from .errors import RegistryError

MAINTENANCE_LOCK = "maintenance.lock"
XET_APPLY_LOCK = "apply.lock"


@contextlib.contextmanager
def file_lock(path: Path, blocking: bool = True, busy: str = "") -> Iterator[None]:
    """Hold an exclusive `flock` on `path` (created if missing).

    Args:
        path: The lock file.
        blocking: Wait for the lock; otherwise raise at once when another process holds it.
        busy: The refusal message when `blocking` is False and the lock is held.

    Raises:
        RegistryError: `busy`, when the lock is held and `blocking` is False.
    """
    with open(path, "a+b") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            raise RegistryError(busy or f"{path} is locked by another process; try again later.") from None
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def maintenance_lock(root: Path, command: str) -> contextlib.AbstractContextManager[None]:
    """The root's maintenance lock for `command` (`backup` or `gc`), refused at once when another holds it."""
    return file_lock(
        Path(root) / MAINTENANCE_LOCK,
        blocking=False,
        busy=f"another backup or gc is running on {root}; run `{command}` again when it has finished.",
    )
