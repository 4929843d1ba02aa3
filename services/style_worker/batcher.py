"""A dynamic batcher in the manner of Triton's: gather up to B requests or wait at most D ms.

Requests come from several places at once (the Kafka job handler, concurrent
gRPC Stylize/Embed calls); each submits one item and gets a Future. One thread
per network takes the first waiting item, then keeps gathering until the batch
holds ``max_batch_size`` items or ``max_delay_s`` has passed since that first
item arrived, and runs the whole batch in one go. With D = 0 nothing waits for
company: a lone request runs immediately, a burst still batches.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from services.style_worker.metrics import BATCH_SIZE, QUEUE_DEPTH, QUEUE_WAIT_SECONDS

log = logging.getLogger(__name__)

In = TypeVar("In")
Out = TypeVar("Out")


@dataclass
class _Pending(Generic[In, Out]):
    item: In
    future: Future[Out]
    enqueued: float = field(default_factory=time.perf_counter)


class BatcherClosed(RuntimeError):
    """Raised to callers that submit after shutdown began."""


class DynamicBatcher(Generic[In, Out]):
    """Runs ``run_batch(items) -> outputs`` (same length, same order) over gathered batches."""

    def __init__(
        self, name: str, run_batch: Callable[[list[In]], list[Out]], max_batch_size: int, max_delay_s: float
    ) -> None:
        if max_batch_size < 1:
            raise ValueError("max_batch_size must be >= 1")
        self.name = name
        self.max_batch_size = max_batch_size
        self.max_delay_s = max(0.0, max_delay_s)
        self._run_batch = run_batch
        self._queue: queue.Queue[_Pending[In, Out] | None] = queue.Queue()
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"batcher-{name}", daemon=True)
        self._thread.start()
        self.batches_run = 0

    def submit(self, item: In) -> Future[Out]:
        if self._closed.is_set():
            raise BatcherClosed(f"{self.name} batcher is shut down")
        fut: Future[Out] = Future()
        self._queue.put(_Pending(item, fut))
        QUEUE_DEPTH.labels(self.name).inc()
        return fut

    def run(self, item: In, timeout_s: float | None = None) -> Out:
        """Submit one item and wait for its result."""
        return self.submit(item).result(timeout=timeout_s)

    def _gather(self, first: _Pending[In, Out]) -> list[_Pending[In, Out]]:
        batch = [first]
        deadline = first.enqueued + self.max_delay_s
        while len(batch) < self.max_batch_size:
            try:
                # Whatever is already queued joins without waiting.
                nxt = self._queue.get_nowait()
            except queue.Empty:
                remaining = deadline - time.perf_counter()
                if remaining <= 0:
                    break
                try:
                    nxt = self._queue.get(timeout=remaining)
                except queue.Empty:
                    break
            if nxt is None:  # shutdown marker: finish this batch first
                self._queue.put(None)
                break
            batch.append(nxt)
        return batch

    def _loop(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            batch = self._gather(first)
            QUEUE_DEPTH.labels(self.name).dec(len(batch))
            live = [p for p in batch if p.future.set_running_or_notify_cancel()]
            if not live:
                continue
            started = time.perf_counter()
            for p in live:
                QUEUE_WAIT_SECONDS.labels(self.name).observe(started - p.enqueued)
            BATCH_SIZE.labels(self.name).observe(len(live))
            try:
                outputs = self._run_batch([p.item for p in live])
                if len(outputs) != len(live):
                    raise RuntimeError(f"{self.name}: batch of {len(live)} gave {len(outputs)} outputs")
            except Exception as exc:
                log.exception("batch failed", extra={"model": self.name, "size": len(live)})
                for p in live:
                    p.future.set_exception(exc)
                continue
            self.batches_run += 1
            for p, out in zip(live, outputs, strict=True):
                p.future.set_result(out)

    def close(self, timeout_s: float = 10) -> None:
        """Stop taking requests, finish what is queued, stop the thread."""
        if self._closed.is_set():
            return
        self._closed.set()
        self._queue.put(None)
        self._thread.join(timeout_s)
