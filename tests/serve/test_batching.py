"""The dynamic batcher on its own: grouping, order, no useless waiting, isolation of a failing image."""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from insloc_hub.serve.batching import Batcher, DeadlineExceeded, QueueFull


def _run(coro):
    return asyncio.run(coro)


def test_concurrent_items_are_grouped_up_to_the_batch_size_in_order():
    sizes: list[int] = []

    def run_batch(items):
        sizes.append(len(items))
        return [item * 10 for item in items]

    async def main():
        batcher = Batcher(run_batch, ThreadPoolExecutor(1), max_batch_size=4, max_wait_ms=50, max_queue=100)
        batcher.start()
        results = await asyncio.gather(*(batcher.submit([i, i + 100], time.monotonic() + 10) for i in range(6)))
        await batcher.close()
        return results

    results = _run(main())
    assert results == [[i * 10, (i + 100) * 10] for i in range(6)]
    assert sum(sizes) == 12 and max(sizes) == 4 and len(sizes) == 3


def test_a_lone_request_does_not_wait_for_a_batch_when_nothing_else_is_coming():
    async def main():
        batcher = Batcher(lambda items: items, ThreadPoolExecutor(1), max_batch_size=8, max_wait_ms=3000,
                          max_queue=10, more_coming=lambda: False)
        batcher.start()
        start = time.monotonic()
        await batcher.submit([1], time.monotonic() + 10)
        await batcher.close()
        return time.monotonic() - start

    assert _run(main()) < 1.0


def test_a_failing_image_fails_alone():
    def run_batch(items):
        if "bad" in items:
            raise ValueError("cannot process bad")
        return [item.upper() for item in items]

    async def main():
        batcher = Batcher(run_batch, ThreadPoolExecutor(1), max_batch_size=8, max_wait_ms=50, max_queue=10)
        batcher.start()
        results = await asyncio.gather(*(batcher.submit([x], time.monotonic() + 10) for x in ("a", "bad", "c")),
                                       return_exceptions=True)
        await batcher.close()
        return results

    good_a, bad, good_c = _run(main())
    assert good_a == ["A"] and good_c == ["C"] and isinstance(bad, ValueError)


def test_full_queue_and_deadline():
    async def main():
        batcher = Batcher(lambda items: (time.sleep(0.3), items)[1], ThreadPoolExecutor(1), max_batch_size=1,
                          max_wait_ms=0, max_queue=2)
        batcher.start()
        first = asyncio.create_task(batcher.submit([1], time.monotonic() + 10))
        await asyncio.sleep(0.05)  # the first item is running; the queue is empty again
        with pytest.raises(QueueFull):
            await batcher.submit([2, 3, 4], time.monotonic() + 10)
        with pytest.raises(DeadlineExceeded):
            await batcher.submit([5], time.monotonic() + 0.1)
        assert await first == [1]
        await batcher.close()

    _run(main())
