"""The service's Batcher on its own: what `abandon` (the graceful timeout's last step) does to queued
images and to images submitted after it."""

from __future__ import annotations

import asyncio
import threading

import pytest
import torch

from adapterkit.serve_batching import Batcher, Item


class Stop(Exception):
    pass


def test_abandon_answers_the_queued_images_and_refuses_later_ones():
    running, release = threading.Event(), threading.Event()

    def run(items):
        running.set()
        release.wait(10)  # the first batch holds the worker while the others queue
        return [item.domain for item in items]

    async def scenario():
        loop = asyncio.get_running_loop()
        batcher = Batcher(run, max_batch_size=1, max_wait_ms=0, queue_size=8)

        def item():
            return Item(torch.zeros(1), "a", loop.create_future(), loop)

        first, queued = item(), [item() for _ in range(3)]
        batcher.submit([first])
        await asyncio.to_thread(running.wait, 10)
        batcher.submit(queued)
        assert batcher.abandon(lambda: Stop("shutting down")) == 3 and batcher.depth == 0
        for waiting in queued:
            with pytest.raises(Stop):
                await waiting.future
        with pytest.raises(Stop):  # a request that was still decoding
            batcher.submit([item()])
        release.set()
        assert await first.future == "a"  # the batch in flight is answered as usual
        batcher.close()

    asyncio.run(scenario())
