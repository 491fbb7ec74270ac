"""Errors of the inference service: one JSON shape for every failure, and the request body limit.

Every error answers `{"error": {"code": ..., "message": ..., ...}}` with the right status; the message
names the problem and the fix. `BodyLimit` refuses a body over the limit from its `Content-Length`
before reading it, and stops a chunked body as soon as it passes the limit.
"""

from __future__ import annotations

import logging
import time
import uuid
from typing import Any

import anyio
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

logger = logging.getLogger(__name__)


class ServeError(Exception):
    """An expected failure of one request: HTTP `status`, a short `code`, a message saying the fix.

    Args:
        status: the HTTP status.
        code: a stable machine-readable name (`unknown_domain`, `invalid_image`, ...).
        message: what went wrong and how to fix it.
        headers: extra response headers (`Retry-After`, `WWW-Authenticate`).
        **extra: more JSON fields of the error (for example `loaded` domains).
    """

    def __init__(
        self, status: int, code: str, message: str, headers: dict[str, str] | None = None, **extra: Any
    ) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.headers = headers or {}
        self.extra = extra

    def body(self) -> dict[str, Any]:
        return {"error": {"code": self.code, "message": self.message, **self.extra}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def body_too_large(limit: int) -> ServeError:
    return ServeError(
        413,
        "body_too_large",
        f"the request body is over the server's limit of {limit} bytes ({limit / 2**20:.3g} MB): send "
        "fewer or smaller images per request, or raise the limit (adapterkit serve --max-body-mb, "
        "create_app's max_body_bytes)",
        limit=limit,
    )


async def serve_error_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ServeError)
    return exc.response()


async def validation_error_handler(request: Request, exc: Exception) -> JSONResponse:
    """FastAPI's request validation errors (malformed JSON, missing fields) in our error shape."""
    errors = getattr(exc, "errors", lambda: [])()
    details = [
        {"loc": [str(p) for p in e.get("loc", ())], "msg": str(e.get("msg", "")), "type": e.get("type")}
        for e in errors
    ]
    first = details[0] if details else {"loc": [], "msg": "invalid request"}
    where = ".".join(first["loc"]) or "body"
    message = f"invalid request: {where}: {first['msg']}; see the schema at /docs"
    return ServeError(422, "invalid_request", message, details=details).response()


async def http_error_handler(request: Request, exc: Exception) -> JSONResponse:
    """Starlette's HTTP errors (404 for an unknown path, 405) in our error shape."""
    status = getattr(exc, "status_code", 500)
    detail = getattr(exc, "detail", None) or "error"
    codes = {404: "not_found", 405: "method_not_allowed"}
    message = f"{detail}: {request.method} {request.url.path}; see /docs for the API"
    return ServeError(status, codes.get(status, "http_error"), message).response()


def shown(text: str) -> str:
    """`text` for a log line: as it is, or quoted with its escapes when it holds a line break or another
    unprintable character (a caller's path or domain name must not write lines of its own)."""
    return text if text.isprintable() else repr(text)


async def internal_error_handler(request: Request, exc: Exception) -> JSONResponse:
    """A 500 that names an id to find in the server's log, and nothing of the exception (its text can hold
    paths and values that are the server's business)."""
    error_id = uuid.uuid4().hex[:12]
    logger.error(
        "unexpected error %s serving %s %s", error_id, request.method, shown(request.url.path), exc_info=exc
    )
    message = (
        f"unexpected server error {error_id}; this is a bug: report it with the server log's lines of that id"
    )
    return ServeError(500, "internal_error", message).response()


MIN_BODY_RATE = 512  # bytes/s a body must average once it took longer than the idle limit (Apache's default)


async def body_message(receive: Receive, idle_s: float, seen: int, start: float) -> Message | None:
    """The next message of a request body, or None when the client stalls: nothing for `idle_s` seconds,
    or, past `idle_s` since the body began, a body averaging under `MIN_BODY_RATE` (a slow-loris client
    sends a byte just before each idle limit)."""
    elapsed = time.monotonic() - start
    if elapsed > idle_s and seen < MIN_BODY_RATE * elapsed:
        return None
    with anyio.move_on_after(idle_s):
        return await receive()
    return None


class BodyLimit:
    """ASGI middleware: at most `max_bytes` of request body, with no pause longer than `idle_s`.

    A `Content-Length` over the limit is answered 413 at once, before a byte of the body is read; a
    body without one (chunked) is cut off with 413 as soon as it passes the limit. A body that sends
    nothing for `idle_s` seconds (a stalled or slow-loris client) ends with 408. Once the body is
    complete, reads pass through untouched (a response may wait on them for the client's disconnect).
    """

    def __init__(self, app: ASGIApp, max_bytes: int, idle_s: float = 60.0) -> None:
        self.app, self.max_bytes, self.idle_s = app, max_bytes, idle_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None:
            if not length.isdigit():
                error = ServeError(400, "bad_content_length", "Content-Length must be a decimal number")
                await error.response()(scope, receive, send)
                return
            if int(length) > self.max_bytes:
                await body_too_large(self.max_bytes).response()(scope, receive, send)
                return
        seen, complete, start = 0, False, time.monotonic()

        async def limited() -> Message:
            nonlocal seen, complete
            if complete:
                return await receive()
            message = await body_message(receive, self.idle_s, seen, start)
            if message is None:
                raise ServeError(
                    408,
                    "body_timeout",
                    f"the request body paused {self.idle_s:g} s, or arrived slower than {MIN_BODY_RATE} bytes/s: "
                    "send it whole, without pauses",
                    headers={"Connection": "close"},
                )
            complete = message["type"] != "http.request" or not message.get("more_body", False)
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise body_too_large(self.max_bytes)
            return message

        await self.app(scope, limited, send)
