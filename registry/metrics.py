"""Prometheus metrics of the registry (`GET /metrics`, prometheus_client), one collector registry per app.

adapterkit_registry_http_requests_total{method,route,status}   every request, by route template
adapterkit_registry_http_request_seconds{method,route}         latency to the last byte (histogram)
adapterkit_registry_http_received_bytes_total{route}           request body bytes (uploads)
adapterkit_registry_http_sent_bytes_total{route}               response body bytes (downloads)
adapterkit_registry_http_requests_in_flight                    requests being answered now

`route` is the template the request matched (`/api/{types}/{ns}/{name}/commit/{*rev}`), `unmatched`
for a path no route knows: never the raw path, so no repo name (of a private repo, say) reaches a
label and the label set stays bounded by the routes, methods and status codes.

`/metrics` answers anyone by default, as exporters do on a loopback-bound server. Give the server a
scrape secret (`--metrics-token-file`, `RegistryServer(metrics_token=...)`) and it answers only
`Authorization: Bearer <secret>` (Prometheus: `authorization: {credentials_file: ...}`); Hub tokens
are neither needed nor accepted there.
"""

from __future__ import annotations

import hmac
import time
from typing import TYPE_CHECKING

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .errors import HubError
from .routing import Router

if TYPE_CHECKING:
    from .context import Ctx

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 120.0)
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"})
UNMATCHED = "unmatched"
SCOPE_KEY = "adapterkit_registry.route"
"""Scope entry the middleware puts a `{"route": ...}` dict in; the dispatcher fills in the template."""


class RegistryMetrics:
    """The registry's metrics (see the module docstring)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "adapterkit_registry_http_requests", "HTTP requests", ["method", "route", "status"], registry=r
        )
        self.latency = Histogram(
            "adapterkit_registry_http_request_seconds",
            "Time from a request's arrival to its last response byte",
            ["method", "route"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.received = Counter(
            "adapterkit_registry_http_received_bytes", "Request body bytes received", ["route"], registry=r
        )
        self.sent = Counter(
            "adapterkit_registry_http_sent_bytes", "Response body bytes sent", ["route"], registry=r
        )
        self.in_flight = Gauge(
            "adapterkit_registry_http_requests_in_flight", "Requests being answered", registry=r
        )

    def render(self) -> bytes:
        """The text exposition format."""
        return generate_latest(self.registry)


def register(router: Router) -> None:
    """Add `GET /metrics` (it checks its own secret, never a Hub token)."""
    router.add("GET", "/metrics", metrics)


async def metrics(ctx: Ctx) -> Response:
    """`GET /metrics`: the Prometheus text format; 401 without the scrape secret when one is set."""
    secret = ctx.hub.config.metrics_token
    if secret:
        scheme, _, given = ctx.request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), secret.encode()):
            raise HubError(
                401,
                "MetricsTokenRequired",
                "/metrics needs the server's scrape secret: send `Authorization: Bearer <the content of "
                "--metrics-token-file>` (Prometheus: authorization.credentials_file).",
            )
    return Response(ctx.hub.metrics.render(), media_type=CONTENT_TYPE_LATEST)


metrics.own_auth = True  # type: ignore[attr-defined]


class MetricsMiddleware:
    """ASGI middleware counting every HTTP request: method, route template, status, latency, bytes."""

    def __init__(self, app: ASGIApp, metrics: RegistryMetrics) -> None:
        self.app, self.m = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        info = {"route": UNMATCHED}
        scope[SCOPE_KEY] = info
        method = scope["method"] if scope["method"] in METHODS else "OTHER"
        counts = {"status": 500, "in": 0, "out": 0}

        async def counting_receive() -> Message:
            message = await receive()
            counts["in"] += len(message.get("body", b""))
            return message

        async def counting_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                counts["status"] = message["status"]
            elif message["type"] == "http.response.body":
                counts["out"] += len(message.get("body", b""))
            await send(message)

        start = time.perf_counter()
        self.m.in_flight.inc()
        try:
            await self.app(scope, counting_receive, counting_send)
        finally:
            self.m.in_flight.dec()
            route = info["route"]
            self.m.requests.labels(method, route, str(counts["status"])).inc()
            self.m.latency.labels(method, route).observe(time.perf_counter() - start)
            self.m.received.labels(route).inc(counts["in"])
            self.m.sent.labels(route).inc(counts["out"])
