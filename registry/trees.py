"""A commit's file table (path -> file entry): edits, tree listings, siblings, folder oids, last commits."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .errors import entry_not_found

if TYPE_CHECKING:
    from .storage import RepoKey, Storage

LFS_POINTER = "version https://git-lfs.github.com/spec/v1\noid sha256:{oid}\nsize {size}\n"
MAX_HISTORY_WALK = 1000


def pointer_bytes(entry: dict[str, Any]) -> bytes:
    """The git-lfs pointer file of an LFS entry."""
    return LFS_POINTER.format(oid=entry["sha256"], size=entry["size"]).encode()


def entry_oid(entry: dict[str, Any]) -> str:
    """Git blob oid as the Hub reports it: of the content, or of the pointer file for LFS files."""
    if not entry["lfs"]:
        return entry["sha1"]
    ptr = pointer_bytes(entry)
    return hashlib.sha1(b"blob %d\0" % len(ptr) + ptr).hexdigest()


def file_json(path: str, entry: dict[str, Any]) -> dict[str, Any]:
    """A tree / paths-info entry for a file."""
    out: dict[str, Any] = {"type": "file", "path": path, "oid": entry_oid(entry), "size": entry["size"]}
    if entry["lfs"]:
        out["lfs"] = {"oid": entry["sha256"], "size": entry["size"], "pointerSize": len(pointer_bytes(entry))}
    return out


def dir_oid(tree: dict[str, dict], folder: str) -> str:
    """A stable oid for a folder: hash of the paths and oids below it."""
    prefix = folder + "/"
    h = hashlib.sha1()
    for path in sorted(p for p in tree if p.startswith(prefix)):
        h.update(f"{path}\0{entry_oid(tree[path])}\n".encode())
    return h.hexdigest()


def folders(tree: dict[str, dict]) -> set[str]:
    """All folders of a file table."""
    out = set()
    for path in tree:
        parts = path.split("/")[:-1]
        out.update("/".join(parts[: i + 1]) for i in range(len(parts)))
    return out


def list_tree(
    tree: dict[str, dict], folder: str, recursive: bool, head: str, oid: Callable[[str], str]
) -> list[dict[str, Any]]:
    """Entries under `folder` ("" for the root), sorted by path; `oid(folder)` gives folder oids.

    Raises:
        HubError: 404 `EntryNotFound` if `folder` is not a folder of this revision.
    """
    all_dirs = folders(tree)
    if folder and folder not in all_dirs:
        raise entry_not_found(folder, head)
    prefix = folder + "/" if folder else ""
    depth = prefix.count("/")
    files = [p for p in tree if p.startswith(prefix) and (recursive or p.count("/") == depth)]
    dirs = [d for d in all_dirs if d.startswith(prefix) and (recursive or d.count("/") == depth)]
    entries = [file_json(p, tree[p]) for p in files]
    entries += [{"type": "directory", "path": d, "oid": oid(d)} for d in dirs]
    return sorted(entries, key=lambda e: e["path"])


def paths_info(tree: dict[str, dict], paths: list[str], oid: Callable[[str], str]) -> list[dict[str, Any]]:
    """Entries for the given paths; missing paths are skipped, as on the Hub."""
    all_dirs = folders(tree)
    out = []
    for path in dict.fromkeys(p.strip("/") for p in paths):
        if path in tree:
            out.append(file_json(path, tree[path]))
        elif path in all_dirs:
            out.append({"type": "directory", "path": path, "oid": oid(path)})
    return out


def sibling(path: str, entry: dict[str, Any], blobs: bool) -> dict[str, Any]:
    """A `siblings` item of repo info (sizes and oids only with `blobs=True`)."""
    if not blobs:
        return {"rfilename": path}
    out: dict[str, Any] = {"rfilename": path, "size": entry["size"], "blobId": entry_oid(entry)}
    if entry["lfs"]:
        out["lfs"] = {
            "sha256": entry["sha256"],
            "size": entry["size"],
            "pointerSize": len(pointer_bytes(entry)),
        }
    return out


def commit_summary(commit: dict[str, Any]) -> dict[str, Any]:
    """`lastCommit` object of an expanded entry."""
    return {"id": commit["id"], "title": commit["title"], "date": commit["date"]}


def add_last_commits(storage: Storage, key: RepoKey, head: str, entries: list[dict[str, Any]]) -> None:
    """Fill `lastCommit` of each entry: the newest commit that changed it (walks first parents)."""

    def state(commit: dict[str, Any], e: dict[str, Any]) -> str | None:
        return storage.state(key, commit["id"], e["path"], e["type"] == "directory")

    pending = {e["path"]: e for e in entries}
    commits = storage.history(key, head)
    current = next(commits)
    for _ in range(MAX_HISTORY_WALK):
        if not pending:
            return
        parent = next(commits, None)
        for path in list(pending):
            e = pending[path]
            if parent is None or state(parent, e) != state(current, e):
                e["lastCommit"] = commit_summary(current)
                del pending[path]
        if parent is None:
            return
        current = parent
    for e in pending.values():
        e["lastCommit"] = commit_summary(current)
