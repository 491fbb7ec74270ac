"""Load a family and run the service (`adapterkit serve`, `serve(...)` in Python; docs/serve.md).

`load_family` pins a Hub source to its commit and never falls back to a cached copy when the registry cannot
be reached (HF_HUB_OFFLINE=1 serves the cache on purpose); `run_server` runs uvicorn and, on SIGTERM or
Ctrl-C, answers the requests in flight before it returns.
"""

from __future__ import annotations

import logging
import signal
import threading
from pathlib import Path
from typing import Any

from .model import AdapterModel
from .serve import create_app
from .sources import pin_source

logger = logging.getLogger(__name__)
__all__ = ["load_family", "run_server", "serve"]
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)  # uvicorn's stop signals


def load_family(
    source: str,
    *,
    domains: list[str] | None = None,
    revision: str | None = None,
    device: str = "cpu",
    backbone_weights: str | Path | None = None,
) -> tuple[AdapterModel, str, str | None]:
    """(model, source, revision): a family from a folder or a Hub repo id with an optional `@revision`,
    on the backbone it records, moved to `device`, in eval mode; a Hub revision comes back as the commit
    it was read at."""
    repo, revision = pin_source(source, revision)
    if not Path(repo).is_dir():  # a Hub repo: pin the branch or tag to its commit, reported by /v1/domains
        from .sources import open_source

        # a service serves what its source holds now: an unreachable registry is an error, not the cache
        # (HF_HUB_OFFLINE=1 serves the cached copy on purpose)
        revision = open_source(repo, revision=revision, cache_fallback=False).revision or revision
    model = AdapterModel.from_pretrained(
        repo, domains=domains, revision=revision, backbone_weights=backbone_weights
    )
    return model.to(device).eval(), repo, revision


def serve(
    source: str,
    *,
    domains: list[str] | None = None,
    revision: str | None = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    device: str = "cpu",
    torch_threads: int | None = None,
    backbone_weights: str | Path | None = None,
    log_level: str = "info",
    server_options: dict[str, Any] | None = None,
    **app_options: Any,
) -> None:
    """Load a family (folder, or Hub/registry repo id with an optional `@revision`) and serve it with
    uvicorn until interrupted.

    Args:
        domains: load only these (default all); more can be hot-added later.
        device: where the model runs (`cpu`, `cuda`, `cuda:1`, `mps`).
        torch_threads: torch's intra-op CPU threads (default: torch's choice).
        backbone_weights: the backbone weights file the family was trained on, if it moved since.
        server_options: `run_server`'s options (access_log, graceful_timeout, root_path).
        **app_options: `create_app`'s options (max_batch_size, max_wait_ms, admin_token, threads, ...).

    Example:
        >>> serve("alice/decathlon-r56@v1", port=8000, admin_token=os.environ["ADAPTERKIT_ADMIN_TOKEN"])
    """
    import torch

    if torch_threads is not None:
        torch.set_num_threads(torch_threads)
    model, repo, revision = load_family(
        source, domains=domains, revision=revision, device=device, backbone_weights=backbone_weights
    )
    app = create_app(model, source=repo, revision=revision, **app_options)
    logger.info("serving %d domains of %s on http://%s:%d", len(model.domains), repo, host, port)
    run_server(app, host, port, log_level=log_level, **(server_options or {}))


def run_server(
    app: Any,
    host: str,
    port: int,
    *,
    log_level: str = "info",
    access_log: bool = False,
    graceful_timeout: float = 20.0,
    root_path: str = "",
) -> None:
    """Run `app` under uvicorn until SIGTERM or Ctrl-C, then answer the requests in flight (for up to
    `graceful_timeout` seconds; later ones are cancelled) and return: a stop by signal is a clean exit.

    Args:
        log_level: uvicorn's and adapterkit's (`info`: startup, the address, admin changes, refused admin
            requests, the stop; `warning`: problems only).
        access_log: one line per request (uvicorn's access log).
        root_path: the path prefix a reverse proxy serves the app under (`/ak`; `ak/` is read so), for
            `/docs` and links.
    """
    import uvicorn

    logging.getLogger("adapterkit").setLevel(log_level.upper())
    root_path = "/" + root_path.strip("/") if root_path.strip("/") else ""  # `ak/`: the page's URLs broke
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        access_log=access_log,
        timeout_graceful_shutdown=graceful_timeout,
        root_path=root_path,
    )
    caught: list[int] = []
    main = threading.current_thread() is threading.main_thread()
    # uvicorn drains on SIGTERM/SIGINT, then raises the signal again for the handler it found: ours notes it
    previous = (
        {sig: signal.signal(sig, lambda n, _: caught.append(n)) for sig in STOP_SIGNALS} if main else {}
    )
    try:
        stopping_server(uvicorn.Server(config), app).run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if caught:
        name = signal.Signals(caught[0]).name
        logger.info(
            "stopped by %s (the requests in flight had up to %g s to be answered)", name, graceful_timeout
        )


def stopping_server(server: Any, app: Any) -> Any:
    """`server` (a uvicorn Server), which on its first stop signal also tells `app`'s service to refuse new
    images (503 `shutting_down`, `Retry-After`) and fail `/readyz`: the requests in flight drain, and a load
    balancer moves new ones elsewhere instead of having them cancelled at the graceful timeout. Shortly
    before that timeout (`server.config.timeout_graceful_shutdown`), the images still queued are answered
    503 `shutting_down` too, as JSON, rather than left to uvicorn's cancellation (a plain-text 500)."""
    service = getattr(getattr(app, "state", None), "service", None)
    handle_exit = server.handle_exit
    timeout = getattr(getattr(server, "config", None), "timeout_graceful_shutdown", None)

    def stop(sig: int, frame: Any) -> None:
        if service is not None and not service.stopping:
            service.stopping = True
            if timeout is not None:  # the last tenth of the timeout (at most 1 s) is left to answer
                timer = threading.Timer(max(0.0, timeout - min(1.0, timeout / 10)), service.abandon_queued)
                timer.daemon = True
                timer.start()
        handle_exit(sig, frame)

    server.handle_exit = stop  # (uvicorn installs `self.handle_exit` as the signal handler)
    return server
