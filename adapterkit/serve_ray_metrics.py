"""`GET /metrics` of a Ray Serve deployment: the metrics of every live replica in one exposition.

Each replica keeps its own registry (`serve_metrics.py`); the replica that the proxy picks for a scrape
asks every live replica for its exposition text (`DeploymentHandle.broadcast`, as hot-adds do), labels
each sample with the replica's id (`replica`, the id of the `x-adapterkit-replica` header) and merges the
families, one `# HELP`/`# TYPE` each, with prometheus_client's parser and exposition. A replica that does
not answer within `timeout_s` is left out and counted in `adapterkit_metrics_replicas_missing`; the
scrape never fails on it.

adapterkit_metrics_replicas_answered    replicas that answered this scrape in time
adapterkit_metrics_replicas_missing     replicas that did not answer in time (NaN: the broadcast failed,
                                        so how many is unknown; the scrape holds the answering replica's)
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families

logger = logging.getLogger(__name__)
REPLICA_LABEL = "replica"
TIMEOUT_S = 2.0  # how long a scrape waits for the replicas (Prometheus' default scrape timeout is 10 s)


class Merged:
    """A collector of the replicas' parsed families, each sample labelled with its replica."""

    def __init__(self, texts: Iterable[tuple[str, str]], answered: int, missing: float) -> None:
        self.families: dict[str, Metric] = {}
        for replica, text in texts:
            for family in text_string_to_metric_families(text):
                merged = self.families.setdefault(
                    family.name, Metric(family.name, family.documentation, family.type, family.unit)
                )
                merged.samples.extend(
                    s._replace(labels={**s.labels, REPLICA_LABEL: replica}) for s in family.samples
                )
        self.answered, self.missing = answered, missing

    def collect(self) -> Iterator[Metric]:
        yield from self.families.values()
        yield GaugeMetricFamily(
            "adapterkit_metrics_replicas_answered",
            "Replicas that answered this scrape in time",
            self.answered,
        )
        yield GaugeMetricFamily(
            "adapterkit_metrics_replicas_missing",
            "Replicas that did not answer this scrape in time (NaN: unknown, the broadcast failed)",
            self.missing,
        )


def merge(texts: list[tuple[str, str]], answered: int | None = None, missing: float = 0) -> bytes:
    """One Prometheus text exposition of `(replica id, exposition text)` pairs, `replica` on every sample;
    `answered` replicas (default one per text: a replica that holds no metrics of the family has no text)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(Merged(texts, len(texts) if answered is None else answered, missing))
    return generate_latest(registry)


async def gather(handle: Any, method: str, *args: Any, timeout_s: float = TIMEOUT_S) -> tuple[list, int]:
    """The answers of every live replica of `handle`'s deployment to `method(*args)` (a broadcast), and how
    many replicas did not answer within `timeout_s` (or failed); raises when the broadcast itself fails.

    `DeploymentBroadcastResponse.results_async(timeout_s=...)` gives up on every replica when one is late,
    so each replica's answer is awaited on its own: the response's per-replica results come from its
    `_fetch_replica_results_async` (Ray 2.60's, not a public API); a Ray without it is all or nothing."""
    response = handle.broadcast(method, *args)
    per_replica = getattr(response, "_fetch_replica_results_async", None)
    if per_replica is None:  # (a Ray without per-replica results: all or nothing)
        answers = await response.results_async(timeout_s=timeout_s, return_exceptions=True)
        kept = [a for a in answers if not isinstance(a, BaseException)]
        return kept, len(answers) - len(kept)
    deadline = asyncio.get_running_loop().time() + timeout_s
    results = await asyncio.wait_for(per_replica(), timeout=timeout_s)
    tasks = [asyncio.ensure_future(r.get_async()) for r in results]
    if not tasks:
        return [], 0
    done, pending = await asyncio.wait(tasks, timeout=max(0.0, deadline - asyncio.get_running_loop().time()))
    for task in pending:
        task.cancel()
    kept = [t.result() for t in done if t.exception() is None]
    for task in done:
        if task.exception() is not None:
            logger.warning("a replica's metrics could not be read: %s", task.exception())
    return kept, len(tasks) - len(kept)
