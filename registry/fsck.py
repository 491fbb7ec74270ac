"""Integrity check of a registry root (`adapterkit-registry fsck`).

Every shared folder (tree object) and every blob is checked once, however many commits contain it,
so the time grows with the distinct content, not with commits x files.
"""

from __future__ import annotations

import hashlib

from .blobs import read_json
from .objects import is_dir
from .storage import RepoKey, Storage, commit_id
from .xet_repair import repair_records
from .xet_store import XetStore


def _check_commits(storage: Storage, key: RepoKey, problems: list[str], blobs: dict[str, dict]) -> list[str]:
    """Check refs and commit ids of a repo; returns the root tree ids of its format-2 commits and
    collects the blobs of its format-1 commits (which carry their whole file table)."""
    refs = storage.refs(key)
    known = storage.known_commits(key, refs)
    targets = list(refs["branches"].values()) + [t["target"] for t in refs["tags"].values()]
    # A ref whose commit the log lacks is a crash between the commit point (`refs.json`) and the log
    # append, which `Storage.recover` repairs at the next start: a problem only if its commit file is missing.
    unlogged = {t for t in targets if t not in known}
    commits = storage.repo_dir(key) / "commits"
    problems += [
        f"{key.id}: ref points to unknown commit {t}"
        for t in unlogged
        if not (commits / f"{t}.json").is_file()
    ]
    roots = []
    for cid in sorted(known | unlogged):
        try:
            commit = read_json(storage.repo_dir(key) / "commits" / f"{cid}.json")
        except (OSError, ValueError) as e:
            problems.append(f"{key.id}: commit {cid} unreadable: {e}")
            continue
        if commit_id({k: v for k, v in commit.items() if k != "id"}) != cid:
            problems.append(f"{key.id}: commit {cid} content does not match its id")
        if isinstance(commit["tree"], str):
            roots.append(commit["tree"])
        else:
            for path, entry in commit["tree"].items():
                blobs.setdefault(entry["sha256"], {**entry, "where": f"{key.id}@{cid[:8]}:{path}"})
    return roots


def _check_trees(storage: Storage, key: RepoKey, roots: list[str], problems: list[str]) -> dict[str, dict]:
    """Check that every tree object exists and hashes to its id; returns the blobs they reference."""
    store = storage.trees(key)
    seen: set[str] = set()
    stack = list(dict.fromkeys(roots))
    blobs: dict[str, dict] = {}
    while stack:
        tid = stack.pop()
        if tid in seen:
            continue
        seen.add(tid)
        try:
            data = store.path(tid).read_bytes()
        except OSError:
            problems.append(f"{key.id}: tree {tid[:12]} missing")
            continue
        if hashlib.sha256(data).hexdigest() != tid:
            problems.append(f"{key.id}: tree {tid[:12]} is corrupted")
            continue
        for name, entry in store.read(tid).items():
            if is_dir(entry):
                stack.append(entry["tree"])
            else:
                blobs.setdefault(entry["sha256"], {**entry, "where": f"{key.id}:{tid[:8]}/{name}"})
    return blobs


def fsck(storage: Storage, deep: bool = True) -> list[str]:
    """Check every repo: refs point to known commits, commit ids match content, trees and blobs exist
    and hash right; then the Xet store (every xorb against its hash, every registered file's xorbs),
    opened read-only: fsck may run beside a live server and changes nothing (see `xet_pending`).

    Args:
        storage: The registry storage.
        deep: Also re-hash every referenced blob.

    Returns:
        Problems found (empty when healthy).
    """
    problems: list[str] = []
    blobs: dict[str, dict] = {}
    for key, _ in storage.list_repos():
        roots = _check_commits(storage, key, problems, blobs)
        for sha, entry in _check_trees(storage, key, roots, problems).items():
            blobs.setdefault(sha, entry)
    for sha, entry in sorted(blobs.items()):
        if not storage.blobs.exists(sha, entry["size"]):
            problems.append(f"{entry['where']}: blob missing or truncated")
        elif deep:
            info = storage.blobs.hash_file(sha)
            if (info.sha256, info.sha1) != (sha, entry["sha1"]):
                problems.append(f"{entry['where']}: blob is corrupted")
    if (storage.root / "xet").is_dir():  # xorbs, shards and files stored through Xet, read-only
        problems += [f"xet: {p}" for p in XetStore(storage.root / "xet", read_only=True).fsck()]
    return problems


def xet_pending(storage: Storage) -> list[str]:
    """Xet shard journals not applied yet, one line each: not problems (a server applies its own at
    once, and a crash's at its next start), but their files are not registered until then."""
    if not (storage.root / "xet" / "pending").is_dir():
        return []
    return [
        f"xet: shard journal {p.stem[:12]} pending, applied at next server start (or now, if one is running)"
        for p in XetStore(storage.root / "xet", read_only=True).pending()
    ]


def repair(storage: Storage) -> list[str]:
    """Rebuild what can be derived from the data the registry holds (`fsck --repair`), one line each.

    Puts back the xorbs an interrupted gc left aside, and rebuilds missing or wrong Xet chunk indexes
    (from the xorb bytes) and SHA-256 index entries (from the file records); see `xet_repair`. Safe
    beside a live server: each change is made under the Xet store's apply lock. What cannot be derived
    (a missing xorb, file or shard record, a corrupted blob) is left for `fsck` to report.
    """
    if not (storage.root / "xet" / "xorbs").is_dir():
        return []
    return [f"xet: {line}" for line in repair_records(storage.root / "xet")]
