"""Shared request context: configuration, application state, auth and body helpers."""

from __future__ import annotations

import fcntl
import json
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlencode

import anyio.to_thread
from starlette.requests import Request
from starlette.responses import JSONResponse

from .auth import Principal, TokenStore, UrlSigner
from .errors import HubError, RegistryError, repo_not_found, too_large
from .metrics import RegistryMetrics
from .storage import RepoKey, Storage
from .validation import REPO_TYPES, URL_PREFIXES, check_repo_id
from .xet_store import XetStore

T = TypeVar("T")
MB = 1024 * 1024
JSON_BODY_LIMIT = 16 * MB


@dataclass
class RegistryConfig:
    """Server settings.

    Attributes:
        root: Folder holding all state (created if missing).
        lfs_threshold_bytes: Files larger than this are uploaded through Xet (or, by clients with
            `HF_HUB_DISABLE_XET=1`, through the LFS batch API); smaller ones travel inline in the commit.
        max_upload_bytes: Largest file, and largest total of new content in one commit request.
        page_size: Entries per page for tree, commits and model listings (`Link` pagination).
        public_url: Base URL clients use (e.g. behind a reverse proxy); default: from the `Host` header.
        signed_url_ttl_s: Lifetime of signed LFS upload URLs, Xet CAS access tokens and signed xorb URLs.
        body_timeout_s: A request body that sends nothing for this long ends with 408 (a stalled client
            holds no connection, spool file or worker for longer).
        metrics_token: If set, `GET /metrics` answers only `Authorization: Bearer <metrics_token>`;
            None (the default) leaves it open, as exporters are on a loopback-bound server.
    """

    root: Path
    lfs_threshold_bytes: int = 10 * MB
    max_upload_bytes: int = 1024 * MB
    page_size: int = 1000
    public_url: str | None = None
    signed_url_ttl_s: int = 3600
    body_timeout_s: float = 60.0
    metrics_token: str | None = None

    def __post_init__(self) -> None:
        self.root = Path(self.root)
        if self.lfs_threshold_bytes < 0 or self.max_upload_bytes <= 0 or self.page_size <= 0:
            raise ValueError("lfs_threshold_bytes must be >= 0; max_upload_bytes and page_size must be > 0.")
        if not self.body_timeout_s > 0:
            raise ValueError(f"body_timeout_s={self.body_timeout_s!r} must be > 0 seconds.")
        if self.metrics_token is not None and len(self.metrics_token) < 16:
            raise ValueError(
                "The metrics token must have at least 16 characters; generate one with `openssl rand -hex 32`."
            )
        if self.public_url is not None:
            self.public_url = self.public_url.rstrip("/")


class Hub:
    """Application state shared by all requests.

    Args:
        config: Server settings.
    """

    def __init__(self, config: RegistryConfig):
        self.config = config
        self.storage = Storage(config.root)
        self._server_lock = open(self.storage.root / "server.lock", "a+b")  # held until close()
        try:
            fcntl.flock(self._server_lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._server_lock.close()
            raise RegistryError(
                f"Another registry server is already using {self.storage.root}; stop it or choose another --root."
            ) from None
        self.storage.recover()  # safe: no other server can be writing to this root
        self.tokens = TokenStore(config.root)
        self.signer = UrlSigner(config.root)
        self.xet = XetStore(self.storage.root / "xet")
        self._received = {"xorbs": 0, "xorb_bytes": 0, "shards": 0, "shard_bytes": 0}
        self._received_lock = threading.Lock()
        self.metrics = RegistryMetrics()

    def count_received(self, kind: str, nbytes: int) -> None:
        """Count one Xet upload body (`kind` is `xorb` or `shard`), whatever its outcome."""
        with self._received_lock:
            self._received[kind + "s"] += 1
            self._received[kind + "_bytes"] += nbytes

    def xet_received(self) -> dict[str, int]:
        """Xet upload bodies received since the server started: counts and bytes of xorbs and shards."""
        with self._received_lock:
            return dict(self._received)

    @property
    def closed(self) -> bool:
        """Whether `close` was called."""
        return self._server_lock.closed

    def close(self) -> None:
        """Release the root so another server may use it."""
        if not self._server_lock.closed:
            fcntl.flock(self._server_lock, fcntl.LOCK_UN)
            self._server_lock.close()

    def metadata(self, key: RepoKey, commit: str) -> dict[str, Any]:
        """Card metadata and adapterkit family summary of a commit (parsed when the commit was made)."""
        return self.storage.commit_meta(key, commit)


@dataclass
class Ctx:
    """One request.

    Attributes:
        hub: Application state.
        request: The Starlette request.
        params: Path parameters, percent-decoded.
        principal: Authenticated caller, or None when anonymous.
    """

    hub: Hub
    request: Request
    params: dict[str, str]
    principal: Principal | None

    @property
    def storage(self) -> Storage:
        """The registry storage."""
        return self.hub.storage

    def base_url(self) -> str:
        """Base URL as seen by the client (no trailing slash)."""
        if self.hub.config.public_url:
            return self.hub.config.public_url
        return str(self.request.base_url).rstrip("/")

    def self_url(self, query: list[tuple[str, str]]) -> str:
        """Absolute URL of this request's path with another query string (for `Link` pagination)."""
        raw = self.request.scope.get("raw_path") or self.request.url.path.encode()
        return f"{self.base_url()}{raw.decode('latin-1')}?{urlencode(query)}"

    def repo_key(self) -> RepoKey:
        """Repo addressed by the `types` (or implied `type`), `ns` and `name` path parameters."""
        rtype = self.params.get("type") or REPO_TYPES.get(self.params.get("types", ""))
        if rtype is None:
            raise HubError(
                404, "NotFound", f"Unknown repo type {self.params.get('types')!r}: use models or datasets."
            )
        check_repo_id(self.params["ns"], self.params["name"])
        return RepoKey(rtype, self.params["ns"], self.params["name"])

    def repo_url(self, key: RepoKey) -> str:
        """Web URL of a repo (`<base>/ns/name`, `<base>/datasets/ns/name`)."""
        return f"{self.base_url()}/{URL_PREFIXES[key.type]}{key.id}"

    def open_repo(self, write: bool = False) -> tuple[RepoKey, dict[str, Any]]:
        """Load the addressed repo and check access.

        Private repos answer `RepoNotFound` to anyone who cannot read them (never leak existence).
        An id that differs from an existing repo's only in case addresses that repo.

        Args:
            write: Require a write token for the repo's namespace.

        Raises:
            HubError: 404 `RepoNotFound`, 401 `AuthRequired` or 403 `Forbidden`.
        """
        key = self.repo_key()
        meta = self.storage.get_repo(key)
        if meta is None:  # repo ids are case-insensitive, as on the Hub: `alice/Model` is `alice/model`
            same = self.storage.find_repo_ignoring_case(key)
            if same is not None:
                key, meta = same, self.storage.get_repo(same)
        p = self.principal
        if meta is None or (meta["private"] and not (p and p.can_read(key.namespace))):
            raise repo_not_found(key.id)
        if write:
            self.require_write(key.namespace)
        return key, meta

    def require_write(self, namespace: str) -> Principal:
        """The caller, if it holds a write token for `namespace`."""
        p = self.principal
        if p is None:
            raise HubError(
                401,
                "AuthRequired",
                "Authentication required for writes: pass a write token (HF_TOKEN=... or token=...).",
            )
        if not p.can_read(namespace):
            raise HubError(
                403,
                "Forbidden",
                f"User {p.user!r} cannot write to namespace {namespace!r}; use your own namespace.",
            )
        if p.scope != "write":
            raise HubError(
                403,
                "Forbidden",
                "This token has read scope; create one with --scope write to push to this repo.",
            )
        return p

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """Run blocking storage work in a worker thread."""
        return await anyio.to_thread.run_sync(fn, *args)

    def check_length(self, limit: int) -> None:
        """413 before reading anything when the declared `Content-Length` is above `limit`.

        The answer closes the connection, so the server never reads the oversized body.
        """
        declared = self.request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            err = too_large(int(declared), limit)
            err.headers["Connection"] = "close"
            raise err

    async def read_body(self, limit: int = JSON_BODY_LIMIT) -> bytes:
        """Read the whole request body (at most `limit` bytes are ever held; 413 above it)."""
        self.check_length(limit)
        chunks: list[bytes] = []
        total = 0
        async for chunk in self.request.stream():
            total += len(chunk)
            if total > limit:
                err = too_large(total, limit)
                err.headers["Connection"] = "close"
                raise err
            chunks.append(chunk)
        return b"".join(chunks)

    async def json_body(self) -> dict[str, Any]:
        """The request body parsed as a JSON object (400 if it is not one)."""
        body = await self.read_body()
        try:
            data = json.loads(body or b"{}")
        except (ValueError, RecursionError):
            data = None
        if not isinstance(data, dict):
            raise HubError(400, "BadRequest", "The request body must be a JSON object.")
        return data


def json_response(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> JSONResponse:
    """A JSON response."""
    return JSONResponse(data, status_code=status, headers=headers)
