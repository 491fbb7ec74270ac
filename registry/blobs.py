"""Content-addressed blob store and crash-safe file writes.

Every write goes to a temporary file in `<root>/tmp`, is fsynced, then moved into place with
`os.replace` and the directory is fsynced, so a crash (even SIGKILL) leaves either the old file or
the complete new one. Blobs are named by their SHA-256, so a half-written upload can never be
mistaken for content: it stays in `tmp/` and is removed at the next start.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

CHUNK = 1024 * 1024


def fsync_dir(path: Path) -> None:
    """Flush a directory entry (after a rename) to disk; a no-op where unsupported."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes, tmp_dir: Path, sync_dir: bool = True) -> None:
    """Write `data` to `path` atomically and durably.

    Args:
        path: Destination file.
        data: Full content.
        tmp_dir: Temporary folder on the same filesystem as `path`.
        sync_dir: Fsync the folder too; callers that write many files there do it once themselves.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=tmp_dir, prefix="w-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if sync_dir:
        fsync_dir(path.parent)


def atomic_write_json(path: Path, obj: Any, tmp_dir: Path) -> None:
    """Write `obj` as sorted, indented JSON with `atomic_write_bytes`."""
    atomic_write_bytes(path, json.dumps(obj, indent=1, sort_keys=True).encode(), tmp_dir)


def read_json(path: Path) -> Any:
    """Read a JSON file written by `atomic_write_json`."""
    with open(path, "rb") as f:
        return json.load(f)


def git_blob_sha1(size: int) -> Any:
    """A hashlib object primed with the git blob header, to feed the content into."""
    h = hashlib.sha1()
    h.update(b"blob %d\0" % size)
    return h


@dataclass(frozen=True)
class BlobInfo:
    """Hashes of a stored blob.

    Attributes:
        sha256: Hex SHA-256 of the content (the store key and the LFS oid).
        sha1: Hex git blob SHA-1 (the oid of a regular file).
        size: Size in bytes.
    """

    sha256: str
    sha1: str
    size: int


class BlobStore:
    """Blobs stored once under `objects/<sha256[:2]>/<sha256>`.

    Args:
        root: Registry root folder.
    """

    def __init__(self, root: Path):
        self.objects = root / "objects"
        self.tmp = root / "tmp"
        self.objects.mkdir(parents=True, exist_ok=True)
        self.tmp.mkdir(parents=True, exist_ok=True)

    def path(self, sha256: str) -> Path:
        """Where the blob with this SHA-256 lives (it may not exist)."""
        return self.objects / sha256[:2] / sha256

    def exists(self, sha256: str, size: int | None = None) -> bool:
        """Whether the blob is stored (and has `size` bytes, if given)."""
        try:
            st = self.path(sha256).stat()
        except OSError:
            return False
        return size is None or st.st_size == size

    def touch(self, sha256: str) -> None:
        """Mark a blob as just used, so a concurrent `gc` (which spares recent blobs) keeps it."""
        try:
            os.utime(self.path(sha256))
        except OSError:
            pass

    def all(self) -> Iterator[Path]:
        """Paths of all stored blobs."""
        for sub in self.objects.iterdir():
            if sub.is_dir():
                yield from sub.iterdir()

    def new_temp(self) -> tuple[BinaryIO, Path]:
        """Open a fresh temporary file for an incoming upload (removed at restart if abandoned)."""
        fd, tmp = tempfile.mkstemp(dir=self.tmp, prefix="upload-")
        return os.fdopen(fd, "w+b"), Path(tmp)

    def commit_temp(self, f: BinaryIO, tmp: Path, known: BlobInfo | None = None) -> BlobInfo:
        """Hash a finished temporary file, fsync it and move it into the store.

        Args:
            f: The open temporary file (closed by this call).
            tmp: Its path.
            known: Hashes already computed while receiving the data (skips re-reading).

        Returns:
            The hashes of the stored blob.
        """
        try:
            f.flush()
            os.fsync(f.fileno())
            if known is None:
                size = f.seek(0, os.SEEK_END)
                f.seek(0)
                h256, h1 = hashlib.sha256(), git_blob_sha1(size)
                while chunk := f.read(CHUNK):
                    h256.update(chunk)
                    h1.update(chunk)
                known = BlobInfo(h256.hexdigest(), h1.hexdigest(), size)
        finally:
            f.close()
        info = known
        dest = self.path(info.sha256)
        if dest.exists():
            tmp.unlink(missing_ok=True)
            self.touch(info.sha256)
        else:
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp, dest)
            fsync_dir(dest.parent)
        return info

    def put_bytes(self, data: bytes) -> BlobInfo:
        """Store `data` and return its hashes."""
        h1 = git_blob_sha1(len(data))
        h1.update(data)
        known = BlobInfo(hashlib.sha256(data).hexdigest(), h1.hexdigest(), len(data))
        if self.exists(known.sha256, known.size):
            self.touch(known.sha256)
            return known
        f, tmp = self.new_temp()
        try:
            f.write(data)
        except BaseException:
            f.close()
            tmp.unlink(missing_ok=True)
            raise
        return self.commit_temp(f, tmp, known)

    def hash_file(self, sha256: str) -> BlobInfo:
        """Re-hash a stored blob (integrity check)."""
        path = self.path(sha256)
        size = path.stat().st_size
        h256, h1 = hashlib.sha256(), git_blob_sha1(size)
        with open(path, "rb") as f:
            while chunk := f.read(CHUNK):
                h256.update(chunk)
                h1.update(chunk)
        return BlobInfo(h256.hexdigest(), h1.hexdigest(), size)

    def clean_tmp(self) -> int:
        """Remove leftovers of interrupted work (uploads, staged repos); returns how many were removed."""
        n = 0
        for p in self.tmp.iterdir():
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
            n += 1
        return n
