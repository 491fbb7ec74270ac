"""Prometheus metrics of the inference service (prometheus_client), one registry per app.

adapterkit_predictions_total{domain,status}            images answered, by domain and HTTP status (a routed
                                                       image by the domain it was routed to)
adapterkit_routed_total{domain}                        images the server routed and answered, by that domain
adapterkit_prediction_seconds{domain,status}           request latency of each image (histogram)
adapterkit_http_requests_total{route,method,status}    every request, by route template
adapterkit_batch_size / adapterkit_batch_domains       images and distinct domains per forward
adapterkit_forward_seconds                             time of each batched forward
adapterkit_queue_depth                                 images waiting for a forward
adapterkit_domains_loaded                              domains the model serves
adapterkit_hot_add_seconds{status}                     hot-add durations
adapterkit_domain_removals_total
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CONTENT_TYPE_LATEST as CONTENT_TYPE  # noqa: F401  (re-exported)
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Metrics:
    """The service's metrics; `queue_depth` and `domains` are read when scraped."""

    def __init__(self, queue_depth: Callable[[], int], domains: Callable[[], int]) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.predictions = Counter(
            "adapterkit_predictions", "Images answered", ["domain", "status"], registry=r
        )
        self.routed = Counter(
            "adapterkit_routed",
            "Images sent without a domain, answered, by the domain routing chose (_unknown: none)",
            ["domain"],
            registry=r,
        )
        self.latency = Histogram(
            "adapterkit_prediction_seconds",
            "Request latency of each image, from arrival to answer",
            ["domain", "status"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.http = Counter(
            "adapterkit_http_requests", "HTTP requests", ["route", "method", "status"], registry=r
        )
        self.batch_size = Histogram(
            "adapterkit_batch_size", "Images per forward", buckets=BATCH_BUCKETS, registry=r
        )
        self.batch_domains = Histogram(
            "adapterkit_batch_domains", "Distinct domains per forward", buckets=BATCH_BUCKETS, registry=r
        )
        self.forward = Histogram(
            "adapterkit_forward_seconds", "Time of one batched forward", buckets=LATENCY_BUCKETS, registry=r
        )
        self.hot_add = Histogram(
            "adapterkit_hot_add_seconds", "Hot-add durations", ["status"], buckets=LATENCY_BUCKETS, registry=r
        )
        self.removals = Counter("adapterkit_domain_removals", "Domains unloaded", registry=r)
        Gauge("adapterkit_queue_depth", "Images waiting for a forward", registry=r).set_function(queue_depth)
        Gauge("adapterkit_domains_loaded", "Domains the model serves", registry=r).set_function(domains)

    def observe_batch(self, domains: list[str], seconds: float) -> None:
        self.batch_size.observe(len(domains))
        self.batch_domains.observe(len(set(domains)))
        self.forward.observe(seconds)

    def observe_predictions(self, domains: list[str], status: int, seconds: float) -> None:
        for domain in domains:
            self.predictions.labels(domain, str(status)).inc()
            self.latency.labels(domain, str(status)).observe(seconds)

    def observe_routed(self, domains: list[str]) -> None:
        for domain in domains:
            self.routed.labels(domain).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
