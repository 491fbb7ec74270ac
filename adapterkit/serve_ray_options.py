"""Ray Serve's request limits for an adapterkit deployment (`serve_ray.deployment`), chosen so that a
replica fills its batches and its own bounded queue stays the back-pressure.

How Ray Serve (2.x) counts: a replica takes at most `max_ongoing_requests` requests at once (a semaphore
in the replica; an HTTP request counts from the moment the replica accepts it until its whole response
has been sent, body upload included, and the broadcasts replicas send each other for `/metrics` and
hot-adds count too). Past that, each proxy holds requests (up to `max_queued_requests`, then 503) until a
replica has room, whatever their path. Ray Serve's defaults (5, unbounded) would cap every forward at 5
one-image requests, however large `max_batch_size` is, and make `/healthz`, `/readyz` and `/metrics`
wait behind predictions in the proxy.

So by default a replica takes `queue_size + max_batch_size + PROBE_MARGIN` requests: every image the
app's queue holds, a forward's worth being run, and room for probes, scrapes and broadcasts. Predictions
past the queue get the app's own 503 `overloaded` with Retry-After, quickly, so they free their slot; a
proxy holds at most that many more per deployment (`max_queued_requests`), then answers 503 itself
(with `Retry-After: 1` where Ray Serve supports it). Autoscaling (`num_replicas="auto"`) aims at
`max_batch_size` ongoing requests per replica: a full batch of one-image requests each.
"""

from __future__ import annotations

import inspect
import logging
from typing import Any

logger = logging.getLogger(__name__)
PROBE_MARGIN = 16  # requests a replica takes beyond its queue and forward: probes, scrapes, broadcasts
RETRY_AFTER_S = 1  # as the app's own 503 `overloaded`
OWN_OPTIONS = ("num_replicas", "max_ongoing_requests", "max_queued_requests", "autoscaling_config")


def app_default(name: str, app_options: dict[str, Any]) -> int:
    """`create_app`'s option `name` as the deployment sets it (its default when unset), checked."""
    from .serve import create_app

    value = app_options.get(name, inspect.signature(create_app).parameters[name].default)
    return _count(name, value, f"pass {name}=<int> to deployment()")


def _count(name: str, value: Any, fix: str, unlimited: bool = False) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not (value >= 1 or unlimited and value == -1):
        allowed = "an int >= 1" + (" (or -1: no limit)" if unlimited else "")
        raise ValueError(f"{name}={value!r} must be {allowed}: {fix}")
    return value


def serve_options(
    app_options: dict[str, Any],
    *,
    num_replicas: int | str | None = None,
    max_ongoing_requests: int | None = None,
    max_queued_requests: int | None = None,
    autoscaling_config: dict[str, Any] | Any | None = None,
) -> dict[str, Any]:
    """The `Deployment.options(...)` of a replica serving `create_app(**app_options)`: replicas (or
    autoscaling), `max_ongoing_requests` and `max_queued_requests`, each the caller's when given."""
    from .serve_domains import autocast_dtype

    batch = app_default("max_batch_size", app_options)
    queue = app_default("queue_size", app_options)
    autocast_dtype(app_options.get("mixed_precision", "no"))  # (checked here, not in each replica)
    if max_ongoing_requests is None:
        max_ongoing_requests = queue + batch + PROBE_MARGIN
    ongoing = _count("max_ongoing_requests", max_ongoing_requests, "leave it out for the default")
    if ongoing < batch:
        logger.warning(
            "max_ongoing_requests=%d is below max_batch_size=%d: a replica's forwards of one-image requests "
            "hold at most %d images",
            ongoing,
            batch,
            ongoing,
        )
    queued = max_queued_requests if max_queued_requests is not None else ongoing
    options: dict[str, Any] = {
        "max_ongoing_requests": ongoing,
        "max_queued_requests": _count(
            "max_queued_requests", queued, "leave it out for the default (max_ongoing_requests)", True
        ),
    }
    if "backpressure_config" in inspect.signature(_options()).parameters:  # (Ray Serve >= 2.60)
        options["backpressure_config"] = {"retry_after_s": RETRY_AFTER_S}
    options.update(_replicas(num_replicas, autoscaling_config, target=min(batch, ongoing)))
    return options


def _replicas(num_replicas: int | str | None, autoscaling_config: Any, target: int) -> dict[str, Any]:
    """`num_replicas` and, when autoscaling, `autoscaling_config` aiming at `target` ongoing requests."""
    if autoscaling_config is not None and num_replicas not in (None, "auto"):
        raise ValueError(
            f"num_replicas={num_replicas!r} and autoscaling_config both given: leave num_replicas out (or pass "
            '"auto") to autoscale, or leave autoscaling_config out for a fixed number of replicas'
        )
    if num_replicas is None:
        num_replicas = "auto" if autoscaling_config is not None else 1
    if num_replicas != "auto":
        return {
            "num_replicas": _count(
                "num_replicas", num_replicas, 'pass a number of replicas, or "auto" to autoscale'
            )
        }
    if autoscaling_config is None or isinstance(autoscaling_config, dict):  # (an AutoscalingConfig: as given)
        autoscaling_config = {"target_ongoing_requests": target, **(autoscaling_config or {})}
    return {"num_replicas": "auto", "autoscaling_config": autoscaling_config}


def _options() -> Any:
    from ray.serve.deployment import Deployment

    return Deployment.options
