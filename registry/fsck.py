"""Integrity check of a registry root (`adapterkit-registry fsck`)."""

from __future__ import annotations

from .blobs import read_json
from .storage import Storage, commit_id


def fsck(storage: Storage, deep: bool = True) -> list[str]:
    """Check every repo: refs point to known commits, commit ids match content, blobs exist and hash right.

    Args:
        storage: The registry storage.
        deep: Also re-hash every referenced blob.

    Returns:
        Problems found (empty when healthy).
    """
    problems: list[str] = []
    checked: set[str] = set()
    for key, _ in storage.list_repos():
        refs = storage.refs(key)
        known = set(refs["commits"])
        targets = list(refs["branches"].values()) + [t["target"] for t in refs["tags"].values()]
        problems += [f"{key.id}: ref points to unknown commit {t}" for t in targets if t not in known]
        for cid in refs["commits"]:
            try:
                commit = read_json(storage.repo_dir(key) / "commits" / f"{cid}.json")
            except (OSError, ValueError) as e:
                problems.append(f"{key.id}: commit {cid} unreadable: {e}")
                continue
            if commit_id({k: v for k, v in commit.items() if k != "id"}) != cid:
                problems.append(f"{key.id}: commit {cid} content does not match its id")
            for path, entry in commit["tree"].items():
                sha = entry["sha256"]
                if not storage.blobs.exists(sha, entry["size"]):
                    problems.append(f"{key.id}@{cid[:8]}: blob of {path} missing or truncated")
                elif deep and sha not in checked:
                    info = storage.blobs.hash_file(sha)
                    if (info.sha256, info.sha1) != (sha, entry["sha1"]):
                        problems.append(f"{key.id}@{cid[:8]}: blob of {path} is corrupted")
                    checked.add(sha)
    return problems
