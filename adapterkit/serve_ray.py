"""The same HTTP API on Ray Serve (`pip install "adapterkit[serve-ray]"`): replicas, families multiplexed
by id, and hot-adds that reach every replica.

    import ray
    from ray import serve
    from adapterkit.serve_ray import deployment

    ray.init()
    serve.run(deployment("alice/decathlon-r56@v1", num_replicas=4, admin_token=token), route_prefix="/")

Each replica holds the default family (and the others the deployment lists in `families=`, chosen per
request by the `serve_multiplexed_model_id` header: Ray Serve's model multiplexing; `MAX_FAMILIES` per
replica) and serves it with `create_app`, so every replica batches mixed-domain requests as the embedded
server does. Hot-adds and removals are recorded in order in a named Ray actor (one log per deployment and
family: `deployment()` gives each deployment its own, so another app, or a later deployment of the same
family, starts from its own files); every replica applies the log before it answers a request, a replica
that loads a family later replays it, and after a change the replica that made it asks every live replica
to catch up (`DeploymentHandle.broadcast`) before it answers. So once `POST /v1/domains` has answered,
every replica serves the domain.

A replica takes up to `queue_size + max_batch_size + 16` requests at once (Ray Serve's default, 5, would
cap every forward at 5 requests and hold probes and scrapes in the proxy behind predictions), so its own
bounded queue answers 503 when full; autoscaling aims at `max_batch_size` ongoing requests per replica
(`serve_ray_options.py`; `deployment()`'s arguments override both).

`GET /metrics` answers the metrics of every live replica (of the family the request names), each sample
labelled `replica` (`serve_ray_metrics.py`): the replica that takes the scrape gathers them with the same
broadcast, on its event loop, without loading a family or waiting for a forward.
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
import weakref
from typing import Any

import ray
from ray import serve
from starlette.requests import Request
from starlette.responses import Response

from . import serve_ray_metrics
from .serve_errors import ServeError
from .serve_metrics import CONTENT_TYPE
from .serve_ray_options import OWN_OPTIONS, serve_options

logger = logging.getLogger(__name__)
LOG_ACTOR = "adapterkit-domain-changes"
NAMESPACE = "adapterkit"
REPLICA_HEADER = "x-adapterkit-replica"
MAX_FAMILIES = 3  # families one replica keeps loaded (least recently used dropped)


@ray.remote(num_cpus=0)
class ChangeLog:
    """Hot-adds and removals per family id, in the order they were made."""

    def __init__(self) -> None:
        self._changes: dict[str, list[dict[str, Any]]] = {}

    def since(self, family: str, seq: int) -> list[dict[str, Any]]:
        return self._changes.get(family, [])[seq:]

    def append(self, family: str, change: dict[str, Any]) -> int:
        """Record `change`; returns its sequence number."""
        changes = self._changes.setdefault(family, [])
        changes.append(change)
        return len(changes) - 1


def change_log() -> Any:
    """The cluster's change log actor (created by the first replica that asks)."""
    return ChangeLog.options(
        name=LOG_ACTOR, namespace=NAMESPACE, get_if_exists=True, lifetime="detached"
    ).remote()


async def call_asgi(app: Any, request: Request, body: bytearray | None = None) -> Response:
    """Run `request` (received by Ray Serve, its body not read yet) through an ASGI app; its whole response.

    The body reaches the app as it arrives, so the app's own limits hold under Ray Serve too: a
    `Content-Length` over `max_body_bytes` is answered 413 before the body is read, and an upload that
    stalls for `body_timeout_s` ends with 408 (and frees the replica's slot, which Ray Serve counts until
    the response is sent). `body`, when given, collects the body the app read."""

    async def receive() -> dict[str, Any]:
        message = await request.receive()  # after the body: the client's disconnect, when it comes
        if body is not None and message["type"] == "http.request":
            body.extend(message.get("body", b""))
        return message

    start: dict[str, Any] = {}
    chunks: list[bytes] = []

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            start.update(message)
        elif message["type"] == "http.response.body":
            chunks.append(message.get("body", b""))

    await app(dict(request.scope), receive, send)
    response = Response(b"".join(chunks), status_code=start.get("status", 500))
    response.raw_headers = [(k, v) for k, v in start.get("headers", []) if k.lower() != b"content-length"]
    response.raw_headers.append((b"content-length", str(len(response.body)).encode()))
    return response


class Family:
    """One family loaded in a replica: its model behind an embedded app, and how far it has applied
    the change log."""

    def __init__(self, family_id: str, options: dict[str, Any], domains: list[str] | None) -> None:
        from .serve import create_app, freeze_startup_objects
        from .serve_run import load_family

        model, repo, revision = load_family(family_id, domains=domains, device=options.get("device", "cpu"))
        self.id = family_id
        self.app = create_app(model, source=repo, revision=revision, **options.get("app", {}))
        if options.get("app", {}).get("freeze_gc", True):  # Ray Serve runs no ASGI lifespan
            freeze_startup_objects()
        self.service = self.app.state.service
        self.applied = 0
        self.own: set[int] = set()  # changes this replica made itself (already applied)
        self.lock = asyncio.Lock()

    def apply(self, change: dict[str, Any]) -> None:
        domains = self.service.domains
        try:
            if change["op"] == "add":
                domains.hot_add(change["source"], change["domain"], change["revision"], change["as_name"])
            else:
                domains.remove(change["name"])
                self.service.preprocessors.forget(change["name"])
        except ServeError as e:  # the replica that made it succeeded; say why this one did not
            logger.warning("family %s: could not apply %s: %s", self.id, change, e.message)

    def __del__(self) -> None:
        service = getattr(self, "service", None)  # (None when loading failed)
        if service is not None:
            service.close()


@serve.deployment(ray_actor_options={"num_cpus": 1})
class FamilyServer:
    """A replica: the default family, more by `serve_multiplexed_model_id`, all through `create_app`."""

    def __init__(self, default_family: str, options: dict[str, Any]) -> None:
        self.default, self.options = default_family, options
        self.allowed = {default_family, *options.get("families", ())}
        self.log, self.log_key = change_log(), options["log_key"]
        self.replica = str(serve.get_replica_context().replica_id.unique_id)
        self.loaded: weakref.WeakValueDictionary[str, Family] = weakref.WeakValueDictionary()
        self.handle: Any = None  # this deployment's handle, to broadcast to every replica (made on first use)

    @serve.multiplexed(max_num_models_per_replica=MAX_FAMILIES)
    async def family(self, family_id: str) -> Family:
        domains = self.options.get("domains") if family_id == self.default else None
        family = await asyncio.to_thread(Family, family_id, self.options, domains)
        self.loaded[family_id] = family
        return family

    async def __call__(self, request: Request) -> Response:
        family_id = serve.get_multiplexed_model_id() or self.default
        if family_id not in self.allowed:  # a caller must not make replicas load what it names
            message = f"family {family_id!r} is not served here: the deployment lists the ones it serves (families=)"
            return ServeError(404, "family_not_found", message).response()
        path, root = request.scope.get("path", ""), request.scope.get("root_path", "")
        path = path[len(root) :] if root and path.startswith(root) else path  # (behind a route prefix)
        if path == "/metrics" and request.method == "GET":
            response = await self.all_metrics(family_id)
            response.headers[REPLICA_HEADER] = self.replica
            return response
        try:
            family = await self.family(family_id)
        except (FileNotFoundError, KeyError, ValueError) as e:
            message = f"cannot load family {family_id!r}: {e.args[0] if e.args else e}"
            return ServeError(404, "family_not_found", message).response()
        except ConnectionError as e:
            return ServeError(502, "source_unreachable", f"cannot load family {family_id!r}: {e}").response()
        await self.catch_up(family)
        if path.startswith("/v1/domains") and request.method in ("POST", "DELETE"):
            response = await self.change(family, request)
        else:
            response = await call_asgi(family.app, request)
        response.headers[REPLICA_HEADER] = self.replica  # which replica answered (for operators, tests)
        return response

    async def catch_up(self, family: Family) -> None:
        """Apply the changes other replicas made since this one last looked."""
        async with family.lock:
            for change in await self.log.since.remote(self._key(family.id), family.applied):
                if family.applied not in family.own:
                    await asyncio.to_thread(family.apply, change)
                family.applied += 1

    def _key(self, family_id: str) -> str:
        """This deployment's log of `family_id` (another app, or a later deployment, keeps its own)."""
        return f"{self.log_key}/{family_id}"

    async def sync(self, family_id: str) -> int:
        """Broadcast target: catch up on `family_id` if this replica holds it."""
        family = self.loaded.get(family_id)
        if family is not None:
            await self.catch_up(family)
        return 0

    async def metrics(self, family_id: str) -> tuple[str, str | None]:
        """Broadcast target: this replica's id and its exposition text of `family_id` (None when it does not
        hold the family), rendered on the replica's event loop as the embedded server's `/metrics` is."""
        family = self.loaded.get(family_id)
        return self.replica, None if family is None else family.service.metrics.render().decode()

    async def all_metrics(self, family_id: str) -> Response:
        """`GET /metrics`: every live replica's metrics of `family_id`, merged, each labelled `replica`."""
        try:
            answers, missing = await serve_ray_metrics.gather(self._handle(), "metrics", family_id)
        except Exception as e:  # noqa: BLE001  (a scrape never fails: this replica's own, missing unknown)
            logger.warning("could not gather the replicas' metrics: %s", e)
            answers, missing = [await self.metrics(family_id)], float("nan")
        texts = [(replica, text) for replica, text in answers if text is not None]
        body = serve_ray_metrics.merge(texts, answered=len(answers), missing=missing)
        return Response(body, media_type=CONTENT_TYPE)

    def _handle(self) -> Any:
        if self.handle is None:
            context = serve.get_replica_context()
            self.handle = serve.get_deployment_handle(context.deployment, app_name=context.app_name)
        return self.handle

    async def change(self, family: Family, request: Request) -> Response:
        """A hot-add or removal: made here through the embedded app, logged, then every replica syncs."""
        body = bytearray()  # (read by the app, after it checked the token and the body's size)
        async with family.lock:
            response = await call_asgi(family.app, request, body)
            if response.status_code in (200, 201):
                change = _change_of(request, bytes(body), response)
                family.own.add(await self.log.append.remote(self._key(family.id), change))
        if response.status_code in (200, 201):
            await self.catch_up(family)
            await _broadcast_sync(self._handle(), family.id)
        return response


def _change_of(request: Request, body: bytes, response: Response) -> dict[str, Any]:
    """The log entry of a change that succeeded here (a hot-add pinned to the commit it read)."""
    if request.method == "DELETE":
        return {"op": "remove", "name": request.url.path.rsplit("/", 1)[-1]}
    asked, added = json.loads(body), json.loads(response.body)
    return {
        "op": "add",
        "source": added["source"],
        "domain": asked["domain"],
        "revision": added["revision"],
        "as_name": added["name"],
    }


async def _broadcast_sync(handle: Any, family_id: str) -> None:
    try:
        await handle.broadcast("sync", family_id).results_async(timeout_s=60, return_exceptions=True)
    except Exception as e:  # noqa: BLE001  (the others still catch up before their next answer)
        logger.warning("could not broadcast a domain change of %s: %s", family_id, e)


def deployment(
    source: str,
    *,
    domains: list[str] | None = None,
    families: list[str] | None = None,
    num_replicas: int | str | None = None,
    device: str = "cpu",
    ray_actor_options: dict[str, Any] | None = None,
    max_ongoing_requests: int | None = None,
    max_queued_requests: int | None = None,
    autoscaling_config: dict[str, Any] | Any | None = None,
    deployment_options: dict[str, Any] | None = None,
    **app_options: Any,
) -> Any:
    """A Ray Serve application serving `source` (folder or `repo@revision`) with `create_app`'s API.

    Args:
        domains: load only these of the default family (default all).
        families: the other families a request may name by `serve_multiplexed_model_id` (folders or
            `repo@revision`); any other id is a 404, so a caller cannot make replicas load, with their
            token, a family the operator did not list.
        num_replicas: replicas, or "auto" for Ray Serve's autoscaling (default 1; "auto" when
            `autoscaling_config` is given).
        ray_actor_options: resources per replica (default one CPU).
        max_ongoing_requests: requests one replica handles at once (default `queue_size + max_batch_size +
            PROBE_MARGIN`: the replica's own bounded queue answers 503 first, and probes and scrapes
            still get in; Ray Serve's own default, 5, would cap every batch at 5 images).
        max_queued_requests: requests each Ray Serve proxy holds while every replica is at
            `max_ongoing_requests`; past that it answers 503 (default `max_ongoing_requests`; -1: no limit).
        autoscaling_config: Ray Serve's autoscaling (with `num_replicas="auto"`); a dict without
            `target_ongoing_requests` gets `max_batch_size` (Ray Serve's default, 2, scales out long before
            a replica's batches fill).
        deployment_options: any other option of Ray Serve's `Deployment.options` (for example
            `health_check_period_s`, `graceful_shutdown_timeout_s`).
        **app_options: `create_app`'s options (max_batch_size, max_wait_ms, queue_size, admin_token,
            threads, ...).
    """
    options = serve_options(
        app_options,
        num_replicas=num_replicas,
        max_ongoing_requests=max_ongoing_requests,
        max_queued_requests=max_queued_requests,
        autoscaling_config=autoscaling_config,
    )
    clash = sorted(set(deployment_options or {}) & {*OWN_OPTIONS, "ray_actor_options"})
    if clash:
        raise ValueError(
            f"deployment_options sets {', '.join(clash)}, which deployment() takes itself: pass "
            f"{clash[0]}=... to deployment() instead"
        )
    options.update(deployment_options or {})  # (backpressure_config among them: the caller's wins)
    log_key = uuid.uuid4().hex  # this deployment's change logs: a redeploy starts from the families' files
    replica = {"domains": domains, "families": list(families or ()), "device": device, "app": app_options}
    replica["log_key"] = log_key
    server = FamilyServer.options(ray_actor_options=ray_actor_options or {"num_cpus": 1}, **options)
    return server.bind(source, replica)
