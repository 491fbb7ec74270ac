"""A commit's file table (path -> file entry): edits, tree listings, siblings, folder oids, last commits."""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING, Any

from .errors import bad_request, entry_not_found

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


def list_tree(tree: dict[str, dict], folder: str, recursive: bool, head: str) -> list[dict[str, Any]]:
    """Entries under `folder` ("" for the root), sorted by path.

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
    entries += [{"type": "directory", "path": d, "oid": dir_oid(tree, d)} for d in dirs]
    return sorted(entries, key=lambda e: e["path"])


def paths_info(tree: dict[str, dict], paths: list[str]) -> list[dict[str, Any]]:
    """Entries for the given paths; missing paths are skipped, as on the Hub."""
    all_dirs = folders(tree)
    out = []
    for path in dict.fromkeys(p.strip("/") for p in paths):
        if path in tree:
            out.append(file_json(path, tree[path]))
        elif path in all_dirs:
            out.append({"type": "directory", "path": path, "oid": dir_oid(tree, path)})
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

    def state(tree: dict[str, dict], e: dict[str, Any]) -> str | None:
        if e["type"] == "file":
            return entry_oid(tree[e["path"]]) if e["path"] in tree else None
        return dir_oid(tree, e["path"])

    pending = {e["path"]: e for e in entries}
    commits = storage.history(key, head)
    current = next(commits)
    for _ in range(MAX_HISTORY_WALK):
        if not pending:
            return
        parent = next(commits, None)
        for path in list(pending):
            e = pending[path]
            if parent is None or state(parent["tree"], e) != state(current["tree"], e):
                e["lastCommit"] = commit_summary(current)
                del pending[path]
        if parent is None:
            return
        current = parent
    for e in pending.values():
        e["lastCommit"] = commit_summary(current)


def apply_operations(
    tree: dict[str, dict], operations: list[tuple[str, str, dict | None]], head: str
) -> dict:
    """Apply add/delete operations to a file table, in order.

    Raises:
        HubError: 404 `EntryNotFound` for deleting what is not there, 400 `InvalidPath` when a file
            would shadow a folder or the other way round.
    """
    dirs: set[str] | None = None  # folders of `tree`, rebuilt lazily after deletions
    for op, path, entry in operations:
        if op == "add":
            dirs = folders(tree) if dirs is None else dirs
            parents = ["/".join(path.split("/")[:i]) for i in range(1, path.count("/") + 1)]
            if path in dirs or any(p in tree for p in parents):
                raise bad_request(
                    f"Cannot add {path!r}: a file and a folder would have the same path.", "InvalidPath"
                )
            tree[path] = entry
            dirs.update(parents)
        elif op == "delete":
            dirs = None
            if tree.pop(path, None) is None:
                raise entry_not_found(path, head)
        else:
            dirs = None
            prefix = path.rstrip("/") + "/"
            doomed = [k for k in tree if k.startswith(prefix)]
            if not doomed:
                raise entry_not_found(path, head)
            for k in doomed:
                del tree[k]
    return tree
