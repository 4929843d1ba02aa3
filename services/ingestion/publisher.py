"""Publishing events with acks=all under a bounded in-flight budget and a broker circuit.

Why not just ``producer.send`` + ``get``: kafka-python 3 has no ``buffer_memory``,
so a slow broker would let queued records grow without bound, and an absent
broker makes every call wait for the full timeout. Here:

* callers must *admit* their events first; when the budget is used up they get
  :class:`Overloaded` (→ RESOURCE_EXHAUSTED with RetryInfo) after at most
  ``admission_wait_s`` instead of queueing;
* a broker failure opens a short circuit during which calls fail fast with
  :class:`BrokerUnavailable` (→ UNAVAILABLE with RetryInfo);
* the producer is created in the background, so the process starts (and says
  NOT_SERVING) while the broker is still coming up.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from kafka import KafkaProducer
from kafka.errors import KafkaError, KafkaTimeoutError

from libs.common.kafka import kafka_security
from libs.common.metrics import PRODUCED
from services.ingestion import metrics
from services.ingestion.config import IngestionSettings

log = logging.getLogger(__name__)


class PublishRefused(Exception):
    """Base of the fast refusals; carries the delay the client should wait."""

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class BrokerUnavailable(PublishRefused):
    pass


class Overloaded(PublishRefused):
    pass


def producer_config(settings: IngestionSettings, client_id: str = "ingestion") -> dict[str, Any]:
    """KafkaProducer settings of the front door; the benchmark's bare baseline uses the same ones."""
    request_timeout_ms = settings.kafka_request_timeout_ms
    return {
        "bootstrap_servers": settings.kafka_servers,
        **kafka_security(settings),
        "client_id": client_id,
        "acks": "all",
        "retries": 3,
        # kafka-python 3's idempotent producer wedges for good once a batch expires (a broker
        # stall longer than delivery_timeout_ms): every later send times out. Without it, a
        # retried batch may be written twice, which consumers absorb (they key on event_id);
        # one request in flight per connection keeps per-user order across retries.
        "enable_idempotence": False,
        "max_in_flight_requests_per_connection": 1,
        "linger_ms": settings.kafka_linger_ms,
        "batch_size": settings.kafka_batch_bytes,
        "max_block_ms": settings.kafka_max_block_ms,
        "request_timeout_ms": request_timeout_ms,
        "delivery_timeout_ms": max(
            int(settings.publish_timeout_s * 1000), request_timeout_ms + settings.kafka_linger_ms
        ),
        "max_request_size": 8 * 1024 * 1024,
        "bootstrap_timeout_ms": 5000,
        # Client-side metrics cost CPU per record and nobody scrapes them.
        "metrics_enabled": False,
    }


@dataclass
class PendingBatch:
    """Records handed to the producer; ``futures[i]`` is None when the send itself failed."""

    admitted: int
    futures: list[Any] = field(default_factory=list)
    send_error: str | None = None
    started: float = field(default_factory=time.perf_counter)


@dataclass
class BatchResult:
    ok: list[bool]
    unknown: list[bool]  # timed out: may still be delivered later
    error: str | None


class EventPublisher:
    def __init__(
        self,
        settings: IngestionSettings,
        factory: Callable[..., Any] = KafkaProducer,
    ) -> None:
        self.settings = settings
        self._factory = factory
        self._producer: Any = None
        self._ready = threading.Event()
        self._closed = threading.Event()
        self._cond = threading.Condition()
        self._inflight = 0
        self._down_until = 0.0
        self._last_error = ""

    # ---------- lifecycle ----------
    def start(self) -> EventPublisher:
        threading.Thread(target=self._connect_loop, name="producer-connect", daemon=True).start()
        return self

    def _connect_loop(self) -> None:
        while not self._closed.is_set() and self._producer is None:
            try:
                self._producer = self._factory(**producer_config(self.settings))
                self._ready.set()
                log.info("producer connected", extra={"bootstrap": self.settings.kafka_bootstrap})
            except KafkaError as exc:
                self._last_error = f"{type(exc).__name__}: {exc}"
                metrics.BROKER_ERRORS.labels("unavailable").inc()
                log.warning("producer cannot reach the broker yet", extra={"error": self._last_error})
                self._closed.wait(1.0)

    def wait_ready(self, timeout_s: float) -> bool:
        return self._ready.wait(timeout_s)

    @property
    def ready(self) -> bool:
        return self._ready.is_set()

    def close(self) -> None:
        self._closed.set()
        if self._producer is not None:
            try:
                self._producer.flush(timeout=self.settings.publish_timeout_s)
                self._producer.close(timeout=5)
            except KafkaError:
                log.warning("producer close failed")

    # ---------- admission ----------
    def admit(self, n: int) -> None:
        """Reserve room for ``n`` events or raise a fast refusal."""
        if not self._ready.is_set():
            metrics.ADMISSION_REJECTS.labels("not_connected").inc()
            raise BrokerUnavailable(f"event broker not connected yet ({self._last_error or 'connecting'})", 1.0)
        now = time.monotonic()
        if now < self._down_until:
            metrics.ADMISSION_REJECTS.labels("broker_down").inc()
            raise BrokerUnavailable(
                f"event broker failing ({self._last_error}); retry later", max(0.1, self._down_until - now)
            )
        limit = self.settings.max_inflight_events
        deadline = now + self.settings.admission_wait_s
        with self._cond:
            while self._inflight + n > limit:
                left = deadline - time.monotonic()
                if left <= 0:
                    metrics.ADMISSION_REJECTS.labels("inflight_full").inc()
                    raise Overloaded(
                        f"{self._inflight} events already in flight to the broker (limit {limit}); slow down", 0.2
                    )
                self._cond.wait(left)
            self._inflight += n
            metrics.INFLIGHT_EVENTS.set(self._inflight)

    def release(self, n: int) -> None:
        with self._cond:
            self._inflight = max(0, self._inflight - n)
            metrics.INFLIGHT_EVENTS.set(self._inflight)
            self._cond.notify_all()

    @property
    def inflight(self) -> int:
        return self._inflight

    def _trip(self, error: str) -> None:
        self._last_error = error
        self._down_until = time.monotonic() + self.settings.broker_cooldown_s

    # ---------- publishing ----------
    def send(self, topic: str, records: Sequence[tuple[bytes, bytes]], admitted: int) -> PendingBatch:
        """Hand (key, value) records to the producer; never waits for acks (see :meth:`wait`)."""
        batch = PendingBatch(admitted=admitted)
        send = self._producer.send
        try:
            for key, value in records:
                batch.futures.append(send(topic, value=value, key=key))
        except KafkaTimeoutError as exc:
            # max_block_ms elapsed waiting for metadata: the broker is absent.
            batch.send_error = f"broker unreachable: {exc}"
            metrics.BROKER_ERRORS.labels("unavailable").inc()
            self._trip(batch.send_error)
        except KafkaError as exc:
            batch.send_error = f"{type(exc).__name__}: {exc}"
            metrics.BROKER_ERRORS.labels("error").inc()
            self._trip(batch.send_error)
        batch.futures.extend([None] * (len(records) - len(batch.futures)))
        return batch

    def wait(self, batch: PendingBatch, topic: str, on_late: Callable[[int, bool], None] | None = None) -> BatchResult:
        """Wait (bounded) for the broker's acks; releases the batch's admission.

        ``on_late(i, ok)`` is called later for records that had not completed by
        the deadline, so their idempotency markers can still be settled.
        """
        deadline = time.monotonic() + self.settings.publish_timeout_s
        n = len(batch.futures)
        ok = [False] * n
        unknown = [False] * n
        error = batch.send_error
        try:
            for i, fut in enumerate(batch.futures):
                if fut is None:
                    continue
                left = deadline - time.monotonic()
                try:
                    fut.get(timeout=max(0.0, left))
                    ok[i] = True
                except KafkaTimeoutError as exc:
                    if fut.is_done:  # delivery itself timed out inside the producer
                        error = error or f"broker did not acknowledge: {exc}"
                        continue
                    unknown[i] = True
                    error = error or f"broker did not acknowledge within {self.settings.publish_timeout_s:g}s"
                    if on_late is not None:
                        fut.add_callback(_late(on_late, i, True))
                        fut.add_errback(_late(on_late, i, False))
                except KafkaError as exc:
                    error = error or f"{type(exc).__name__}: {exc}"
        finally:
            self.release(batch.admitted)
        good = sum(ok)
        if good:
            PRODUCED.labels(topic, "ok").inc(good)
        if error:
            bad = n - good
            PRODUCED.labels(topic, "error").inc(bad)
            metrics.BROKER_ERRORS.labels("timeout" if any(unknown) else "error").inc()
            self._trip(error)
        else:
            metrics.PRODUCE_SECONDS.observe(time.perf_counter() - batch.started)
        return BatchResult(ok=ok, unknown=unknown, error=error)


def _late(on_late: Callable[[int, bool], None], i: int, ok: bool) -> Callable[[Any], None]:
    def callback(_result: Any) -> None:
        on_late(i, ok)

    return callback
