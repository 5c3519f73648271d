"""Dynamic batching: concurrent requests' images gathered into one model batch, answered one by one.

:class:`DynamicBatcher` lives on the event loop. :meth:`~DynamicBatcher.submit` queues a request's images
and waits for their results; one worker coroutine takes up to ``max_batch`` images at a time, once the
oldest waiting image has waited ``max_wait_s`` or the batch is full, and runs the batch function in ONE
worker thread (the event loop never computes; the model never runs two batches at once, so memory is one
batch's). While a batch runs, the next requests queue up: under load, batches fill by themselves and
``max_wait_s`` only matters when the service is quiet.

Bounds: at most ``max_queue`` images wait (a request that would go beyond gets :class:`QueueFull`, with a
retry delay estimated from the recent batch times); a request that gives up (timeout, client gone) takes
its images that have not started out of the queue, and results nobody waits for any more are dropped.
:meth:`~DynamicBatcher.stop` refuses new images, finishes every image already queued, then ends the
worker thread (graceful shutdown); :meth:`~DynamicBatcher.hurry` (at SIGTERM) stops waiting for fuller
batches, so that what is queued runs at once.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")

log = logging.getLogger("pneumodet.serve")


class QueueFull(Exception):
    """The queue cannot take a request's images now; ``retry_after`` (whole seconds) is a fair wait."""

    def __init__(self, waiting: int, asked: int, limit: int, retry_after: int) -> None:
        self.waiting, self.asked, self.limit, self.retry_after = waiting, asked, limit, retry_after
        super().__init__(f"the queue holds {waiting} image(s) of at most {limit}; {asked} more cannot wait now")


class BatcherStopped(Exception):
    """The service is shutting down and takes no new images."""


@dataclass
class _Job(Generic[T, R]):
    item: T
    future: asyncio.Future[R]
    arrived: float


class DynamicBatcher(Generic[T, R]):
    """Gathers items from concurrent callers into batches for ``run_batch`` (called in a worker thread).

    Args:
        run_batch: items -> one result per item, in order. Called with 1 to ``max_batch`` items, never
            concurrently; an exception fails every item of that batch (and only that batch).
        max_batch: most items per batch (1: no batching).
        max_wait_s: how long the oldest waiting item may wait for others before its batch runs.
        max_queue: most items waiting (not yet in a running batch).
        on_batch: called on the event loop after each batch with ``(size, seconds)`` (metrics).
    """

    def __init__(self, run_batch: Callable[[list[T]], Sequence[R]], *, max_batch: int, max_wait_s: float,
                 max_queue: int, on_batch: Callable[[int, float], None] | None = None) -> None:
        if max_batch < 1 or max_queue < 1 or not (math.isfinite(max_wait_s) and max_wait_s >= 0):
            raise ValueError(f"max_batch and max_queue must be at least 1 and max_wait_s finite and >= 0; "
                             f"got {max_batch}, {max_queue}, {max_wait_s}")
        self.run_batch = run_batch
        self.max_batch, self.max_wait_s, self.max_queue = max_batch, max_wait_s, max_queue
        self.on_batch = on_batch
        self._queue: collections.deque[_Job[T, R]] = collections.deque()
        self._wakeup: asyncio.Event | None = None
        self._worker: asyncio.Task[None] | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._stopping = False
        self._hurry = False  # shutting down: run what waits at once, without waiting for more
        self._loop: asyncio.AbstractEventLoop | None = None
        self._recent_batch_s = 0.0  # moving average, for Retry-After
        self.batches = 0

    # ------------------------------------------------------------------ state
    @property
    def depth(self) -> int:
        """Items waiting for a batch (not counting the batch running now)."""
        return len(self._queue)

    @property
    def running(self) -> bool:
        """The worker is alive and takes new items."""
        return self._worker is not None and not self._worker.done() and not self._stopping

    def retry_after(self) -> int:
        """Seconds after which the queue has probably drained enough: the batches ahead times the recent
        batch time, at least 1."""
        batches_ahead = self.depth / self.max_batch + 1
        return max(1, math.ceil(batches_ahead * self._recent_batch_s))

    # ------------------------------------------------------------------ life
    async def start(self) -> None:
        """Start the worker (on the running loop) and its thread."""
        if self._worker is not None:
            raise RuntimeError("the batcher was started already")
        self._wakeup = asyncio.Event()
        self._loop = asyncio.get_running_loop()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pneumodet-batch")
        self._worker = asyncio.create_task(self._work(), name="pneumodet-batcher")

    def hurry(self) -> None:
        """From now on run waiting items at once instead of waiting for fuller batches (a shutdown has begun).
        Safe to call from any thread or a signal handler."""
        self._hurry = True
        if self._loop is not None and self._wakeup is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._wakeup.set)

    async def stop(self) -> None:
        """Take no new items, answer every queued one, then end the worker and its thread."""
        self._stopping = self._hurry = True
        if self._wakeup is not None:
            self._wakeup.set()
        if self._worker is not None:
            await self._worker
        if self._executor is not None:
            self._executor.shutdown(wait=True)

    # ------------------------------------------------------------------ callers
    async def submit(self, items: Sequence[T]) -> list[R]:
        """Queue ``items`` and return their results, in order, once their batches have run.

        Raises:
            QueueFull: the items do not fit in the queue now (nothing was queued).
            BatcherStopped: the batcher is stopping or stopped.
            Exception: what ``run_batch`` raised for a batch holding one of the items.
        """
        if self._stopping or self._worker is None or self._worker.done():
            raise BatcherStopped("the service is shutting down")
        if self.depth + len(items) > self.max_queue:
            raise QueueFull(self.depth, len(items), self.max_queue, self.retry_after())
        loop = asyncio.get_running_loop()
        now = loop.time()
        jobs = [_Job(item, loop.create_future(), now) for item in items]
        self._queue.extend(jobs)
        assert self._wakeup is not None
        self._wakeup.set()
        try:
            return list(await asyncio.gather(*(job.future for job in jobs)))
        except BaseException:  # cancelled (timeout, client gone) or a batch failed: leave nothing queued
            for job in jobs:
                if not job.future.done():
                    job.future.cancel()
            self._forget(jobs)
            raise

    def _forget(self, jobs: list[_Job[T, R]]) -> None:
        gone = {id(job) for job in jobs}
        if any(id(job) in gone for job in self._queue):
            self._queue = collections.deque(job for job in self._queue if id(job) not in gone)

    # ------------------------------------------------------------------ worker
    async def _wait(self, timeout: float | None) -> None:
        assert self._wakeup is not None
        self._wakeup.clear()
        if timeout is None:
            await self._wakeup.wait()
            return
        try:
            async with asyncio.timeout(timeout):
                await self._wakeup.wait()
        except TimeoutError:
            pass

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while not self._queue:
                if self._stopping:
                    return
                await self._wait(None)
            deadline = self._queue[0].arrived + self.max_wait_s
            while len(self._queue) < self.max_batch and not self._hurry:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                await self._wait(remaining)
                if not self._queue:  # every waiting request gave up
                    break
            jobs = [self._queue.popleft() for _ in range(min(self.max_batch, len(self._queue)))]
            jobs = [job for job in jobs if not job.future.done()]
            if jobs:
                await self._run(loop, jobs)

    async def _run(self, loop: asyncio.AbstractEventLoop, jobs: list[_Job[T, R]]) -> None:
        started = loop.time()
        try:
            results = await loop.run_in_executor(self._executor, self.run_batch, [job.item for job in jobs])
            if len(results) != len(jobs):
                raise RuntimeError(f"run_batch returned {len(results)} results for {len(jobs)} items")
        except Exception as exc:  # noqa: BLE001 - the batch's callers get it; the worker goes on
            log.exception("a batch of %d image(s) failed", len(jobs))
            for job in jobs:
                if not job.future.done():
                    job.future.set_exception(exc)
        else:
            for job, result in zip(jobs, results, strict=True):
                if not job.future.done():  # its caller gave up meanwhile: nobody to answer
                    job.future.set_result(result)
        seconds = loop.time() - started
        self.batches += 1
        self._recent_batch_s = seconds if self.batches == 1 else 0.8 * self._recent_batch_s + 0.2 * seconds
        if self.on_batch is not None:
            self.on_batch(len(jobs), seconds)
