"""Bearer tokens with `read` or `write` scope, stored hashed in `<root>/tokens.json`.

Tokens are random (256 bits), so a plain SHA-256 is enough to store them: the file never holds a
usable secret. The file is re-read when it changes, so tokens created with the CLI while the server
runs work at once.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
from dataclasses import dataclass, field
from pathlib import Path

from .blobs import atomic_write_json, read_json
from .storage import now_iso
from .validation import check_name

SCOPES = ("read", "write")
TOKEN_PREFIX = "akr_"


@dataclass(frozen=True)
class Principal:
    """The authenticated caller.

    Attributes:
        user: User name; also the namespace the token may write to.
        scope: `"read"` or `"write"`.
        orgs: Extra namespaces (organisations) the token may read and write.
        token_id: Short public id of the token (for listing and revoking).
    """

    user: str
    scope: str
    orgs: tuple[str, ...] = field(default_factory=tuple)
    token_id: str = ""

    def can_read(self, namespace: str) -> bool:
        """Whether private repos of `namespace` are visible to this token."""
        return namespace == self.user or namespace in self.orgs

    def can_write(self, namespace: str) -> bool:
        """Whether this token may create repos and commit in `namespace`."""
        return self.scope == "write" and self.can_read(namespace)


def _hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class TokenStore:
    """Hashed tokens of a registry root.

    Args:
        root: Registry root folder.
    """

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.path = self.root / "tokens.json"
        self._lock = threading.Lock()
        self._cache: tuple[tuple[int, int, int], dict] | None = None

    def _load(self) -> dict:
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return {"format_version": 1, "tokens": []}
        stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
        if self._cache is None or self._cache[0] != stamp:
            self._cache = (stamp, read_json(self.path))
        return self._cache[1]

    def create(self, user: str, scope: str = "write", name: str = "", orgs: tuple[str, ...] = ()) -> str:
        """Create a token and return it (the only time the plain token is available).

        Args:
            user: User name (a valid namespace).
            scope: `"read"` or `"write"`.
            name: Free-form label.
            orgs: Extra namespaces the token may use.

        Returns:
            The token, e.g. `akr_3q...`.
        """
        return self.add(TOKEN_PREFIX + secrets.token_urlsafe(32), user, scope, name, orgs)

    def add(
        self, token: str, user: str, scope: str = "write", name: str = "", orgs: tuple[str, ...] = ()
    ) -> str:
        """Register a token chosen by the caller (tests, provisioning) and return it."""
        if scope not in SCOPES:
            raise ValueError(f"Unknown scope {scope!r}: use one of {SCOPES}.")
        if len(token) < 16:
            raise ValueError("Tokens must be at least 16 characters long.")
        for ns in (user, *orgs):
            check_name(ns, "user/organisation name")
        with self._lock:
            data = dict(self._load())
            digest = _hash(token)
            tokens = [t for t in data.get("tokens", []) if t["hash"] != digest]
            tokens.append(
                {
                    "id": digest[:12],
                    "hash": digest,
                    "user": user,
                    "scope": scope,
                    "orgs": list(orgs),
                    "name": name,
                    "created": now_iso(),
                }
            )
            self.root.mkdir(parents=True, exist_ok=True)
            (self.root / "tmp").mkdir(exist_ok=True)
            atomic_write_json(self.path, {"format_version": 1, "tokens": tokens}, self.root / "tmp")
            self.path.chmod(0o600)
        return token

    def revoke(self, token_id: str) -> bool:
        """Revoke the token with this id; returns whether one was removed."""
        with self._lock:
            data = self._load()
            tokens = [t for t in data.get("tokens", []) if t["id"] != token_id]
            if len(tokens) == len(data.get("tokens", [])):
                return False
            atomic_write_json(self.path, {"format_version": 1, "tokens": tokens}, self.root / "tmp")
        return True

    def list(self) -> list[dict]:
        """Token records without their hashes."""
        return [{k: v for k, v in t.items() if k != "hash"} for t in self._load().get("tokens", [])]

    def authenticate(self, token: str) -> Principal | None:
        """The principal of a token, or None if it is unknown."""
        digest = _hash(token)
        for t in self._load().get("tokens", []):
            if hmac.compare_digest(t["hash"], digest):
                return Principal(t["user"], t["scope"], tuple(t.get("orgs", ())), t["id"])
        return None


def create_token(
    root: str | Path, user: str, scope: str = "write", name: str = "", orgs: tuple[str, ...] = ()
) -> str:
    """Create a token in a registry root (works whether or not a server is running).

    Example:
        >>> token = create_token("/srv/registry", "alice", scope="write")  # doctest: +SKIP

    Args:
        root: Registry root folder.
        user: User name; the token may write to this namespace.
        scope: `"read"` or `"write"`.
        name: Free-form label.
        orgs: Extra namespaces (organisations) the token may use.

    Returns:
        The plain token; it is stored only as a hash.
    """
    return TokenStore(root).create(user, scope, name, orgs)


class UrlSigner:
    """HMAC signatures for LFS upload URLs (the client sends those PUTs without `Authorization`).

    The key lives in `<root>/secret.key` (created on first use, mode 0600).

    Args:
        root: Registry root folder.
    """

    def __init__(self, root: str | Path):
        path = Path(root) / "secret.key"
        if not path.exists():
            (Path(root) / "tmp").mkdir(parents=True, exist_ok=True)
            atomic_write_json(path, {"key": secrets.token_hex(32)}, Path(root) / "tmp")
            path.chmod(0o600)
        self._key = bytes.fromhex(read_json(path)["key"])

    def sign(self, *fields: str) -> str:
        """Signature of the `|`-joined fields."""
        return hmac.new(self._key, "|".join(fields).encode(), hashlib.sha256).hexdigest()

    def verify(self, signature: str, *fields: str) -> bool:
        """Whether `signature` was made by `sign(*fields)`."""
        return hmac.compare_digest(self.sign(*fields), signature)
