"""The service's Batcher on its own: what `abandon` (the graceful timeout's last step) does to queued
images and to images submitted after it, and how batches form under steady load."""

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


def _steady(batcher_wait_ms: float, scenario):
    """Run `scenario(submit, first_done)` against a Batcher whose first batch is held until the scenario
    has queued the images of the clients that arrive meanwhile; returns the sizes of the batches run."""
    sizes, running, release = [], threading.Event(), threading.Event()

    def run(items):
        sizes.append(len(items))
        if len(sizes) == 1:
            running.set()
            release.wait(10)
        return [item.domain for item in items]

    async def main():
        loop = asyncio.get_running_loop()
        batcher = Batcher(run, max_batch_size=32, max_wait_ms=batcher_wait_ms, queue_size=64)

        def submit(n: int) -> list[Item]:
            items = [Item(torch.zeros(1), "a", loop.create_future(), loop) for _ in range(n)]
            batcher.submit(items)
            return items

        first = submit(4)
        await asyncio.to_thread(running.wait, 10)
        await scenario(submit, first, release)
        batcher.close()

    asyncio.run(main())
    return sizes


def test_clients_that_would_take_turns_run_as_one_batch():
    """Eight steady clients split into two groups of four that took turns: while one group's batch ran,
    the other's images queued, and the worker ran them alone the moment it was free. The worker now waits
    (up to max_wait_ms) for as many images as were in the server during the last batch: eight."""

    async def scenario(submit, first, release):
        second = submit(4)  # the other group, while the first runs
        release.set()
        await asyncio.gather(*(i.future for i in first))
        again = submit(4)  # the first group's next images, once it has its answers
        await asyncio.gather(*(i.future for i in second + again))

    assert _steady(5_000, scenario) == [4, 8]


def test_a_wait_for_the_load_that_does_not_come_back_is_not_repeated():
    """When the rest of the last batch's load does not come back within max_wait_ms, the batches after it
    run as soon as the worker is free again (a client alone does not wait for the others each time)."""

    async def scenario(submit, first, release):
        second = submit(4)
        release.set()
        await asyncio.gather(*(i.future for i in first + second))  # the second ran alone after max_wait_ms
        lone = submit(1)
        await asyncio.sleep(0.5)
        late = submit(1)  # within max_wait_ms of the lone image: it would have joined a waiting batch
        await asyncio.gather(*(i.future for i in lone + late))

    assert _steady(2_000, scenario) == [4, 4, 1, 1]
