"""Upkeep of a registry root: recovery after a crash, and the blobs that revisions reference."""

from __future__ import annotations

import logging
import shutil
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from .blobs import atomic_write_json
from .errors import HubError
from .objects import is_dir

if TYPE_CHECKING:
    from .storage import RepoKey, Storage

logger = logging.getLogger(__name__)


def recover(storage: Storage) -> None:
    """Drop leftovers of interrupted work (temporary files, commits nothing lists) and repair logs."""
    removed = storage.blobs.clean_tmp()
    shutil.rmtree(storage.root / "trash", ignore_errors=True)
    for key, meta in storage.list_repos():
        if meta.get("id") != key.id:  # a move interrupted between its rename and this rewrite
            atomic_write_json(storage.repo_dir(key) / "repo.json", {**meta, "id": key.id}, storage.tmp)
        known = repair_log(storage, key)
        for p in (storage.repo_dir(key) / "commits").glob("*.json"):
            if p.stem not in known:
                p.unlink()
                removed += 1
    if removed:
        logger.info("recovery removed %d leftover file(s) of interrupted uploads", removed)


def repair_log(storage: Storage, key: RepoKey) -> set[str]:
    """Drop a torn last line of `commits.log` and add commits a ref reaches but the log lacks."""
    path = storage.repo_dir(key) / "commits.log"
    ids = storage.log.read_ordered(path)
    refs = storage.refs(key)
    known = set(ids) | set(refs.get("commits", []))
    missing: list[str] = []
    heads = list(refs["branches"].values()) + [t["target"] for t in refs["tags"].values()]
    for head in heads:
        current: str | None = head
        while current and current not in known and current not in missing:
            missing.append(current)
            parents = storage.get_commit(key, current)["parents"]
            current = parents[0] if parents else None
    if missing or (path.exists() and path.stat().st_size != 41 * len(ids)):
        storage.log.rewrite(path, ids + missing[::-1], storage.tmp)
    return known | set(missing)


def file_entries(storage: Storage, key: RepoKey) -> Iterator[tuple[str, str, dict[str, Any]]]:
    """`(commit id, name, file entry)` for each file of each acknowledged commit, every shared
    folder visited once (for gc and fsck: O(distinct folders), not O(commits x files))."""
    seen: set[str] = set()
    store = storage.trees(key)
    for cid in sorted(storage.known_commits(key)):
        tree = storage.get_commit(key, cid)["tree"]
        if isinstance(tree, dict):
            for path, entry in tree.items():
                yield cid, path, entry
            continue
        for tid in store.reachable(tree, seen):
            for name, entry in store.read(tid).items():
                if not is_dir(entry):
                    yield cid, name, entry


def referenced_blobs(storage: Storage) -> set[str]:
    """SHA-256 of every blob that a commit of any repo, or an uploaded LFS object, references."""
    out: set[str] = set()
    for key, _ in storage.list_repos():
        try:
            out.update(e["sha256"] for _, _, e in file_entries(storage, key))
        except (HubError, FileNotFoundError):  # deleted meanwhile
            continue
        lfs = storage.repo_dir(key) / "lfs"
        if lfs.is_dir():
            out.update(p.name for p in lfs.iterdir())
    return out
