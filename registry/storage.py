"""Repositories, commits and refs on disk.

The one owner of a repo's refs and commit log, whose writers share one lock (keys, upkeep, refs,
commitlog and metadata live in their own modules; the reads of refs, commits and file tables in
`storage_read.py`).

Layout under the root (see `docs/registry.md`)::

    objects/ab/<sha256>                  content-addressed blobs (BlobStore)
    repos/<type>s/<ns>/<name>/repo.json  id, type, private, owner, createdAt
    repos/<type>s/<ns>/<name>/refs.json  branches and tags
    repos/<type>s/<ns>/<name>/commits.log         ids of all acknowledged commits (CommitLog)
    repos/<type>s/<ns>/<name>/commits/<id>.json   immutable commit: parents, root tree id, metadata, message
    repos/<type>s/<ns>/<name>/trees/ab/<id>       content-addressed folders shared by commits (objects.py)
    repos/<type>s/<ns>/<name>/lfs/<sha256>        LFS objects uploaded to this repo (and their Xet hash)

A commit writes its blobs, its changed folders, its commit file, then replaces `refs.json` (under a
per-repo lock), then appends its id to `commits.log`. `refs.json` is the single commit point: a crash
before it leaves the previous state intact, and a commit file that nothing lists is invisible and
removed at the next start. Commits of the first format (a full file table in `tree`, ids listed in
`refs.json`) are still read.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .blobs import BlobInfo, BlobStore, atomic_write_json, fsync_dir, read_json
from .commitlog import CommitLog
from .errors import HubError, RegistryError, repo_not_found, revision_not_found
from .flock import file_lock
from .keys import RepoKey, Resolved, commit_id, file_entry, now_iso
from .metadata import MetadataParser
from .objects import CACHE_ENTRIES, LRU, TreeEditor, TreeStore, build, is_dir
from .storage_read import ReadMixin
from .validation import is_hex

logger = logging.getLogger(__name__)
__all__ = ["RepoKey", "Resolved", "Storage", "commit_id", "file_entry", "now_iso"]

FORMAT_VERSION = 2
"""Root format (`registry.json`); version 1 roots are read and upgraded in place."""
COMMIT_FORMAT = 2


class Storage(ReadMixin):
    """All persistent state of a registry root (its reads: `ReadMixin`, storage_read.py).

    Args:
        root: Folder holding the registry.
        create: Create the root if it is missing; otherwise refuse a folder that is not a registry.

    Raises:
        RegistryError: If the root cannot be used (not a registry, not writable, unknown format).
    """

    def __init__(self, root: str | Path, create: bool = True):
        self.root = Path(root).resolve()
        marker = self.root / "registry.json"
        if not create and not marker.is_file():
            raise RegistryError(
                f"{self.root} is not a registry root (it has no registry.json); check the --root path."
            )
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            self.blobs = BlobStore(self.root)
            self.repos = self.root / "repos"
            self.repos.mkdir(exist_ok=True)
            if not marker.exists():
                atomic_write_json(marker, {"format_version": FORMAT_VERSION}, self.blobs.tmp)
            version = read_json(marker).get("format_version")
            if version == 1:  # first format: still readable; new commits are written in format 2
                if (
                    create
                ):  # (a server; fsck and token commands leave an old root as it is: no rollback blocked)
                    atomic_write_json(marker, {"format_version": FORMAT_VERSION}, self.blobs.tmp)
                version = FORMAT_VERSION
        except (OSError, ValueError, AttributeError) as e:
            raise RegistryError(
                f"Cannot use {self.root} as a registry root ({e}); pass --root a folder you can write to."
            ) from e
        self.tmp = self.blobs.tmp
        if version != FORMAT_VERSION:
            raise RegistryError(
                f"{marker} has format_version {version!r}; this adapterkit-registry reads {FORMAT_VERSION}. "
                "Upgrade adapterkit or use another --root."
            )
        self._locks: dict[RepoKey, threading.Lock] = {}
        self._locks_guard = threading.Lock()
        self._commits = LRU(CACHE_ENTRIES)  # (key, id) -> commit, weighed by its size
        self._trees = LRU(CACHE_ENTRIES)  # (trees folder, id) -> tree object
        self._flat = LRU(CACHE_ENTRIES)  # (key, id) -> file table
        self.log = CommitLog()
        self.meta = MetadataParser(self.blobs)

    # ----------------------------------------------------------------- housekeeping
    def recover(self) -> None:
        """Drop leftovers of interrupted work and repair commit logs (see `upkeep.recover`)."""
        from .upkeep import recover

        recover(self)

    @contextlib.contextmanager
    def lock(self, key: RepoKey) -> Iterator[None]:
        """Serialise writers of one repo, across threads and across processes (flock)."""
        with self._locks_guard:
            tlock = self._locks.setdefault(key, threading.Lock())
        with tlock:
            lock_path = self.repos / f"{key.type}s" / key.namespace / f".{key.name}.lock"
            lock_path.parent.mkdir(parents=True, exist_ok=True)
            with file_lock(lock_path):
                yield

    # ----------------------------------------------------------------- repos
    def repo_dir(self, key: RepoKey) -> Path:
        """Folder of a repo (it may not exist)."""
        return self.repos / f"{key.type}s" / key.namespace / key.name

    def get_repo(self, key: RepoKey) -> dict[str, Any] | None:
        """`repo.json` of a repo, or None if it does not exist."""
        try:
            return read_json(self.repo_dir(key) / "repo.json")
        except FileNotFoundError:
            return None

    def list_repos(self, repo_type: str | None = None) -> list[tuple[RepoKey, dict[str, Any]]]:
        """All repos (optionally of one type), sorted by id."""
        out = []
        for tdir in sorted(self.repos.iterdir()):
            rtype = tdir.name[:-1]
            if not tdir.is_dir() or (repo_type and rtype != repo_type):
                continue
            for meta_path in sorted(tdir.glob("*/*/repo.json")):
                key = RepoKey(rtype, meta_path.parent.parent.name, meta_path.parent.name)
                try:
                    out.append((key, read_json(meta_path)))
                except FileNotFoundError:  # deleted meanwhile
                    continue
        return out

    def find_repo_ignoring_case(self, key: RepoKey) -> RepoKey | None:
        """The existing repo whose id equals `key.id` up to case (the Hub treats them as one), if any."""
        if (self.repo_dir(key) / "repo.json").exists():
            return key
        tdir = self.repos / f"{key.type}s"
        if not tdir.is_dir():
            return None
        for ns in tdir.iterdir():
            if ns.name.lower() != key.namespace.lower() or not ns.is_dir():
                continue
            for repo in ns.iterdir():
                if repo.name.lower() == key.name.lower() and (repo / "repo.json").exists():
                    return RepoKey(key.type, ns.name, repo.name)
        return None

    def create_repo(self, key: RepoKey, owner: str, private: bool) -> dict[str, Any]:
        """Create a repo with an empty initial commit on `main`.

        Raises:
            HubError: 409 `RepoExists` if it already exists.
        """
        with self.lock(key):
            final = self.repo_dir(key)
            same = self.find_repo_ignoring_case(key)
            if same is not None:
                raise HubError(
                    409,
                    "RepoExists",
                    f"You already created this repo: {same.id} (repo ids are case-insensitive).",
                    headers={"X-Existing-Repo": same.id},
                )
            staging = self.tmp / f"repo-{uuid.uuid4().hex}"
            (staging / "commits").mkdir(parents=True)
            (staging / "lfs").mkdir()
            created = now_iso()
            meta = {"id": key.id, "type": key.type, "private": private, "owner": owner, "createdAt": created}
            root = TreeStore(staging, self.tmp, self._trees).write({})
            cid = self._write_commit(
                staging, [], root, self.meta.derive(lambda _: None), owner, "initial commit", "", created
            )
            atomic_write_json(staging / "refs.json", {"branches": {"main": cid}, "tags": {}}, self.tmp)
            self.log.rewrite(staging / "commits.log", [cid], self.tmp)
            atomic_write_json(staging / "repo.json", meta, self.tmp)
            final.parent.mkdir(parents=True, exist_ok=True)
            if final.exists():  # leftover of a delete interrupted by a crash
                shutil.rmtree(final)
            staging.rename(final)
            fsync_dir(final.parent)
        return meta

    def delete_repo(self, key: RepoKey) -> None:
        """Delete a repo (its blobs stay in the shared store)."""
        with self.lock(key):
            src = self.repo_dir(key)
            if not (src / "repo.json").exists():
                raise repo_not_found(key.id)
            trash = self.root / "trash"
            trash.mkdir(exist_ok=True)
            dest = trash / uuid.uuid4().hex
            src.rename(dest)
            fsync_dir(src.parent)
            self.forget_cached()
        shutil.rmtree(dest, ignore_errors=True)

    def forget_cached(self) -> None:
        """Drop the cached commits and file tables (after a repo is deleted or moved)."""
        self._commits.clear()
        self._flat.clear()

    def set_private(self, key: RepoKey, private: bool) -> None:
        """Change the visibility of a repo."""
        with self.lock(key):
            meta = self.get_repo(key)
            if meta is None:
                raise repo_not_found(key.id)
            meta["private"] = private
            atomic_write_json(self.repo_dir(key) / "repo.json", meta, self.tmp)

    # ----------------------------------------------------------------- LFS objects and commits
    def register_lfs(self, key: RepoKey, info: BlobInfo, xet_hash: str | None = None) -> None:
        """Record that LFS object `info.sha256` was uploaded to this repo and verified; `xet_hash` is the
        Xet file hash of the same bytes when they came through Xet (verified against the SHA-256). Under
        the repo's lock: never under the old id of a repo moved meanwhile (404 `RepoNotFound` then)."""
        marker = self.repo_dir(key) / "lfs" / info.sha256
        with self.lock(key):
            if not (self.repo_dir(key) / "repo.json").is_file():
                raise repo_not_found(key.id)
            old = self.lfs_object(key, info.sha256) if marker.exists() else None
            if old is None or (xet_hash and old.get("xet") != xet_hash):
                record = {"sha1": info.sha1, "size": info.size, **({"xet": xet_hash} if xet_hash else {})}
                atomic_write_json(marker, record, self.tmp)

    def lfs_xet(self, key: RepoKey, sha256: str) -> str | None:
        """Xet file hash of an LFS object of this repo that was uploaded through Xet, else None."""
        info = self.lfs_object(key, sha256)
        xet = info.get("xet") if info else None
        return xet if isinstance(xet, str) and is_hex(xet, 64, 64) else None

    def lfs_object(self, key: RepoKey, sha256: str) -> dict[str, Any] | None:
        """`{"sha1", "size"}` of an LFS object this repo may reference in a commit, else None."""
        try:
            info = read_json(self.repo_dir(key) / "lfs" / sha256)
        except (FileNotFoundError, ValueError):
            return None
        return info if self.blobs.exists(sha256, info["size"]) else None

    def _write_commit(
        self,
        repo_dir: Path,
        parents: list[str],
        tree: str,
        meta: dict[str, Any],
        author: str,
        title: str,
        message: str,
        date: str,
    ) -> str:
        body = {
            "format_version": COMMIT_FORMAT,
            "parents": parents,
            "tree": tree,
            "meta": meta,
            "author": author,
            "title": title,
            "message": message,
            "date": date,
            "nonce": uuid.uuid4().hex,
        }
        cid = commit_id(body)
        atomic_write_json(repo_dir / "commits" / f"{cid}.json", {**body, "id": cid}, self.tmp)
        return cid

    def _root_tree(self, key: RepoKey, cid: str) -> str:
        """Root tree id of a commit; a format-1 commit's file table is stored as trees first."""
        tree = self.get_commit(key, cid)["tree"]
        return tree if isinstance(tree, str) else self.trees(key).write_many(build(tree))[-1]

    def _move_legacy_ids(self, key: RepoKey, refs: dict[str, Any]) -> None:
        """Move the format-1 list of commit ids from `refs.json` into `commits.log` (once)."""
        legacy = refs.pop("commits", None)
        if legacy:
            path = self.repo_dir(key) / "commits.log"
            self.log.rewrite(path, list(dict.fromkeys(legacy + self.log.read_ordered(path))), self.tmp)

    def commit(
        self,
        key: RepoKey,
        branch: str,
        operations: list[tuple[str, str, dict | None]],
        author: str,
        title: str,
        message: str,
        parent_commit: str | None = None,
    ) -> str:
        """Apply operations on top of a branch head and move the branch; blobs must already be stored.

        Args:
            key: The repo.
            branch: Branch to commit to (must exist).
            operations: `("add", path, file_entry)`, `("delete", path, None)` or `("delete_folder", path, None)`.
            author: User name.
            title: Commit summary.
            message: Commit description.
            parent_commit: If given, the branch head must be this commit.

        Returns:
            The new commit id.

        Raises:
            HubError: 404 `RevisionNotFound` (missing branch), 412 `ParentCommitMismatch`, 404
                `EntryNotFound` (deleting a missing file) or 400 `InvalidPath` (file/folder clash).
        """
        with self.lock(key):
            if self.get_repo(key) is None:
                raise repo_not_found(key.id)
            refs = self.refs(key)
            head = _head(refs, branch, parent_commit)
            store = self.trees(key)
            editor = TreeEditor(store, self._root_tree(key, head), head)
            for op, path, entry in operations:
                if op == "add":
                    editor.add(path, entry)
                else:
                    editor.delete(path, folder_op=op == "delete_folder")
            root = editor.write()
            touched = any(op == "add" and path == "README.md" for op, path, _ in operations)
            meta = self.meta.derive(lambda p: _file_at(store, root, p), strict_card=touched)
            cid = self._write_commit(
                self.repo_dir(key), [head], root, meta, author, title, message, now_iso()
            )
            self._move_legacy_ids(key, refs)
            refs["branches"][branch] = cid
            atomic_write_json(self.repo_dir(key) / "refs.json", refs, self.tmp)  # the commit point
            self.log.append(self.repo_dir(key) / "commits.log", cid)
            return cid


def _head(refs: dict[str, Any], branch: str, parent_commit: str | None) -> str:
    """Head of the branch a commit goes to, which must be `parent_commit` when that is given."""
    head = refs["branches"].get(branch)
    if head is None:
        raise revision_not_found(branch, "Commits go to existing branches; create it with create_branch.")
    if parent_commit is not None and parent_commit != head:
        raise HubError(
            412,
            "ParentCommitMismatch",
            f"Conflict: parent commit {parent_commit} is not the head of {branch!r} ({head}); "
            "another commit landed first. Fetch the new head and retry.",
        )
    return head


def _file_at(store: TreeStore, root: str, path: str) -> dict[str, Any] | None:
    found = store.lookup(root, path)
    return None if found is None or is_dir(found) else found
