"""The inference service's routes, its OpenAPI schema, and the per-route request counter.

The admin routes check the bearer token before they read the body, so a caller without the token
learns nothing about the body's validity. Their bodies and `/v1/predict`'s (JSON or multipart) are
read by hand, so their schemas are declared here for `/openapi.json`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.openapi.utils import get_openapi
from fastapi.routing import APIRoute
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from swagger_ui_bundle import swagger_ui_path

from .serve_errors import ServeError
from .serve_metrics import CONTENT_TYPE
from .serve_schema import (
    DomainOut,
    DomainsResponse,
    HotAddRequest,
    ImageIn,
    PredictRequest,
    PredictResponse,
    error_responses,
)

if TYPE_CHECKING:
    from .serve import Service

REF = "#/components/schemas/{model}"
DOCS_STATIC = "/docs/static"  # the Swagger UI's files
MULTIPART_SCHEMA = {
    "type": "object",
    "required": ["image"],
    "properties": {
        "image": {"type": "array", "items": {"type": "string", "format": "binary"}},
        "domain": {
            "type": "array",
            "items": {"type": "string"},
            "description": "one per image, or one for all; none (or empty, or 'auto'): routed by the server",
        },
        "top_k": {"type": "integer", "default": 5},
        "return_logits": {"type": "boolean", "default": False},
    },
}


def _body(schema: dict[str, Any], multipart: bool = False) -> dict[str, Any]:
    content = {"application/json": {"schema": schema}}
    if multipart:
        content["multipart/form-data"] = {"schema": MULTIPART_SCHEMA}
    return {"requestBody": {"required": True, "content": content}}


class DirectRoute(APIRoute):
    """A route documented in the schema as FastAPI documents any, whose endpoint takes the request and
    returns its response itself: no dependencies to solve and no answer to validate, work FastAPI would
    otherwise do on every prediction (the endpoint reads and validates its body itself)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        return self.endpoint


def add_routes(app: FastAPI, service: Service) -> None:
    """The service's endpoints on `app`."""
    _add_predict_route(app, service)
    _add_domain_routes(app, service)
    _add_operations_routes(app, service)
    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]
    add_docs(app)
    app.add_middleware(CountRequests, service=service)


def _add_predict_route(app: FastAPI, service: Service) -> None:
    """`POST /v1/predict`, a `DirectRoute`: its body is read and validated by the service."""

    async def predict(request: Request) -> Response:
        """Classify images, each with its own domain or routed by the server when it names none (JSON
        with base64 images, or multipart files)."""
        answer, timing = await service.predict(request)
        return JSONResponse(answer, headers={"Server-Timing": timing})

    app.router.add_api_route(
        "/v1/predict",
        predict,
        methods=["POST"],
        response_model=PredictResponse,  # the schema; the answer is sent as built
        responses=error_responses(400, 404, 409, 413, 415, 422, 503),
        openapi_extra=_body({"$ref": REF.format(model="PredictRequest")}, multipart=True),
        tags=["predict"],
        route_class_override=DirectRoute,
    )


def _add_domain_routes(app: FastAPI, service: Service) -> None:
    """List, hot-add (admin) and remove (admin) the served domains."""

    @app.get("/v1/domains", response_model=DomainsResponse, tags=["domains"])
    async def list_domains() -> Any:
        """The loaded domains: classes, labels, metrics, origin, parameters and bytes."""
        loop = asyncio.get_running_loop()  # counting a large family's parameters takes a while
        return {"domains": await loop.run_in_executor(service.pool, service.domains.describe)}

    @app.post(
        "/v1/domains",
        status_code=201,
        response_model=DomainOut,
        responses=error_responses(401, 403, 404, 409, 415, 422, 502),
        openapi_extra=_body({"$ref": REF.format(model="HotAddRequest")}),
        tags=["domains"],
    )
    async def add_domain(request: Request) -> Any:
        """Hot-add one domain of a family (admin); answers once the domain is served."""
        service.check_admin(request)
        if request.headers.get("content-type", "").lower().startswith("multipart/"):
            raise ServeError(
                415,
                "unsupported_media_type",
                "a hot-add is a JSON body, not form fields: send content-type application/json with "
                '{"source": ..., "domain": ...}',
            )
        body = HotAddRequest.model_validate_json(await request.body())
        return await service.hot_add(body.source, body.domain, body.revision, body.as_name)

    @app.delete("/v1/domains/{name}", responses=error_responses(401, 403, 404), tags=["domains"])
    async def remove_domain(name: str, request: Request) -> Any:
        """Unload one domain (admin); answers once no new request can reach it."""
        service.check_admin(request)
        await service.remove(name)
        return {"removed": name, "loaded": service.domains.names}


def _add_operations_routes(app: FastAPI, service: Service) -> None:
    """Liveness, readiness and Prometheus metrics."""

    @app.get("/healthz", tags=["operations"])
    async def healthz() -> Any:
        """The process answers (never waits for inference)."""
        return {"status": "ok"}

    @app.get("/readyz", responses=error_responses(503), tags=["operations"])
    async def readyz() -> Any:
        """Ready when the batch worker runs and at least one domain is loaded."""
        n = len(service.domains.names)
        if n == 0 or service.batcher.closed or service.stopping:
            reason = "no domain is loaded" if n == 0 else "the server is shutting down"
            raise ServeError(503, "not_ready", f"not ready: {reason}")
        return {"status": "ready", "domains": n, "queue_depth": service.batcher.depth}

    @app.get("/metrics", tags=["operations"], response_class=Response)
    async def metrics() -> Response:
        """Prometheus metrics."""
        return Response(service.metrics.render(), media_type=CONTENT_TYPE)


def add_docs(app: FastAPI) -> None:
    """`/docs`: the Swagger UI, served from this process (the `swagger-ui-bundle` package's files), so it
    renders offline and behind firewalls; FastAPI's own page loads it from a CDN. Under a `root_path`
    (a proxy's path prefix) every URL the page loads carries the prefix."""
    app.mount(DOCS_STATIC, StaticFiles(directory=swagger_ui_path), name="swagger-ui")

    @app.get("/docs", include_in_schema=False)
    async def docs(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "").rstrip("/")
        return get_swagger_ui_html(
            openapi_url=f"{root}{app.openapi_url}",
            title=f"{app.title} - Swagger UI",
            swagger_js_url=f"{root}{DOCS_STATIC}/swagger-ui-bundle.js",
            swagger_css_url=f"{root}{DOCS_STATIC}/swagger-ui.css",
            swagger_favicon_url=f"{root}{DOCS_STATIC}/favicon-32x32.png",
        )


def _openapi(app: FastAPI) -> dict[str, Any]:
    """FastAPI's schema plus the hand-read request bodies."""
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, summary=app.summary, routes=app.routes)
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        for model in (PredictRequest, ImageIn, HotAddRequest):
            components[model.__name__] = model.model_json_schema(ref_template=REF)
            components[model.__name__].pop("$defs", None)
        app.openapi_schema = schema
    return app.openapi_schema


class CountRequests:
    """ASGI middleware counting every HTTP request by route template, method and status."""

    def __init__(self, app: ASGIApp, service: Service) -> None:
        self.app, self.service = app, service

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            self.service.metrics.http.labels(_route_label(scope), scope["method"], str(status)).inc()


def _route_label(scope: Scope) -> str:
    """A request's route template: FastAPI's routes carry theirs; its fixed-path pages (/openapi.json)
    have only an endpoint; the files under /docs/static count as one route, whatever file was asked for."""
    if isinstance(scope.get("endpoint"), StaticFiles):
        return DOCS_STATIC
    return getattr(scope.get("route"), "path", scope["path"] if "endpoint" in scope else "unmatched")
