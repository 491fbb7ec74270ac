"""Content-addressed tree objects, shared between the commits of a repo (as git stores them).

A tree object is one folder: a JSON mapping of names to entries, either a file entry (`sha256`,
`sha1`, `size`, `lfs`) or a sub-folder `{"tree": <id>}`. Its id is the SHA-256 of its canonical JSON,
so an unchanged folder is stored once however many commits contain it, and a commit writes only the
folders on the paths it changes: O(changed paths x depth), not O(files in the repo).

Objects live in `<repo>/trees/<id>` (one folder, so the new objects of a commit need a single
directory fsync). Readers keep a bounded cache of parsed objects and of
flattened file tables, so memory stays bounded however long the history is.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .blobs import atomic_write_bytes, fsync_dir
from .errors import bad_request, entry_not_found

Tree = dict[str, dict[str, Any]]
CACHE_ENTRIES = 200_000
"""Budget of each reader cache, in tree entries (about 200 bytes each)."""


class LRU:
    """A thread-safe LRU cache whose budget counts a weight per item (tree entries, not items)."""

    def __init__(self, budget: int):
        self.budget = budget
        self._items: OrderedDict[Any, tuple[Any, int]] = OrderedDict()
        self._weight = 0
        self._lock = threading.Lock()

    def get(self, key: Any) -> Any:
        with self._lock:
            item = self._items.get(key)
            if item is None:
                return None
            self._items.move_to_end(key)
            return item[0]

    def put(self, key: Any, value: Any, weight: int) -> None:
        weight = max(weight, 1)
        if weight > self.budget:
            return
        with self._lock:
            old = self._items.pop(key, None)
            self._weight += weight - (old[1] if old else 0)
            self._items[key] = (value, weight)
            while self._weight > self.budget:
                _, (_, w) = self._items.popitem(last=False)
                self._weight -= w

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self._weight = 0


def canonical(tree: Tree) -> bytes:
    """The bytes a tree id is computed from (and that are stored)."""
    return json.dumps(tree, sort_keys=True, separators=(",", ":")).encode()


def tree_id(tree: Tree) -> str:
    """Id of a tree object."""
    return hashlib.sha256(canonical(tree)).hexdigest()


def is_dir(entry: dict[str, Any]) -> bool:
    """Whether a tree entry is a sub-folder."""
    return "tree" in entry


class TreeStore:
    """Tree objects of one repo.

    Args:
        repo_dir: The repo folder.
        tmp: Temporary folder on the same filesystem.
        cache: Shared cache of parsed objects (keyed by `(repo_dir, id)`).
    """

    def __init__(self, repo_dir: Path, tmp: Path, cache: LRU):
        self.dir = repo_dir / "trees"
        self.tmp = tmp
        self.cache = cache

    def path(self, tid: str) -> Path:
        return self.dir / tid

    def read(self, tid: str) -> Tree:
        """A tree object (do not modify the returned dict)."""
        key = (self.dir, tid)
        tree = self.cache.get(key)
        if tree is None:
            with open(self.path(tid), "rb") as f:
                tree = json.load(f)
            self.cache.put(key, tree, len(tree))
        return tree

    def write(self, tree: Tree) -> str:
        """Store a tree object (durably, once) and return its id."""
        return self.write_many([tree])[-1]

    def write_many(self, trees: list[Tree]) -> list[str]:
        """Store tree objects durably (each file fsynced, the folder fsynced once); their ids."""
        ids, written = [], False
        for tree in trees:
            data = canonical(tree)
            tid = hashlib.sha256(data).hexdigest()
            ids.append(tid)
            if not self.path(tid).exists():
                atomic_write_bytes(self.path(tid), data, self.tmp, sync_dir=False)
                written = True
        if written:
            fsync_dir(self.dir)
        return ids

    def lookup(self, tid: str, path: str) -> dict[str, Any] | None:
        """The entry at `path` ("" is the root folder, as `{"tree": tid}`), or None."""
        entry: dict[str, Any] | None = {"tree": tid}
        for name in path.split("/") if path else []:
            if entry is None or not is_dir(entry):
                return None
            entry = self.read(entry["tree"]).get(name)
        return entry

    def walk(self, tid: str, prefix: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
        """`(path, file entry)` of every file below a tree, depth first."""
        for name, entry in self.read(tid).items():
            path = f"{prefix}{name}"
            if is_dir(entry):
                yield from self.walk(entry["tree"], path + "/")
            else:
                yield path, entry

    def reachable(self, tid: str, seen: set[str]) -> Iterator[str]:
        """Ids of `tid` and the trees below it that are not in `seen` (which is updated)."""
        stack = [tid]
        while stack:
            current = stack.pop()
            if current in seen:
                continue
            seen.add(current)
            yield current
            stack += [e["tree"] for e in self.read(current).values() if is_dir(e)]


def build(files: dict[str, dict[str, Any]]) -> list[Tree]:
    """Tree objects of a flat file table (a format-1 commit), the root last."""
    out: list[Tree] = []
    nested: dict[str, Any] = {}
    for path, entry in files.items():
        node = nested
        *folders, name = path.split("/")
        for folder in folders:
            node = node.setdefault(folder, {})
        node[name] = entry

    def emit(node: dict[str, Any]) -> str:
        tree = {
            name: ({"tree": emit(child)} if "sha256" not in child else dict(child))
            for name, child in node.items()
        }
        out.append(tree)
        return tree_id(tree)

    emit(nested)
    return out


class TreeEditor:
    """Applies add/delete operations to a tree, copying only the folders it touches.

    Args:
        store: The repo's tree objects.
        root: Id of the tree to edit.
        head: Commit being edited (named in `EntryNotFound` errors).
    """

    def __init__(self, store: TreeStore, root: str, head: str):
        self.store = store
        self.head = head
        self.nodes: dict[str, Tree] = {"": dict(store.read(root))}
        self.dirty: set[str] = set()

    def _folder(self, folder: str, create: bool) -> Tree | None:
        """The editable folder at `folder`, loaded on first use (created with `create`)."""
        if folder in self.nodes:
            return self.nodes[folder]
        parent_path, _, name = folder.rpartition("/")
        parent = self._folder(parent_path, create)
        if parent is None:
            return None
        entry = parent.get(name)
        if entry is None and not create:
            return None
        if entry is not None and not is_dir(entry):
            if not create:
                return None
            raise bad_request(
                f"Cannot add below {folder!r}: it is a file, and a file and a folder would have the same path.",
                "InvalidPath",
            )
        node: Tree = {} if entry is None else dict(self.store.read(entry["tree"]))
        if entry is None:
            parent[name] = {"tree": ""}  # placeholder, filled in by `write`
        self.nodes[folder] = node
        return node

    def _touch(self, folder: str) -> None:
        while True:
            self.dirty.add(folder)
            if not folder:
                return
            folder = folder.rpartition("/")[0]

    def add(self, path: str, entry: dict[str, Any]) -> None:
        folder, _, name = path.rpartition("/")
        node = self._folder(folder, create=True)
        assert node is not None
        if name in node and is_dir(node[name]):
            raise bad_request(
                f"Cannot add {path!r}: a file and a folder would have the same path.", "InvalidPath"
            )
        node[name] = entry
        self._touch(folder)

    def delete(self, path: str, folder_op: bool) -> None:
        parent, _, name = path.rpartition("/")
        node = self._folder(parent, create=False)
        entry = node.get(name) if node is not None else None
        if entry is None or is_dir(entry) != folder_op:
            raise entry_not_found(path, self.head)
        del node[name]
        if folder_op:
            for key in [k for k in self.nodes if k == path or k.startswith(path + "/")]:
                del self.nodes[key]
                self.dirty.discard(key)
        self._touch(parent)

    def write(self) -> str:
        """Store the changed folders, deepest first (empty folders vanish, as in git); the root id."""
        changed = []
        for folder in sorted(self.dirty, key=lambda f: (f.count("/"), len(f)), reverse=True):
            if folder == "":
                continue
            node = self.nodes[folder]
            parent_path, _, name = folder.rpartition("/")
            parent = self.nodes[parent_path]
            if node:
                parent[name] = {"tree": tree_id(node)}
                changed.append(node)
            else:
                parent.pop(name, None)
        return self.store.write_many([*changed, self.nodes[""]])[-1]
