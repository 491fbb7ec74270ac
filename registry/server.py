"""Run the registry in-process (tests, notebooks, the quick start) on a background thread."""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType

import uvicorn

from .app import create_app
from .context import MB, RegistryConfig

logger = logging.getLogger(__name__)


class RegistryServer:
    """A registry served by uvicorn on a background thread.

    Example:
        >>> with RegistryServer("/tmp/reg", tokens={"my-secret-token-123": ("alice", "write")}) as srv:
        ...     print(srv.url)  # doctest: +SKIP
        http://127.0.0.1:54321

    Args:
        root: Folder holding the registry state (created if missing).
        host: Interface to bind.
        port: Port to bind; 0 picks a free one (see `url` / `port` once started).
        tokens: Plain tokens to register before starting, mapping token -> `(user, scope)`.
        lfs_threshold_mb: Files above this size go through Xet (or the LFS batch API for clients
            with `HF_HUB_DISABLE_XET=1`); smaller ones travel inline in the commit.
        max_upload_mb: Largest accepted file / commit content.
        page_size: Entries per page of paginated listings.
        public_url: Base URL clients see, when behind a proxy.
        log_level: uvicorn log level.
        body_timeout_s: A request body that sends nothing for this long ends with 408.
        metrics_token: Scrape secret `GET /metrics` requires (`Authorization: Bearer ...`); None: open.
    """

    def __init__(
        self,
        root: str | Path,
        host: str = "127.0.0.1",
        port: int = 0,
        tokens: Mapping[str, tuple[str, str]] | None = None,
        lfs_threshold_mb: float = 10,
        max_upload_mb: float = 1024,
        page_size: int = 1000,
        public_url: str | None = None,
        log_level: str = "warning",
        body_timeout_s: float = 60.0,
        metrics_token: str | None = None,
    ):
        self.config = RegistryConfig(
            root=Path(root),
            body_timeout_s=body_timeout_s,
            lfs_threshold_bytes=int(lfs_threshold_mb * MB),
            max_upload_bytes=int(max_upload_mb * MB),
            page_size=page_size,
            public_url=public_url,
            metrics_token=metrics_token,
        )
        self.host = host
        self.port = port
        self.app = create_app(self.config)
        for token, (user, scope) in (tokens or {}).items():
            self.app.state.hub.tokens.add(token, user, scope)
        self._log_level = log_level
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def root(self) -> Path:
        """The registry root folder."""
        return self.config.root

    @property
    def url(self) -> str:
        """Base URL to use as `HF_ENDPOINT` (valid once started)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def create_token(self, user: str, scope: str = "write") -> str:
        """Create a token for `user` on this registry and return it."""
        return self.app.state.hub.tokens.create(user, scope)

    def start(self) -> RegistryServer:
        """Bind, start serving on a daemon thread and wait until requests are accepted."""
        if self._thread is not None:
            raise RuntimeError("This RegistryServer is already running.")
        if self.app.state.hub.closed:
            raise RuntimeError("This RegistryServer was stopped; create a new one to serve the root again.")
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self.port))
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(self.app, log_level=self._log_level, lifespan="off", timeout_keep_alive=30)
        self._server = uvicorn.Server(config)
        server = self._server
        self._thread = threading.Thread(
            target=lambda: server.run(sockets=[sock]), name="adapterkit-registry", daemon=True
        )
        self._thread.start()
        while not server.started:
            if not self._thread.is_alive():
                raise RuntimeError(f"The registry failed to start on {self.url}; see the log above.")
            self._thread.join(0.01)
        logger.info("adapterkit registry serving %s on %s", self.root, self.url)
        return self

    def stop(self) -> None:
        """Stop serving and wait for the thread to end."""
        if self._server is not None and self._thread is not None:
            self._server.should_exit = True
            self._thread.join()
        self._server = self._thread = None
        self.app.state.hub.close()

    def __enter__(self) -> RegistryServer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
