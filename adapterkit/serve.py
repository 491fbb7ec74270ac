"""Serve a family over HTTP: per-image domains, mixed-domain batching across requests, hot-add.

    from adapterkit.serve import create_app
    app = create_app(model, admin_token="...")        # an ASGI app: uvicorn, hypercorn, Ray Serve...
    # adapterkit.serve_run.serve("alice/decathlon-r56@v1", port=8000): loads the family, runs uvicorn

Endpoints (docs/serve.md): `POST /v1/predict`, `GET /v1/domains`, `POST /v1/domains` and
`DELETE /v1/domains/{name}` (admin bearer token), `GET /healthz`, `GET /readyz`, `GET /metrics`,
and the OpenAPI schema at `/openapi.json` (`/docs` renders it).

Where the work runs: the event loop only parses and answers; images are decoded and preprocessed
(each domain's recorded data config) in a pool of `threads` threads; one worker thread runs each
batch as ONE mixed-domain forward `model(x, domain=[...])` in eval mode under
`torch.inference_mode()` (`serve_batching.py`); hot-adds and removals run in their own thread.
Images that name no domain are routed by the domains' signatures in that worker first (`serve_route.py`).
"""

from __future__ import annotations

import asyncio
import gc
import hmac
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from . import __version__
from .serve_batching import Batcher, Item, QueueFull, server_timing
from .serve_domains import Domains, unknown_domain
from .serve_errors import (
    BodyLimit,
    ServeError,
    http_error_handler,
    internal_error_handler,
    serve_error_handler,
    shown,
    validation_error_handler,
)
from .serve_images import DEFAULT_MAX_PIXELS, Preprocessors
from .serve_metrics import Metrics
from .serve_predict import Parsed, parse_json, parse_multipart, request_kind
from .serve_route import AUTO, Router, answer, metric_labels
from .serve_routes import add_routes

if TYPE_CHECKING:
    from .model import AdapterModel

logger = logging.getLogger(__name__)
__all__ = ["create_app", "Service"]
INLINE_PARSE_BYTES = 64 * 1024  # JSON bodies up to this size are parsed on the event loop


class Service:
    """What one app serves with: the model's domains, the batcher, the worker pool and metrics."""

    def __init__(
        self,
        model: AdapterModel,
        *,
        max_batch_size: int,
        max_wait_ms: float,
        queue_size: int,
        admin_token: str | None,
        threads: int,
        max_body_bytes: int,
        max_pixels: int,
        max_images: int,
        source: str | None,
        revision: str | None,
        fusion_capacity: int | None = None,
        mixed_precision: str = "no",
    ) -> None:
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise ValueError(f"threads={threads!r} must be an int >= 1 (threads decoding images)")
        if admin_token is not None and len(admin_token) < 8:
            raise ValueError("admin_token is shorter than 8 characters; use a long random one")
        self.model = model.eval()  # frozen domains stay frozen; trainable ones use their statistics
        if fusion_capacity is not None:
            from .layers import configure_fusion

            configure_fusion(model, capacity=fusion_capacity)
        self.domains = Domains(model, source, revision, mixed_precision)
        self.preprocessors = Preprocessors(model)
        self.router = Router(model, self.preprocessors, self.domains)  # images that name no domain
        self.metrics = Metrics(lambda: self.batcher.depth, lambda: len(model.domains))
        self.batcher = Batcher(
            self.router.run,
            max_batch_size=max_batch_size,
            max_wait_ms=max_wait_ms,
            queue_size=queue_size,
            on_batch=lambda items, s: self.metrics.observe_batch([i.domain for i in items], s),
        )
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="adapterkit-decode")
        self.admin_pool = ThreadPoolExecutor(1, thread_name_prefix="adapterkit-admin")
        self.admin_token = admin_token
        self.max_body_bytes, self.max_pixels = max_body_bytes, max_pixels
        self.max_images = min(max_images, queue_size)
        self.stopping = False  # set when the server begins to stop: new predictions get 503, /readyz fails

    def abandon_queued(self) -> None:
        """Answer the images still queued with 503 `shutting_down` (the graceful timeout is ending)."""
        n = self.batcher.abandon(
            lambda: ServeError(
                503,
                "shutting_down",
                "the server stopped before this image's turn (its graceful timeout ended); retry",
                headers={"Retry-After": "1"},
            )
        )
        if n:
            logger.warning("the graceful timeout is ending: %d queued images answered 503", n)

    def close(self) -> None:
        self.batcher.close()
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.admin_pool.shutdown(wait=False, cancel_futures=True)

    # ------------------------------------------------------------------ predict
    async def predict(self, request: Request) -> tuple[dict[str, Any], str]:
        """The answer to `POST /v1/predict`, and its `Server-Timing` header (`server_timing`)."""
        began = time.monotonic()
        domains: list[str] = []
        predictions = None
        status = 500
        try:
            if self.stopping:
                raise ServeError(
                    503,
                    "shutting_down",
                    "the server is stopping and takes no new images; retry (on another replica, or here once "
                    "it is back)",
                    headers={"Retry-After": "1"},
                )
            parsed = await self._read(request)
            domains = parsed.domains
            answer, items = await self._respond(parsed)
            status, predictions = 200, answer["predictions"]
            return answer, server_timing(began, items)
        except ServeError as e:
            status = e.status
            raise
        finally:  # routed images count under the domain they went to (serve_route.metric_labels)
            labels = metric_labels(domains, predictions, set(self.model.domains))
            self.metrics.observe_predictions(labels or ["_none"], status, time.monotonic() - began)
            if predictions is not None:
                self.metrics.observe_routed([x for x, d in zip(labels, domains, strict=True) if d == AUTO])

    async def _read(self, request: Request) -> Parsed:
        loop = asyncio.get_running_loop()
        if request_kind(request) == "json":
            body = await request.body()
            if len(body) < INLINE_PARSE_BYTES:  # a thread hop costs more than parsing a small body
                parsed = parse_json(body)
            else:
                parsed = await loop.run_in_executor(self.pool, parse_json, body)
        else:
            parsed = await parse_multipart(request, self.max_images, self.max_body_bytes)
        if len(parsed.images) > self.max_images:
            raise ServeError(
                413,
                "too_many_images",
                f"{len(parsed.images)} images in one request; this server takes at most {self.max_images}: "
                "split them over several requests",
            )
        return parsed

    async def respond(self, parsed: Parsed, names: list[str] | None = None) -> dict[str, Any]:
        """The answer to a predict request once read (`POST /v1/predict`'s JSON; `adapterkit predict`
        calls it without HTTP); `names` name the images in errors (default `image 0`, `image 1`, ...)."""
        return (await self._respond(parsed, names))[0]

    async def _respond(
        self, parsed: Parsed, names: list[str] | None = None
    ) -> tuple[dict[str, Any], list[Item]]:
        loop = asyncio.get_running_loop()
        names = names or [f"image {i}" for i in range(len(parsed.images))]
        labels = {}
        for d in dict.fromkeys(parsed.domains):
            if d == AUTO:
                self.router.check()  # 409 now when a loaded domain has no signature
                continue
            try:
                labels[d] = self.model.domain_info(d).labels
            except KeyError:
                raise unknown_domain(d, self.model.domains) from None
        with self.batcher.expecting(len(parsed.images)):
            tensors = await asyncio.gather(
                *(
                    loop.run_in_executor(self.pool, self._prepare, data, d, what)
                    for data, d, what in zip(parsed.images, parsed.domains, names, strict=True)
                )
            )
            items = [
                Item(None, d, loop.create_future(), loop, views=x)
                if d == AUTO
                else Item(x, d, loop.create_future(), loop)
                for x, d in zip(tensors, parsed.domains, strict=True)
            ]
            try:
                self.batcher.submit(items)
            except QueueFull as e:
                raise ServeError(
                    503,
                    "overloaded",
                    f"the server is at capacity ({e}); retry after the Retry-After seconds",
                    headers={"Retry-After": "1"},
                ) from e
        results = await asyncio.gather(*(item.future for item in items), return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result
        predictions = [
            answer(item, row, labels.get(item.domain), parsed.top_k, parsed.return_logits)
            for item, row in zip(items, results, strict=True)
        ]
        return {"predictions": predictions}, items

    def _prepare(self, data: bytes, domain: str, what: str) -> Any:
        """An image's tensor for its domain, or for an image to route its tensor per data config (in the
        worker pool)."""
        if domain == AUTO:
            return self.router.views(data, what, self.max_pixels)
        return self.preprocessors.tensor(data, domain, what, self.max_pixels)

    # ------------------------------------------------------------------ admin
    def check_admin(self, request: Request) -> None:
        """401 without a bearer token, 403 with a wrong one (or when admin endpoints are off)."""
        if self.admin_token is None:
            raise ServeError(
                403,
                "admin_disabled",
                "this server has no admin token, so domains cannot be added or removed: start it with "
                "--admin-token-file FILE or ADAPTERKIT_ADMIN_TOKEN",
            )
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            _log_refusal(request, "without a token")
            raise ServeError(
                401,
                "unauthorized",
                "this endpoint needs the admin token: send 'Authorization: Bearer <token>'",
                headers={"WWW-Authenticate": 'Bearer realm="adapterkit"'},
            )
        if not hmac.compare_digest(token.strip().encode(), self.admin_token.encode()):
            _log_refusal(request, "with a wrong token")
            raise ServeError(403, "forbidden", "wrong admin token; use the token the server was started with")

    async def hot_add(self, source: str, domain: str, revision: str | None, as_name: str | None) -> dict:
        loop = asyncio.get_running_loop()
        start, status, why = time.perf_counter(), "error", ""
        try:
            out = await loop.run_in_executor(
                self.admin_pool, self.domains.hot_add, source, domain, revision, as_name
            )
            status = "ok"
            return out
        except ServeError as e:
            why = f" ({e.status} {e.code})"
            raise
        finally:
            took = time.perf_counter() - start
            self.metrics.hot_add.labels(status).observe(took)
            name, took_ms = shown(as_name or domain), took * 1000
            logger.info("hot-add of %s from %s: %s%s in %.0f ms", name, shown(source), status, why, took_ms)

    async def remove(self, name: str) -> None:
        await asyncio.get_running_loop().run_in_executor(self.admin_pool, self.domains.remove, name)
        self.preprocessors.forget(name)
        self.metrics.removals.inc()
        logger.info("removed domain %s", name)


def _log_refusal(request: Request, why: str) -> None:
    """A refused admin request in the log: method, path and client (never the token)."""
    client = request.client.host if request.client else "?"
    logger.warning(
        "admin request %s refused: %s %s from %s", why, request.method, shown(request.url.path), client
    )


def freeze_startup_objects() -> None:
    """After one full collection, move every object alive out of the cyclic garbage collector's reach
    (`gc.freeze()`): a server's startup objects (about 400,000) then no longer make each full
    collection stall requests for 0.2-0.4 s; objects made later are collected as usual."""
    gc.collect()
    gc.freeze()


def create_app(
    model: AdapterModel,
    *,
    max_batch_size: int = 32,
    max_wait_ms: float = 5.0,
    queue_size: int = 256,
    admin_token: str | None = None,
    threads: int = 2,
    max_body_bytes: int = 32 * 1024 * 1024,
    body_timeout_s: float = 60.0,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_images: int = 64,
    source: str | None = None,
    revision: str | None = None,
    fusion_capacity: int | None = None,
    mixed_precision: str = "no",
    freeze_gc: bool = True,
) -> FastAPI:
    """An ASGI app (FastAPI) serving `model`'s domains; the model is put in eval mode.

    Args:
        max_batch_size: images per forward; 1 turns batching off.
        max_wait_ms: how long the first image of a batch may wait for images that other requests are
            decoding to join it (it never waits when none are).
        queue_size: images that may wait for a forward; past that, requests get 503 with Retry-After.
        admin_token: bearer token of `POST /v1/domains` and `DELETE /v1/domains/{name}`; None turns
            them off (403).
        threads: threads decoding and preprocessing images.
        max_body_bytes: largest request body (413 before it is read when Content-Length says so).
        body_timeout_s: longest pause while a request body arrives (408 after it: a stalled client holds
            its connection no longer).
        max_pixels: largest image, in pixels, checked before decoding (decompression bombs).
        max_images: most images in one request (at most `queue_size`).
        source, revision: where the model's domains came from, reported by `GET /v1/domains`.
        fusion_capacity: domains whose fused eval weights each adapted layer keeps (`configure_fusion`)
            for one-domain batches; raise it above 4 when those rotate over more domains (a batch that
            mixes domains runs gathered and needs none). None keeps the model's.
        mixed_precision: `no` (float32), or the forward's autocast dtype: `bf16` (GPUs, and CPUs with
            AVX-512 BF16 or AMX: 1.2-1.7x the images/s on one, docs/serve.md) or `fp16` (GPUs). The
            domains' tensors are not cast, and images that name no domain are routed in float32.
        freeze_gc: at startup, `freeze_startup_objects()` (the model, torch, the web stack), so that
            full garbage collections no longer stall requests for 0.2-0.4 s; objects made later
            (hot-added domains included) are collected as usual.

    Example:
        >>> app = create_app(AdapterModel.from_pretrained("family/"), admin_token=token)
        >>> uvicorn.run(app, host="127.0.0.1", port=8000)
    """
    limits = {"max_body_bytes": max_body_bytes, "max_pixels": max_pixels, "max_images": max_images}
    for name, value in limits.items():  # (0 would refuse every request)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r} must be an int >= 1")
    service = Service(
        model,
        max_batch_size=max_batch_size,
        max_wait_ms=max_wait_ms,
        queue_size=queue_size,
        admin_token=admin_token,
        threads=threads,
        max_body_bytes=max_body_bytes,
        max_pixels=max_pixels,
        max_images=max_images,
        source=source,
        revision=revision,
        fusion_capacity=fusion_capacity,
        mixed_precision=mixed_precision,
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if freeze_gc:
            freeze_startup_objects()
        service.batcher.start()
        try:
            yield
        finally:
            service.close()

    app = FastAPI(
        title="adapterkit",
        version=__version__,
        summary="Residual-adapter domains on one frozen timm backbone: predict, list, hot-add, remove.",
        lifespan=lifespan,
        docs_url=None,  # served by add_routes from local files (FastAPI's loads a CDN)
        redoc_url=None,
    )
    app.state.service = service
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes, idle_s=body_timeout_s)
    app.add_exception_handler(ServeError, serve_error_handler)
    app.add_exception_handler(RequestValidationError, validation_error_handler)
    app.add_exception_handler(ValidationError, validation_error_handler)
    app.add_exception_handler(StarletteHTTPException, http_error_handler)
    app.add_exception_handler(Exception, internal_error_handler)
    add_routes(app, service)
    return app
