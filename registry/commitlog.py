"""The ids of a repo's acknowledged commits: an append-only `commits.log`, one id per line.

`refs.json` stays small (branches and tags) however long the history grows, and a commit appends 41
bytes instead of rewriting a list of every id. The log is appended right after `refs.json` is
replaced (the commit point); a crash in between leaves a commit that a ref reaches but the log lacks,
which `Storage.recover` appends at the next start. Registries of the first format kept the list in
`refs.json` under `"commits"`; it is still read, and moved into the log by the next commit.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

from .blobs import atomic_write_bytes


class CommitLog:
    """Reader and appender of `commits.log` files, with an incremental in-memory cache per file."""

    def __init__(self) -> None:
        self._cache: dict[Path, tuple[int, int, set[str]]] = {}  # path -> (inode, bytes read, ids)
        self._lock = threading.Lock()

    def ids(self, path: Path) -> set[str]:
        """Ids in the log (complete lines only); do not modify the returned set."""
        try:
            st = os.stat(path)
        except FileNotFoundError:
            return set()
        with self._lock:
            ino, done, ids = self._cache.get(path, (st.st_ino, 0, set()))
            if ino != st.st_ino or st.st_size < done:  # replaced (repo deleted and re-created, migrated)
                ino, done, ids = st.st_ino, 0, set()
            if st.st_size > done:
                with open(path, "rb") as f:
                    f.seek(done)
                    chunk = f.read(st.st_size - done)
                complete = chunk[: chunk.rfind(b"\n") + 1]
                ids = ids | set(complete.decode("ascii", "replace").split())
                done += len(complete)
            self._cache[path] = (ino, done, ids)
            return ids

    def append(self, path: Path, cid: str) -> None:
        """Append one id durably (callers hold the repo lock)."""
        with open(path, "ab") as f:
            f.write(cid.encode() + b"\n")
            f.flush()
            os.fsync(f.fileno())

    def rewrite(self, path: Path, ids: list[str], tmp: Path) -> None:
        """Replace the log atomically (migration from `refs.json`, repair after a torn append)."""
        atomic_write_bytes(path, "".join(f"{c}\n" for c in ids).encode(), tmp)

    @staticmethod
    def read_ordered(path: Path) -> list[str]:
        """All complete ids in file order (for repairs)."""
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return []
        return data[: data.rfind(b"\n") + 1].decode("ascii", "replace").split()
