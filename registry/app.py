"""The ASGI application: authentication, dispatch and Hub-style error responses."""

from __future__ import annotations

import errno
import logging
import time
from pathlib import Path

import anyio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from . import api_lfs, api_read, api_user, api_write, api_xet, metrics, move, web
from .context import Ctx, Hub, RegistryConfig, json_response
from .errors import HubError
from .metrics import SCOPE_KEY, MetricsMiddleware
from .routing import Router, split_raw_path

logger = logging.getLogger(__name__)

INVALID_CREDENTIALS = "Invalid credentials in Authorization header"
"""Exact message `huggingface_hub` recognises: a bad token is not reported as a missing repo."""


def error_response(err: HubError, method: str) -> Response:
    """JSON error with `X-Error-Code` and a single-line ASCII `X-Error-Message`."""
    header_msg = " ".join((err.header_message or err.message).split()).encode("ascii", "replace").decode()
    headers = {"X-Error-Code": err.code, "X-Error-Message": header_msg, **err.headers}
    if method == "HEAD":
        return Response(status_code=err.status, headers=headers)
    return json_response({"error": err.message}, err.status, headers)


def build_router() -> Router:
    """All routes, in matching order."""
    router = Router()
    metrics.register(router)
    api_xet.register(router)  # the CAS routes (/v1/...) first: they authenticate with CAS tokens
    web.register(router)
    api_write.register(router)
    move.register(router)
    api_lfs.register(router)
    api_user.register(router)
    api_read.register(router)
    return router


def create_app(config: RegistryConfig | str | Path) -> Starlette:
    """Build the registry ASGI app.

    Example:
        >>> app = create_app(RegistryConfig(root="/srv/registry"))  # doctest: +SKIP
        >>> # uvicorn.run(app, host="127.0.0.1", port=8000)

    Args:
        config: Settings, or just the root folder.

    Returns:
        A Starlette application; `app.state.hub` holds the storage and token store, and
        `app.state.hub.close()` releases the root for another server.

    Raises:
        RuntimeError: If another server already uses this root.
    """
    if not isinstance(config, RegistryConfig):
        config = RegistryConfig(root=Path(config))
    hub = Hub(config)
    router = build_router()

    async def dispatch(request: Request) -> Response:
        method = request.method
        try:
            principal = None
            try:
                route, params = router.match(method, split_raw_path(request.scope.get("raw_path") or b"/"))
                handler, unmatched = route.handler, None
                if SCOPE_KEY in request.scope:  # the metrics label: the template, never the raw path
                    request.scope[SCOPE_KEY]["route"] = route.template
            except HubError as err:  # answered after the token check, as before
                handler, params, unmatched = None, {}, err
            auth = request.headers.get("authorization")
            own_auth = getattr(handler, "cas_auth", False) or getattr(handler, "own_auth", False)
            if auth and not own_auth:  # CAS routes and /metrics check their own tokens
                scheme, _, token = auth.partition(" ")
                principal = hub.tokens.authenticate(token.strip()) if scheme.lower() == "bearer" else None
                if principal is None:
                    raise HubError(
                        401,
                        "InvalidCredentials",
                        f"{INVALID_CREDENTIALS}: the token is unknown or was revoked. Create one with "
                        "`adapterkit-registry token create --root DIR --user NAME --scope write`, "
                        "or unset HF_TOKEN for anonymous read access.",
                        header_message=INVALID_CREDENTIALS,
                    )
            if unmatched is not None:
                raise unmatched
            return await handler(Ctx(hub, request, params, principal))
        except HubError as err:
            # The unread rest of a body is discarded by the HTTP server after this answer; a body
            # whose declared size is refused gets `Connection: close` (see Ctx.check_length).
            return error_response(err, method)
        except OSError as err:
            logger.exception("storage error on %s %s", method, request.url.path)
            if err.errno in (errno.ENOSPC, errno.EDQUOT):
                full = HubError(507, "InsufficientStorage", "The registry's disk is full; try again later.")
                return error_response(full, method)
            return error_response(
                HubError(500, "InternalError", "Storage error; see the server log."), method
            )
        except Exception:
            logger.exception("internal error on %s %s", method, request.url.path)
            return error_response(
                HubError(500, "InternalError", "Internal server error; see the server log."), method
            )

    methods = ["GET", "HEAD", "POST", "PUT", "DELETE", "PATCH"]
    app = Starlette(routes=[Route("/{path:path}", dispatch, methods=methods)])
    app.add_middleware(BodyIdleTimeout, idle_s=config.body_timeout_s)
    app.add_middleware(MetricsMiddleware, metrics=hub.metrics)  # outermost: sees every answer
    app.state.hub = hub
    return app


MIN_BODY_RATE = 512  # bytes/s a body must average once it took longer than the idle limit (Apache's default)


class BodyIdleTimeout:
    """ASGI middleware: while a request's body is incomplete, each read waits at most `idle_s` seconds,
    and a body that has taken longer than `idle_s` must average `MIN_BODY_RATE`; a body that stalls or
    trickles (a slow-loris client sends a byte just before each limit) ends its request with 408
    `RequestTimeout` (through the handler's usual error path) and the connection is closed, so no client
    holds a connection, a spool file or a worker for long. Once the body is complete, reads pass through
    untouched (a streaming response waits on them for the client's disconnect)."""

    def __init__(self, app: ASGIApp, idle_s: float) -> None:
        self.app, self.idle_s = app, idle_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        complete, seen, start = False, 0, time.monotonic()

        async def receive_within() -> Message:
            nonlocal complete, seen
            if complete:
                return await receive()
            elapsed, message = time.monotonic() - start, None
            if elapsed <= self.idle_s or seen >= MIN_BODY_RATE * elapsed:
                with anyio.move_on_after(self.idle_s):
                    message = await receive()
            if message is None:
                raise HubError(
                    408,
                    "RequestTimeout",
                    f"The request body paused {self.idle_s:g} s, or arrived slower than {MIN_BODY_RATE} "
                    "bytes/s; send it without pauses (the server's --body-timeout).",
                    headers={"Connection": "close"},
                )
            complete = message["type"] != "http.request" or not message.get("more_body", False)
            seen += len(message.get("body", b""))
            return message

        await self.app(scope, receive_within, send)
