"""Online backup of a registry root (`adapterkit-registry backup --root DIR DEST`), beside a running server.

A plain `cp -a` of a live root can copy a repo's `refs.json` after a commit moved it but its folders
before that commit wrote them, or a Xet file record without its index: a copy that fails `fsck`. The
backup copies in the one order that stays consistent while the server writes:

1. each repo folder (`repo.json`, `refs.json`, `commits.log`, commits, folders, LFS records), under that
   repo's lock (the one every commit, ref edit and delete takes): each repo is copied at one revision;
2. the Xet records (files, SHA-256 index, shards, dedupe index, pending journals): copied without
   locks, then made equal to the store under its apply lock (no shard is applied meanwhile) by
   re-copying the files replaced since, and removing the ones gone: no shard is half-applied in the
   copy, and shard registrations wait only for that re-check;
3. the content-addressed blobs and xorbs, last: everything a copied revision or Xet record references
   was written before it, so it is there to copy, and nothing is removed meanwhile (`gc` is refused at
   once while the backup holds the maintenance lock, and so is a repo move, which a repo list taken
   once would miss);
4. the tokens (SQLite's online backup, so the WAL is included), keys and format marker.

The copy is built in a hidden folder beside DEST, checked with `fsck`, and renamed to DEST only when
it passes: an interrupted or failed backup leaves no DEST behind.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import uuid
from dataclasses import dataclass
from pathlib import Path

from .errors import RegistryError
from .flock import MAINTENANCE_LOCK, XET_APPLY_LOCK, file_lock, maintenance_lock
from .storage import Storage
from .xet_repair import restore_aside

XET_RECORDS = ("files", "sha256", "shards", "chunks", "pending")
SKIPPED = {
    "server.lock",
    MAINTENANCE_LOCK,
    "tmp",
    "trash",
    "tokens.db-wal",
    "tokens.db-shm",
    "tokens.db-journal",
}


@dataclass(frozen=True)
class BackupReport:
    """What `backup` copied: repos, files and bytes, and the problems `fsck` found in the copy."""

    repos: int
    files: int
    bytes: int
    problems: list[str]


class _Copier:
    """Copies files that the destination lacks, counting them; files removed meanwhile are skipped.
    Remembers which version (inode, time, size) of each source it copied, for `sync`."""

    def __init__(self) -> None:
        self.files = self.bytes = 0
        self.copied: dict[Path, tuple[int, int, int]] = {}

    def file(self, src: Path, dst: Path) -> None:
        if dst.exists():
            return
        dst.parent.mkdir(parents=True, exist_ok=True)
        try:
            st = src.stat()  # before the copy: a file replaced in between is copied again by `sync`
            shutil.copy2(src, dst)
        except FileNotFoundError:
            return
        self.copied[dst] = (st.st_ino, st.st_mtime_ns, st.st_size)
        self.files += 1
        self.bytes += dst.stat().st_size

    def sync(self, src: Path, dst: Path) -> None:
        """Make the copy `dst` of folder `src` equal to it again: copy the files written (every write
        replaces a file: a new inode) or added since they were copied, remove the ones gone."""
        present = set()
        for folder, _, names in os.walk(src):
            for name in names:
                s = Path(folder) / name
                d = dst / s.relative_to(src)
                present.add(d)
                try:
                    st = s.stat()
                except FileNotFoundError:
                    continue
                if self.copied.get(d) != (st.st_ino, st.st_mtime_ns, st.st_size):
                    self._drop(d)
                    self.file(s, d)
        for d in [d for d in self.copied if dst in d.parents and d not in present]:
            self._drop(d)

    def _drop(self, dst: Path) -> None:
        if dst.exists():
            self.files -= 1
            self.bytes -= dst.stat().st_size
            dst.unlink()
        self.copied.pop(dst, None)

    def tree(self, src: Path, dst: Path, skip: frozenset[str] = frozenset()) -> None:
        for folder, dirs, names in os.walk(src):
            dirs[:] = sorted(d for d in dirs if d not in skip)
            rel = Path(folder).relative_to(src)
            (dst / rel).mkdir(parents=True, exist_ok=True)
            for name in sorted(names):
                if name not in skip and not name.endswith(".lock"):
                    self.file(Path(folder) / name, dst / rel / name)


def check_destination(root: Path, dest: Path) -> Path:
    """`dest` resolved, if it is new or an empty folder outside the root.

    Raises:
        RegistryError: DEST exists and is not an empty folder, or lies inside the root (or holds it).
    """
    dest = dest.resolve()
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise RegistryError(f"{dest} exists and is not empty; pass a new or empty folder as the backup DEST.")
    if dest == root or root in dest.parents or dest in root.parents:
        raise RegistryError(f"{dest} overlaps the registry root {root}; pass a DEST outside it.")
    return dest


def backup(storage: Storage, dest: Path, deep: bool = True) -> BackupReport:
    """Copy a registry root to `dest` consistently, while a server may be writing to it.

    Args:
        storage: The registry to copy.
        dest: A new (or empty) folder outside the root.
        deep: Check the copy with a deep `fsck` (re-hash every blob and xorb); else sizes only.

    Returns:
        What was copied. `problems` is empty when the copy passed fsck; otherwise DEST was not created.

    Raises:
        RegistryError: A bad DEST, or another backup or gc running on the root.
    """
    from .fsck import fsck

    dest = check_destination(storage.root, Path(dest))
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = dest.parent / f".{dest.name}.partial-{uuid.uuid4().hex[:8]}"
    try:
        with maintenance_lock(storage.root, "backup"):
            staging.mkdir()
            copier, repos = _copy_all(storage, staging)
        os.sync()
        problems = fsck(Storage(staging, create=False), deep=deep)
        if not problems:
            if dest.exists():
                dest.rmdir()
            staging.rename(dest)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return BackupReport(repos, copier.files, copier.bytes, problems)


def _copy_all(storage: Storage, out: Path) -> tuple[_Copier, int]:
    root, copier, repos = storage.root, _Copier(), 0
    for key, _ in storage.list_repos():  # 1. refs and history, each repo under its lock
        with storage.lock(key):
            src = storage.repo_dir(key)
            if (src / "repo.json").is_file():  # not deleted meanwhile
                copier.tree(src, out / src.relative_to(root))
                repos += 1
    xet = root / "xet"
    if xet.is_dir():  # 2. Xet records: copied, then re-checked with no shard half-applied
        restore_aside(xet)  # a xorb an interrupted gc left aside in tmp/ (not copied) goes back first
        records = [name for name in XET_RECORDS if (xet / name).is_dir()]
        for name in records:
            copier.tree(xet / name, out / "xet" / name)
        with file_lock(xet / XET_APPLY_LOCK):
            for name in records:
                copier.sync(xet / name, out / "xet" / name)
            if (xet / "dedupe_key.json").is_file():
                copier.file(xet / "dedupe_key.json", out / "xet" / "dedupe_key.json")
        copier.tree(xet / "xorbs", out / "xet" / "xorbs")  # 3. immutable content, last
    copier.tree(root / "objects", out / "objects")
    for p in sorted(root.iterdir()):  # 4. tokens, keys, the format marker
        if p.name == "tokens.db":
            _copy_sqlite(p, out / p.name)
        elif p.is_file() and p.name not in SKIPPED:
            copier.file(p, out / p.name)
    (out / "tmp").mkdir(exist_ok=True)
    return copier, repos


def _copy_sqlite(src: Path, dst: Path) -> None:
    """Copy a live SQLite database (WAL included) with SQLite's online backup API."""
    with sqlite3.connect(src) as s, sqlite3.connect(dst) as d:
        s.backup(d)
    s.close()
    d.close()
    os.chmod(dst, 0o600)
