"""Bearer tokens with `read` or `write` scope, stored hashed in `<root>/tokens.db` (SQLite, WAL).

Tokens are random (256 bits), so a plain SHA-256 is enough to store them: the database never holds
a usable secret. Each request looks its token up in the database, so tokens created or revoked with
the CLI while the server runs take effect at once.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import os
import secrets
import sqlite3
import threading
from collections.abc import Iterator
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


def _hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


_SCHEMA = """
CREATE TABLE IF NOT EXISTS tokens (
    id TEXT PRIMARY KEY, hash TEXT NOT NULL UNIQUE, user TEXT NOT NULL, scope TEXT NOT NULL,
    orgs TEXT NOT NULL, name TEXT NOT NULL, created TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS settings (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


class TokenStore:
    """Hashed tokens of a registry root, in SQLite (`<root>/tokens.db`, WAL mode).

    Every change is one transaction, serialised across threads and processes by SQLite's write lock,
    and every request reads the database, so a token created or revoked by the CLI takes effect in
    the running server at once. A `tokens.json` of older registries is imported once.

    Args:
        root: Registry root folder.
    """

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.path = self.root / "tokens.db"
        self._local = threading.local()

    def _db(self) -> sqlite3.Connection:
        """This thread's connection (created, with the schema and the JSON import, on first use)."""
        db = getattr(self._local, "db", None)
        if db is None:
            self.root.mkdir(parents=True, exist_ok=True)
            os.close(os.open(self.path, os.O_CREAT | os.O_RDWR, 0o600))  # never world-readable
            db = sqlite3.connect(self.path, timeout=60, isolation_level=None, check_same_thread=False)
            db.execute("PRAGMA busy_timeout = 60000")
            if db.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
                db.execute("PRAGMA journal_mode = WAL")
            db.execute("PRAGMA synchronous = FULL")
            with self._write(db):
                for statement in _SCHEMA.split(";"):
                    if statement.strip():
                        db.execute(statement)
                self._import_json(db)
            self._local.db = db
        return db

    @staticmethod
    @contextlib.contextmanager
    def _write(db: sqlite3.Connection) -> Iterator[None]:
        """One write transaction, taken at once (BEGIN IMMEDIATE) so concurrent writers queue."""
        db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    def _import_json(self, db: sqlite3.Connection) -> None:
        """Import `tokens.json` (the format before SQLite) once, inside the caller's transaction."""
        legacy = self.root / "tokens.json"
        done = db.execute("SELECT 1 FROM settings WHERE key = 'imported_tokens_json'").fetchone()
        if done or not legacy.exists():
            return
        for t in read_json(legacy).get("tokens", []):
            db.execute(
                "INSERT OR IGNORE INTO tokens VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    t["id"],
                    t["hash"],
                    t["user"],
                    t["scope"],
                    json.dumps(t.get("orgs", [])),
                    t.get("name", ""),
                    t["created"],
                ),
            )
        db.execute("INSERT INTO settings VALUES ('imported_tokens_json', ?)", (now_iso(),))

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
        digest = _hash(token)
        db = self._db()
        with self._write(db):
            self._check_case(db, (user, *orgs), self._namespaces_on_disk())
            db.execute("DELETE FROM tokens WHERE hash = ?", (digest,))
            db.execute(
                "INSERT INTO tokens VALUES (?, ?, ?, ?, ?, ?, ?)",
                (digest[:12], digest, user, scope, json.dumps(list(orgs)), name, now_iso()),
            )
        return token

    def _namespaces_on_disk(self) -> set[str]:
        """Namespaces that hold repos (they outlive their tokens)."""
        kinds = self.root / "repos"
        return (
            {ns.name for kind in kinds.iterdir() if kind.is_dir() for ns in kind.iterdir()}
            if kinds.is_dir()
            else set()
        )

    @staticmethod
    def _check_case(db: sqlite3.Connection, names: tuple[str, ...], on_disk: set[str]) -> None:
        """Refuse a user or organisation whose name differs only in case from a known one (a token's, or a
        namespace holding repos): repo ids are case-insensitive (as on the Hub), so `ALICE` could otherwise
        claim, block or probe `alice`'s repos."""
        known = on_disk | {
            ns
            for user, orgs in db.execute("SELECT user, orgs FROM tokens")
            for ns in (user, *json.loads(orgs))
        }
        for name in names:
            clash = next((k for k in known if k.lower() == name.lower() and k != name), None)
            if clash is not None:
                raise ValueError(
                    f"{name!r} differs only in case from the existing user or organisation {clash!r}; "
                    f"namespaces are case-insensitive: use {clash!r} or another name."
                )

    def revoke(self, token_id: str) -> bool:
        """Revoke the token with this id; returns whether one was removed."""
        db = self._db()
        with self._write(db):
            return db.execute("DELETE FROM tokens WHERE id = ?", (token_id,)).rowcount > 0

    def list(self) -> list[dict]:
        """Token records without their hashes, oldest first."""
        rows = self._db().execute(
            "SELECT id, user, scope, orgs, name, created FROM tokens ORDER BY created, id"
        )
        return [
            {"id": i, "user": u, "scope": s, "orgs": json.loads(o), "name": n, "created": c}
            for i, u, s, o, n, c in rows
        ]

    def authenticate(self, token: str) -> Principal | None:
        """The principal of a token, or None if it is unknown (or revoked, even a moment ago)."""
        row = (
            self._db()
            .execute("SELECT id, user, scope, orgs FROM tokens WHERE hash = ?", (_hash(token),))
            .fetchone()
        )
        if row is None:
            return None
        return Principal(row[1], row[2], tuple(json.loads(row[3])), row[0])

    def by_id(self, token_id: str) -> Principal | None:
        """The principal of the token with this public id, or None once it is revoked.

        Xet CAS tokens name the Hub token they were issued for, so revoking it ends their access too.
        """
        row = (
            self._db()
            .execute("SELECT id, user, scope, orgs FROM tokens WHERE id = ?", (token_id,))
            .fetchone()
        )
        if row is None:
            return None
        return Principal(row[1], row[2], tuple(json.loads(row[3])), row[0])


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
    """HMAC signatures for LFS upload URLs (the client sends those PUTs without `Authorization`), Xet CAS
    access tokens and the signed xorb URLs of Xet reconstructions.

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
