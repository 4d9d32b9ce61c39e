"""Dynamic batching: requests queue images; one worker groups them and feeds the device.

Each (model, operation) has a :class:`Batcher`. Its worker coroutine takes up to ``max_batch_size``
queued images, waiting at most ``max_wait_ms`` after the first one for more, and runs them in the
one device thread that all batchers share (so one batch at a time reaches the device). A full queue
raises :class:`QueueFull` at once; an image whose request has given up (deadline, disconnect) is
dropped before it costs device time.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger(__name__)


class QueueFull(Exception):
    """The queue cannot take the request's images now; retry later (503 + Retry-After)."""


class DeadlineExceeded(Exception):
    """The request waited longer than its deadline (504)."""


@dataclass
class _Pending:
    item: Any
    future: asyncio.Future
    deadline: float
    enqueued: float


class Batcher:
    """Group single items into batches for ``run_batch`` (items in, results in the same order out).

    Args:
        run_batch: blocking function, ``list of items -> list of results``; runs in ``executor``.
        executor: the single device thread (shared by every batcher of the service).
        max_batch_size: largest batch; 1 turns batching off.
        max_wait_ms: longest wait for a batch to fill once an item is waiting.
        max_queue: most items waiting; more raises :class:`QueueFull`.
        on_batch: called with (batch size, seconds) after each batch (metrics).
        more_coming: whether other requests are on their way (being read or decoded); when none are,
            a partial batch runs at once instead of waiting ``max_wait_ms`` for images that cannot come.
    """

    def __init__(self, run_batch: Callable[[list[Any]], Sequence[Any]], executor: Executor, *,
                 max_batch_size: int, max_wait_ms: float, max_queue: int,
                 on_batch: Callable[[int, float], None] | None = None,
                 more_coming: Callable[[], bool] | None = None) -> None:
        self.run_batch = run_batch
        self.executor = executor
        self.max_batch_size = max_batch_size
        self.max_wait = max_wait_ms / 1000.0
        self.max_queue = max_queue
        self.on_batch = on_batch
        self.more_coming = more_coming or (lambda: True)
        self._queue: deque[_Pending] = deque()
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._closing = False
        self.in_flight = 0  # items taken from the queue and being run

    @property
    def depth(self) -> int:
        """Items waiting (not yet taken by the worker)."""
        return len(self._queue)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._worker())

    async def submit(self, items: Sequence[Any], deadline: float) -> list[Any]:
        """Queue ``items`` and wait for their results (raises QueueFull, DeadlineExceeded, or the model's error)."""
        if self._closing:
            raise QueueFull("the service is shutting down")
        if len(self._queue) + len(items) > self.max_queue:
            raise QueueFull(f"{len(self._queue)} images are queued (limit {self.max_queue})")
        loop = asyncio.get_running_loop()
        now = time.monotonic()
        futures = []
        for item in items:
            future = loop.create_future()
            self._queue.append(_Pending(item, future, deadline, now))
            futures.append(future)
        self._wakeup.set()
        try:
            return await asyncio.wait_for(asyncio.gather(*futures), timeout=max(deadline - now, 0.0))
        except asyncio.TimeoutError as exc:
            raise DeadlineExceeded(f"no result within the deadline ({deadline - now:.1f} s)") from exc
        finally:
            for future in futures:  # a request that gave up: its images are skipped by the worker
                if not future.done():
                    future.cancel()

    async def close(self) -> None:
        """Finish what is queued, then stop the worker."""
        self._closing = True
        while self._queue or self.in_flight:
            await asyncio.sleep(0.01)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _next_batch(self) -> list[_Pending]:
        while not self._queue:
            self._wakeup.clear()
            await self._wakeup.wait()
        first = self._queue[0].enqueued
        while len(self._queue) < self.max_batch_size:
            remaining = first + self.max_wait - time.monotonic()
            if remaining <= 0 or not self.more_coming():
                break
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), timeout=remaining)
            except asyncio.TimeoutError:
                break
        batch = []
        now = time.monotonic()
        while self._queue and len(batch) < self.max_batch_size:
            pending = self._queue.popleft()
            if pending.future.done():  # cancelled by its request
                continue
            if pending.deadline <= now:
                pending.future.set_exception(DeadlineExceeded("the deadline passed while queued"))
                continue
            batch.append(pending)
        return batch

    async def _worker(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._next_batch()
            if not batch:
                continue
            self.in_flight = len(batch)
            started = time.monotonic()
            try:
                results = await loop.run_in_executor(self.executor, self._run_isolating, [p.item for p in batch])
            finally:
                self.in_flight = 0
            if self.on_batch is not None:
                self.on_batch(len(batch), time.monotonic() - started)
            for pending, result in zip(batch, results):
                if pending.future.done():
                    continue
                if isinstance(result, BaseException):
                    pending.future.set_exception(result)
                else:
                    pending.future.set_result(result)

    def _run_isolating(self, items: list[Any]) -> list[Any]:
        """Run the batch; if it fails, run its items one by one so one bad item fails alone."""
        try:
            results = list(self.run_batch(items))
            if len(results) != len(items):
                raise RuntimeError(f"the backend returned {len(results)} results for {len(items)} images")
            return results
        except Exception as exc:
            if len(items) == 1:
                logger.warning("inference failed: %s", exc)
                return [exc]
        out: list[Any] = []
        for item in items:
            out.extend(self._run_isolating([item]))
        return out
