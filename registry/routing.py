"""A tiny router over the raw request path.

Revisions and tree sub-paths arrive percent-encoded as single segments (`refs%2Fpr%2F1`), so the
raw path (`scope["raw_path"]`) is split on `/` first and each segment is decoded afterwards;
Starlette's own router matches on the decoded path and would split them.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

from .errors import HubError

Handler = Callable[[Any], Awaitable[Any]]


@dataclass(frozen=True)
class Route:
    """One route.

    Attributes:
        methods: HTTP methods (`GET` also matches `HEAD`).
        parts: Pattern segments: a literal, `{name}` (one non-empty segment), `{name}.git` (one
            segment ending in `.git`, captured without it) or a final `{*name}` (the rest, joined by `/`).
        handler: Async callable taking the request context.
    """

    methods: frozenset[str]
    parts: tuple[str, ...]
    handler: Handler

    @property
    def template(self) -> str:
        """The pattern, e.g. `/api/{types}/{ns}/{name}/commit/{*rev}` (a metrics label: never a raw path)."""
        return "/" + "/".join(self.parts)


def split_raw_path(raw_path: bytes) -> list[str]:
    """Split a raw path on `/`, then percent-decode each segment.

    Raises:
        HubError: 400 if a segment is not valid UTF-8 once decoded.
    """
    text = raw_path.decode("latin-1").split("?", 1)[0]
    try:
        return [unquote(s, errors="strict") for s in text.lstrip("/").split("/")]
    except UnicodeDecodeError:
        raise HubError(400, "InvalidPath", "The URL path is not valid UTF-8 once percent-decoded.") from None


class Router:
    """Ordered list of routes; the first match wins."""

    def __init__(self) -> None:
        self.routes: list[Route] = []

    def add(self, methods: str, pattern: str, handler: Handler) -> None:
        """Register `handler` for space-separated `methods` on `pattern` (e.g. `/api/{types}/{ns}/{name}`)."""
        parts = tuple(pattern.strip("/").split("/")) if pattern.strip("/") else ()
        self.routes.append(Route(frozenset(methods.split()), parts, handler))

    def match(self, method: str, segments: list[str]) -> tuple[Route, dict[str, str]]:
        """Find the route and path parameters for a request.

        Raises:
            HubError: 404 `NotFound` or 405 `MethodNotAllowed`.
        """
        if segments == [""]:
            segments = []
        allowed: set[str] = set()
        for route in self.routes:
            params = _match_parts(route.parts, segments)
            if params is None:
                continue
            methods = route.methods | ({"HEAD"} if "GET" in route.methods else set())
            if method in methods:
                return route, params
            allowed |= methods
        if allowed:
            raise HubError(
                405,
                "MethodNotAllowed",
                f"Method {method} not allowed here; use {', '.join(sorted(allowed))}.",
            )
        raise HubError(
            404, "NotFound", "No such endpoint in this registry (see docs/registry.md for the supported API)."
        )


def _match_parts(parts: tuple[str, ...], segments: list[str]) -> dict[str, str] | None:
    params: dict[str, str] = {}
    for i, part in enumerate(parts):
        if part.startswith("{*"):
            params[part[2:-1]] = "/".join(segments[i:])
            return params
        if i >= len(segments):
            return None
        seg = segments[i]
        if part.startswith("{") and part.endswith("}.git"):
            if not seg.endswith(".git") or len(seg) <= 4:
                return None
            params[part[1:-5]] = seg[:-4]
        elif part.startswith("{"):
            if not seg:
                return None
            params[part[1:-1]] = seg
        elif part != seg:
            return None
    return params if len(segments) == len(parts) else None
