"""Dynamic micro-batching: concurrent requests for one model share a backend call.

An image that finds the model idle goes to the backend at once (no added latency at low load).
While a batch is running, arriving images wait a short window (a few ms); whatever has queued
for the same model and input size when a backend slot is free goes in one batch, up to the
model's maximum, so batches grow with load.
The queue is bounded: beyond ``max_queue`` waiting images a request is refused (429) at once
rather than left to time out.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import numpy as np

from slsg.contract import ModelCard
from slsg_gateway.backends.base import Backend
from slsg_gateway.errors import GatewayError, Overloaded
from slsg_gateway.metrics import GatewayMetrics

_Key = tuple[str, int, int]  # model name, input height, input width


@dataclass
class BatchItem:
    """One image's share of a batch result."""

    version: int
    anomaly_map: np.ndarray  # [H, W]
    score: float
    infer_ms: float  # the whole batch's backend time
    part_counts: np.ndarray | None = None  # [K]: parts found per part kind (models whose card lists them)
    card: ModelCard | None = None  # the card of ``version`` where the backend knows it


@dataclass
class _Pending:
    image: np.ndarray
    future: asyncio.Future = field(repr=False)


class MicroBatcher:
    def __init__(self, backend: Backend, metrics: GatewayMetrics, *, window_ms: float, max_batch: int,
                 max_queue: int, max_concurrent: int, retry_after_s: int = 1) -> None:
        self.backend = backend
        self.metrics = metrics
        self.window_s = window_ms / 1e3
        self.max_batch = max(1, max_batch)
        self.max_queue = max_queue
        self.retry_after_s = retry_after_s
        self._slots = asyncio.Semaphore(max(1, max_concurrent))
        self._pending: dict[_Key, list[_Pending]] = {}
        self._timers: dict[_Key, asyncio.TimerHandle] = {}
        self._tasks: set[asyncio.Task] = set()
        self._active: dict[str, int] = {}  # batches started and not finished, per model

    def queued(self, name: str) -> int:
        return sum(len(items) for key, items in self._pending.items() if key[0] == name)

    async def submit(self, name: str, image: np.ndarray, model_max_batch: int = 0) -> BatchItem:
        """Queue ``image`` (uint8 [H, W, 3] at the model input size); resolves with its own outputs."""
        if self.queued(name) >= self.max_queue:
            raise Overloaded(f"queue for model {name!r} is full ({self.max_queue} images waiting); retry later",
                             headers={"Retry-After": str(self.retry_after_s)})
        key = (name, image.shape[0], image.shape[1])
        limit = min(self.max_batch, model_max_batch) if model_max_batch > 0 else self.max_batch
        future = asyncio.get_running_loop().create_future()
        pending = self._pending.setdefault(key, [])
        pending.append(_Pending(image, future))
        self.metrics.queue_depth.labels(name).set(self.queued(name))
        if len(pending) >= limit or not self._active.get(name):
            self._start(key, limit)
        elif key not in self._timers:
            self._timers[key] = asyncio.get_running_loop().call_later(self.window_s, self._start, key, limit)
        return await future

    def _start(self, key: _Key, limit: int) -> None:
        timer = self._timers.pop(key, None)
        if timer is not None:
            timer.cancel()
        self._active[key[0]] = self._active.get(key[0], 0) + 1
        task = asyncio.get_running_loop().create_task(self._run(key, limit))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, key: _Key, limit: int) -> None:
        try:
            await self._take_and_infer(key, limit)
        finally:
            self._active[key[0]] -= 1

    async def _take_and_infer(self, key: _Key, limit: int) -> None:
        async with self._slots:
            # take what has queued by the time a slot is free: batches grow under load
            pending = self._pending.get(key, [])
            items = [p for p in pending[:limit] if not p.future.done()]
            del pending[:limit]
            if pending:
                self._start(key, limit)
            self.metrics.queue_depth.labels(key[0]).set(self.queued(key[0]))
            if items:
                await self._infer(key[0], items)

    async def _infer(self, name: str, items: list[_Pending]) -> None:
        self.metrics.batch_size.labels(name).observe(len(items))
        t0 = time.perf_counter()
        try:
            output = await self.backend.infer(name, np.stack([p.image for p in items]))
        except Exception as exc:  # every waiter gets the error; the batcher itself keeps going
            kind = exc.code if isinstance(exc, GatewayError) else type(exc).__name__
            self.metrics.backend_errors.labels(name, kind).inc()
            for p in items:
                if not p.future.done():
                    p.future.set_exception(exc)
            return
        infer_ms = (time.perf_counter() - t0) * 1e3
        for i, p in enumerate(items):
            if not p.future.done():
                counts = None if output.part_counts is None else output.part_counts[i]
                p.future.set_result(BatchItem(output.version, output.anomaly_map[i], float(output.score[i]), infer_ms,
                                              counts, output.card))

    async def close(self) -> None:
        for timer in self._timers.values():
            timer.cancel()
        for task in list(self._tasks):
            task.cancel()
        for items in self._pending.values():
            for p in items:
                if not p.future.done():
                    p.future.cancel()
        self._pending.clear()
