"""Small value types of the storage: repo keys, resolved revisions, file entries, commit ids."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any


def now_iso() -> str:
    """Current UTC time in the Hub's format (`2024-01-31T12:00:00.000Z`)."""
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


@dataclass(frozen=True)
class RepoKey:
    """Identifies a repository.

    Attributes:
        type: `"model"` or `"dataset"`.
        namespace: Owner (user or organisation).
        name: Repo name.
    """

    type: str
    namespace: str
    name: str

    @property
    def id(self) -> str:
        """`namespace/name`."""
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True)
class Resolved:
    """A revision resolved to a commit.

    Attributes:
        commit: 40-hex commit id.
        branch: Branch name when the revision named a branch, else None.
    """

    commit: str
    branch: str | None


def file_entry(sha256: str, sha1: str, size: int, lfs: bool) -> dict[str, Any]:
    """A file of a commit's tree."""
    return {"sha256": sha256, "sha1": sha1, "size": size, "lfs": lfs}


def commit_id(body: dict[str, Any]) -> str:
    """Commit id: SHA-1 of the canonical JSON of the commit (which includes a random nonce)."""
    return hashlib.sha1(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
