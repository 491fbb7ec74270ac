"""`Storage`'s reads: refs, acknowledged commits, revisions resolved to commits, file tables and oids.

A mixin of `Storage` (storage.py), split out for size; it reads the folders and the caches `Storage`
sets up, writes nothing on disk and takes no lock: a commit becomes visible in one `refs.json`
replace, and commits and tree objects are immutable once written. Tree objects: `objects.py`; format-1 file
tables: `trees.py`.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from .blobs import read_json
from .errors import repo_not_found, revision_not_found
from .keys import RepoKey, Resolved
from .objects import TreeStore, is_dir
from .trees import dir_oid, entry_oid
from .validation import check_ref_name, is_hex

Commit = dict[str, Any]
"""A commit: `id`, `parents`, `tree` (root tree id; a path -> file entry table in format 1), `meta`,
`title`, `message`, `author`, `date`."""


class ReadMixin:
    """`refs`, `resolve`, `get_commit`, `history`, `files`, `entry`, `state` and `commit_meta` of
    `Storage` (see its docstring)."""

    def refs(self, key: RepoKey) -> dict[str, Any]:
        """`refs.json`: `branches` (name -> id) and `tags` (name -> {target, message})."""
        try:
            return read_json(self.repo_dir(key) / "refs.json")
        except FileNotFoundError:
            raise repo_not_found(key.id) from None

    def known_commits(self, key: RepoKey, refs: dict[str, Any] | None = None) -> set[str]:
        """Ids of all acknowledged commits (do not modify the returned set)."""
        refs = self.refs(key) if refs is None else refs
        logged = self.log.ids(self.repo_dir(key) / "commits.log")
        legacy = refs.get("commits")
        return logged | set(legacy) if legacy else logged

    def get_commit(self, key: RepoKey, cid: str) -> Commit:
        """Load an (immutable, hence cached) commit."""
        cached = self._commits.get((key, cid))
        if cached is None:
            cached = read_json(self.repo_dir(key) / "commits" / f"{cid}.json")
            tree = cached["tree"]
            self._commits.put((key, cid), cached, len(tree) if isinstance(tree, dict) else 1)
        return cached

    def trees(self, key: RepoKey) -> TreeStore:
        """The tree objects of a repo."""
        return TreeStore(self.repo_dir(key), self.tmp, self._trees)

    def files(self, key: RepoKey, cid: str) -> dict[str, dict]:
        """The file table (path -> file entry) of a commit (do not modify it)."""
        tree = self.get_commit(key, cid)["tree"]
        if isinstance(tree, dict):  # format 1
            return tree
        flat = self._flat.get((key, cid))
        if flat is None:
            flat = dict(self.trees(key).walk(tree))
            self._flat.put((key, cid), flat, len(flat))
        return flat

    def entry(self, key: RepoKey, cid: str, path: str) -> dict[str, Any] | None:
        """The file entry at `path` in a commit, or None (O(depth), without the whole file table)."""
        tree = self.get_commit(key, cid)["tree"]
        if isinstance(tree, dict):
            return tree.get(path)
        found = self.trees(key).lookup(tree, path) if path else None
        return None if found is None or is_dir(found) else found

    def state(self, key: RepoKey, cid: str, path: str, folder: bool) -> str | None:
        """Oid of a file or folder in a commit (None if absent): what `lastCommit` compares."""
        tree = self.get_commit(key, cid)["tree"]
        if isinstance(tree, dict):
            if not folder:
                return entry_oid(tree[path]) if path in tree else None
            return dir_oid(tree, path)
        found = self.trees(key).lookup(tree, path)
        if found is None or is_dir(found) != folder:
            return None
        return found["tree"] if folder else entry_oid(found)

    def folder_oid(self, key: RepoKey, cid: str, folder: str) -> str:
        """Oid of a folder: its tree id (a hash of the paths below it for format-1 commits)."""
        return self.state(key, cid, folder, True) or ""

    def resolve(self, key: RepoKey, revision: str) -> Resolved:
        """Resolve a branch, tag, `refs/heads/x`, `refs/tags/x`, full sha or unique short sha (7-40 hex).

        Raises:
            HubError: 400 `InvalidRevision` or 404 `RevisionNotFound`.
        """
        check_ref_name(revision)
        refs = self.refs(key)
        branches, tags = refs["branches"], refs["tags"]
        if is_hex(revision, 40, 40) and revision in self.known_commits(key, refs):
            return Resolved(revision, None)
        if revision.startswith("refs/heads/"):
            name = revision[len("refs/heads/") :]
            if name in branches:
                return Resolved(branches[name], name)
            raise revision_not_found(revision)
        if revision.startswith("refs/tags/"):
            name = revision[len("refs/tags/") :]
            if name in tags:
                return Resolved(tags[name]["target"], None)
            raise revision_not_found(revision)
        if revision in branches:
            return Resolved(branches[revision], revision)
        if revision in tags:
            return Resolved(tags[revision]["target"], None)
        if is_hex(revision, 7, 40):
            matches = [c for c in self.known_commits(key, refs) if c.startswith(revision)]
            if len(matches) == 1:
                return Resolved(matches[0], None)
            if len(matches) > 1:
                raise revision_not_found(revision, "This short sha is ambiguous; use more characters.")
        raise revision_not_found(revision)

    def history(self, key: RepoKey, cid: str) -> Iterator[Commit]:
        """Commits from `cid` back to the initial commit (first parents)."""
        current: str | None = cid
        while current:
            commit = self.get_commit(key, current)
            yield commit
            current = commit["parents"][0] if commit["parents"] else None

    def commit_meta(self, key: RepoKey, cid: str) -> dict[str, Any]:
        """Metadata stored with a commit (computed, leniently, for format-1 commits)."""
        meta = self.get_commit(key, cid).get("meta")
        return meta if meta is not None else self.meta.derive(lambda p: self.entry(key, cid, p))
