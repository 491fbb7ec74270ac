"""Dynamic batching across requests: a bounded queue of images and one worker thread.

Requests announce their images while they decode them (`expecting`), then put the preprocessed images
on the queue (`submit`, refused with `QueueFull` when it would hold more than `queue_size` images) and
await one future per image. The worker takes the oldest image and, while images announced by other
requests are still being decoded, waits for them to join, until `max_batch_size` images are queued or
`max_wait_ms` have passed since the oldest arrived or the worker became free, whichever is later; with
nothing announced it runs at once, so a lone client never pays the wait.

Under load it also waits for as many images as were in the server during the last batch (its own and
those queued behind it): N steady clients otherwise split into groups that take turns, each group's
images queued behind the other's batch and run the moment the worker is free, in smaller batches at a
lower throughput (docs/benchmarks.md, "Batches that take turns"). Each image that joins extends that wait
by `max_wait_ms` (the others are coming back), up to `EXTEND` times `max_wait_ms` in all; a wait that
still runs out short of its target (the rest cannot come back in time) is not repeated for the next
`SKIP` batches.

The batch goes to `run` (one mixed-domain forward); results reach each request's event loop through
`call_soon_threadsafe`. The event loop never runs a forward, so health checks and metrics answer while
one is running.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

logger = logging.getLogger(__name__)


SKIP = 8  # batches that do not wait for the last batch's load after such a wait came up short
EXTEND = 3  # a wait that images keep joining lasts at most this many max_wait_ms


class QueueFull(Exception):
    """The queue cannot take the request's images now."""


@dataclass
class Item:
    """One image waiting for the forward: its tensor, domain and the future its request awaits.

    An image that names no domain comes with `domain="auto"`, no tensor yet and `views` (its tensor per
    distinct data config of the loaded domains); routing (serve_route.py) sets its domain, tensor and
    `routed` (the chosen domain and confidence) before the forward."""

    x: torch.Tensor | None
    domain: str
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop
    enqueued: float = field(default_factory=time.monotonic)
    views: dict[str, torch.Tensor] | None = None
    routed: Any = None
    started: float = 0.0  # when its batch began to run (time.monotonic)
    ran: float = 0.0  # seconds its batch's forward took


def _settle(future: asyncio.Future, value: Any) -> None:
    if future.done():  # the request went away (client disconnected)
        return
    if isinstance(value, BaseException):
        future.set_exception(value)
    else:
        future.set_result(value)


class Batcher:
    """Gathers queued images into batches for `run(items) -> list[result or exception]`.

    Args:
        run: called in the worker thread with a batch; returns one result (or exception) per item.
        max_batch_size: images per forward (1 turns batching off).
        max_wait_ms: how long the oldest image may wait for more to join its batch.
        queue_size: images that may wait at once; more are refused with `QueueFull`.
        on_batch: called with each batch's items after it ran (metrics).
    """

    def __init__(
        self,
        run: Callable[[list[Item]], Sequence[Any]],
        *,
        max_batch_size: int,
        max_wait_ms: float,
        queue_size: int,
        on_batch: Callable[[list[Item], float], None] | None = None,
    ) -> None:
        for name, value in (("max_batch_size", max_batch_size), ("queue_size", queue_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} must be an int >= 1")
        if not isinstance(max_wait_ms, (int, float)) or not 0 <= max_wait_ms <= 60_000:
            raise ValueError(f"max_wait_ms={max_wait_ms!r} must be a number of milliseconds in [0, 60000]")
        self.run, self.on_batch = run, on_batch
        self.max_batch_size, self.queue_size = max_batch_size, queue_size
        self.max_wait = max_wait_ms / 1000.0
        self._queue: deque[Item] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self._refusal: Callable[[], BaseException] | None = None  # set by `abandon`
        self._expected = 0  # images being decoded by requests that will submit them
        self._load = 1  # images in the server (running and queued) at most during the last batch
        self._running = 0  # images of the batch being run
        self._free = 0.0  # when the worker last became free (time.monotonic)
        self._skip = 0  # batches left that do not wait for `_load`
        self._thread: threading.Thread | None = None

    @property
    def depth(self) -> int:
        return len(self._queue)

    @property
    def closed(self) -> bool:
        return self._closed

    def start(self) -> None:
        with self._cond:
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="adapterkit-batcher", daemon=True)
                self._thread.start()

    def close(self, timeout: float = 10.0) -> None:
        """Stop taking images, finish the queued ones, and stop the worker."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    def abandon(self, error: Callable[[], BaseException]) -> int:
        """Answer every queued image with `error()` now, instead of running it, and refuse later ones with
        it (a request still decoding submits after this); returns how many were queued. The batch being
        run is not interrupted."""
        with self._cond:
            self._refusal = error
            items = list(self._queue)
            self._queue.clear()
        for item in items:
            try:
                item.loop.call_soon_threadsafe(_settle, item.future, error())
            except RuntimeError:  # that request's event loop has closed
                pass
        return len(items)

    @contextmanager
    def expecting(self, n: int) -> Iterator[None]:
        """Announce `n` images a request is decoding (and will `submit` inside the block), so that a
        batch waits for them."""
        with self._cond:
            self._expected += n
        try:
            yield
        finally:
            with self._cond:
                self._expected -= n
                self._cond.notify()

    def submit(self, items: list[Item]) -> None:
        """Queue a request's images, all or none; `QueueFull` if they do not fit now."""
        self.start()
        with self._cond:
            if self._refusal is not None:
                raise self._refusal()
            if self._closed:
                raise QueueFull("the server is shutting down")
            if len(self._queue) + len(items) > self.queue_size:
                raise QueueFull(f"{len(self._queue)} images are waiting (queue_size={self.queue_size})")
            self._queue.extend(items)
            self._load = max(self._load, self._running + len(self._queue))
            self._cond.notify()

    def _next_batch(self) -> list[Item]:
        with self._cond:
            while not self._queue and not self._closed:
                self._cond.wait()
            if not self._queue:
                return []
            start = max(self._queue[0].enqueued, self._free)
            deadline, cap = start + self.max_wait, start + EXTEND * self.max_wait
            target = 1 if self._skip else min(self.max_batch_size, self._load)  # as during the last batch
            while (
                len(self._queue) < self.max_batch_size
                and (self._expected > 0 or len(self._queue) < target)
                and not self._closed
            ):
                # an image that joined extends the wait by max_wait_ms (the others are coming back)
                deadline = min(max(deadline, self._queue[-1].enqueued + self.max_wait), cap)
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
            n = min(self.max_batch_size, len(self._queue))
            # the rest of the load cannot arrive within max_wait_ms: stop waiting for it for a while
            self._skip = SKIP if n < target else max(self._skip - 1, 0)
            batch = [self._queue.popleft() for _ in range(n)]
            self._running, self._load = n, n + len(self._queue)
            return batch

    def _loop(self) -> None:
        while True:
            batch = self._next_batch()
            if not batch:
                return
            start = time.monotonic()
            try:
                results = list(self.run(batch))
            except Exception as e:  # noqa: BLE001  (every waiting request gets the error)
                logger.exception("batch of %d images failed", len(batch))
                results = [e] * len(batch)
            took = time.monotonic() - start
            for item, result in zip(batch, results, strict=True):
                item.started, item.ran = start, took
                try:
                    item.loop.call_soon_threadsafe(_settle, item.future, result)
                except RuntimeError:  # that request's event loop has closed
                    pass
            with self._cond:
                self._running, self._free = 0, time.monotonic()
            if self.on_batch is not None:
                self.on_batch(batch, took)


def server_timing(began: float, items: list[Item]) -> str:
    """A predict answer's `Server-Timing` header (W3C Server Timing; milliseconds): `read` (the body
    received, parsed, the images decoded and preprocessed), `queue` (until the last of its images' batches
    began), `forward` (that batch's forward) and `total` (the request in the server, answer built). Clients
    and load tests can tell time in the server from time on the network and in their own event loop."""
    now = time.monotonic()
    last = max(items, key=lambda item: item.started)
    parts = {
        "read": last.enqueued - began,
        "queue": last.started - last.enqueued,
        "forward": last.ran,
        "total": now - began,
    }
    return ", ".join(f"{name};dur={1e3 * seconds:.2f}" for name, seconds in parts.items())
