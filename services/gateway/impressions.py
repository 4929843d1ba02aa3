"""Impressions: what each GetRecommendations answer showed, published off the request path.

An online experiment needs the denominator: which items, in which order, by which strategy and
arm, were shown to whom. The request thread only stamps the answer with a recommendation id and
puts a small tuple on a bounded queue: the answer's wire bytes (one upb serialization, ~1 µs for
k=10, cheaper than walking the items in Python) and the pseudonym; no I/O. One background thread
sends, at most every ``impressions_linger_ms``, **one record per partition** (an
``ImpressionBatch`` of the users hashing there, over the topic's own partition count) holding
every answer since its last send: kafka-python's ``send`` per answer was half of
what impressions cost this process (docs/gateway.md), more than building them. Building them is
cheap too: the answer is queued as serialized *before* its recommendation id, so every view of a
kept answer queues the same bytes, and the impression's shared body (user, strategy, arm,
model version, items) is built once per distinct answer (a bounded memo) and concatenated with a
two-field message of the view's own id and time; protobuf merges concatenated messages.
When the broker is slow or down the queue fills and further impressions are dropped and
counted in ``stylerec_gateway_impressions_dropped_total``: the answer is never delayed for
measurement.
Only the pseudonym travels (each record is keyed by one of its users'); the raw shop id never
leaves the edge.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from typing import Any, NamedTuple

from stylerec.v1 import common_pb2, gateway_pb2

from libs.common.kafka import ProtoProducer, kafka_security, partition_of
from services.gateway.config import GatewaySettings
from services.gateway.experiments import Assignment
from services.gateway.memo import ParseMemo
from services.gateway.metrics import IMPRESSIONS, IMPRESSIONS_DROPPED

log = logging.getLogger(__name__)

STRATEGY_NAMES: dict[int, str] = {int(v): gateway_pb2.Strategy.Name(v) for v in gateway_pb2.Strategy.values()}
# A record is closed once its impressions reach this size: at most this plus one impression
# (max_k items), far below the producer's and broker's 1 MiB default.
RECORD_BYTES = 256 * 1024


def new_recommendation_id() -> str:
    """``rec_`` + 32 hex (128 random bits): unguessable, so a caller cannot attribute events to
    answers it was not given, and unrelated to the user (pseudonymity of the impression log)."""
    return "rec_" + os.urandom(16).hex()


class Shown(NamedTuple):
    """What the request thread queues; the impression is built from it off the hot path."""

    user: str
    # The answer serialized before its recommendation id was set: a kept answer gives the same
    # bytes on every view, so its impression body is built once (see :func:`batch_by_partition`).
    answer: bytes
    recommendation_id: str
    shown_at: float


Body = tuple[bytes, tuple[str, str, str]]  # (serialized Impression without id and time, counter key)


def impression_body(user: str, answer: bytes) -> Body:
    """The part of an answer's impression that every view of the same answer shares, serialized."""
    resp = gateway_pb2.GetRecommendationsResponse.FromString(answer)
    imp = common_pb2.Impression(
        user_id=user,
        strategy=STRATEGY_NAMES.get(resp.strategy, str(resp.strategy)),
        experiment=resp.experiment,
        arm=resp.experiment_arm,
        model_version=resp.model_version,
    )
    for pos, it in enumerate(resp.items):
        imp.items.add(item_id=it.item_id, position=pos)
    return imp.SerializeToString(), (imp.experiment, imp.arm, imp.strategy)


def impression_bytes(body: bytes, s: Shown) -> bytes:
    """One view's Impression: protobuf merges concatenated messages, so the shared body plus a
    message holding only this view's id and time is the whole impression."""
    own = common_pb2.Impression(recommendation_id=s.recommendation_id)
    own.shown_at.FromNanoseconds(int(s.shown_at * 1e9))
    return body + own.SerializeToString()


def _varint(n: int) -> bytes:
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


# The key of ImpressionBatch.impressions on the wire: field number, wire type 2 (length-delimited).
_IMPRESSIONS_TAG = _varint(common_pb2.ImpressionBatch.DESCRIPTOR.fields_by_name["impressions"].number << 3 | 2)


def _framed(payload: bytes) -> bytes:
    """``payload`` as one element of ImpressionBatch.impressions: its key, varint length, bytes."""
    return _IMPRESSIONS_TAG + _varint(len(payload)) + payload


class Record(NamedTuple):
    partition: int
    key: str  # the first user's pseudonym: every user in it hashes to this partition
    value: bytes  # a serialized ImpressionBatch
    impressions: int
    counts: dict[tuple[str, str, str], int]  # impressions per (experiment, arm, strategy)


def batch_by_partition(
    shown: list[Shown], partitions: int, body_of: Callable[[str, bytes], Body] = impression_body
) -> list[Record]:
    """The impressions of ``shown`` as one ImpressionBatch record per partition of their users,
    so each record's key, its first user, hashes to the partition of every user in it, as a
    record per answer keyed by its user did. A record that reached ``RECORD_BYTES`` is closed and
    the next one of that partition started: a record is at most that plus one impression.
    ``body_of``: the impression body of (user, answer bytes), memoized by the publisher."""
    out: list[tuple[int, str, list[bytes], dict[tuple[str, str, str], int]]] = []
    current: dict[int, int] = {}  # partition -> index of its open record in out
    size: dict[int, int] = {}
    for s in shown:
        p = partition_of(s.user, partitions)
        if p not in current or size[p] >= RECORD_BYTES:
            current[p] = len(out)
            size[p] = 0
            out.append((p, s.user, [], {}))
        body, counter = body_of(s.user, s.answer)
        framed = _framed(impression_bytes(body, s))
        _, _, parts, counts = out[current[p]]
        parts.append(framed)
        counts[counter] = counts.get(counter, 0) + 1
        size[p] += len(framed)
    return [Record(p, key, b"".join(parts), len(parts), counts) for p, key, parts, counts in out]


class ImpressionPublisher:
    """Stamps answers and publishes their impressions from a bounded queue on one thread."""

    def __init__(
        self,
        settings: GatewaySettings,
        producer_factory: Callable[[], ProtoProducer] | None = None,
    ) -> None:
        self.settings = settings
        self.enabled = settings.impressions_enabled
        self.topic = settings.impressions_topic
        self._queue: queue.Queue[Shown | None] = queue.Queue(maxsize=settings.impressions_queue)
        self._factory = producer_factory or self._default_producer
        self._producer: ProtoProducer | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="impression-publisher", daemon=True)
        self._published: dict[tuple[str, str, str], Any] = {}
        self._linger_s = settings.impressions_linger_ms / 1000
        self._next_send = 0.0  # monotonic: the earliest time of the next send
        # Kept answers are shown many times: their impression body is built once per answer.
        self._bodies: ParseMemo[Body] = ParseMemo("impression", settings.parse_memo_entries)
        self._dropped_full = IMPRESSIONS_DROPPED.labels("queue_full")
        self._dropped_broker = IMPRESSIONS_DROPPED.labels("broker")

    def _default_producer(self) -> ProtoProducer:
        return ProtoProducer(
            self.settings.kafka_servers,
            client_id="gateway-impressions",
            # No producer linger on top of the publisher's own: each send is already the one
            # record of its partition for the interval, so waiting again would only add delay.
            max_block_ms=2000,
            request_timeout_ms=5000,
            security=kafka_security(self.settings),
        )

    def start(self) -> ImpressionPublisher:
        if self.enabled:
            self._thread.start()
        return self

    def stamp(self, resp: gateway_pb2.GetRecommendationsResponse, user: str, assignment: Assignment) -> None:
        """Give the answer its id and arm, and queue its impression (never blocks)."""
        if assignment.arm is not None:
            resp.experiment = assignment.experiment
            resp.experiment_arm = assignment.arm.name
        rid = new_recommendation_id()
        answer = resp.SerializeToString() if self.enabled else b""  # before the id: the same for every view
        resp.recommendation_id = rid
        if not self.enabled:
            return
        try:
            self._queue.put_nowait(Shown(user, answer, rid, time.time()))
        except queue.Full:
            self._dropped_full.inc()

    def pending(self) -> int:
        return self._queue.qsize()

    def _counter(self, key: tuple[str, str, str]) -> Any:
        child = self._published.get(key)
        if child is None:
            child = IMPRESSIONS.labels(*key)
            self._published[key] = child
        return child

    def _drain(self) -> list[Shown] | None:
        """Everything queued, at most once per linger: records go out on a cadence of
        ``impressions_linger_ms`` from the last send, each holding all of its partition's answers
        since then. (Taking a fixed number per linger capped the publisher below the gateway's
        rate at long lingers, and the queue overflowed.) After a quiet spell the first answer
        goes at once. The queue's bound is what bounds a drain."""
        try:
            first = self._queue.get(timeout=0.5)
        except queue.Empty:
            return []
        if first is None:
            return None
        wait = self._next_send - time.monotonic()
        if wait > 0:
            self._stop.wait(wait)
        batch = [first]
        get = self._queue.get_nowait
        while True:
            try:
                nxt = get()
            except queue.Empty:
                break
            if nxt is None:
                self._stop.set()
                break
            batch.append(nxt)
        self._next_send = time.monotonic() + self._linger_s
        return batch

    def _run(self) -> None:
        while not self._stop.is_set():
            batch = self._drain()
            if batch is None:
                break
            if batch:
                self._publish(batch)

    def _publish(self, batch: list[Shown]) -> None:
        try:
            if self._producer is None:
                self._producer = self._factory()
            producer = self._producer
        except Exception as exc:
            self._dropped_broker.inc(len(batch))
            log.warning("impressions dropped: no producer", extra={"error": type(exc).__name__, "n": len(batch)})
            self._stop.wait(1.0)
            return
        left = len(batch)
        try:
            # The topic's own count, not the default layout's: grouped by another count, one
            # shopper's impressions would spread over partitions and lose their order.
            partitions = producer.partition_count(self.topic)
        except Exception as exc:
            self._dropped_broker.inc(left)
            log.warning("impressions dropped: no topic metadata", extra={"error": type(exc).__name__, "n": left})
            return
        for record in batch_by_partition(batch, partitions, self._body):
            n = record.impressions
            try:
                fut = producer.send_raw(self.topic, record.key.encode(), record.value, partition=record.partition)
            except Exception as exc:
                # Metadata wait ran out (broker down): the rest of this batch would wait as long each.
                self._dropped_broker.inc(left)
                log.warning("impressions dropped: broker", extra={"error": type(exc).__name__, "n": left})
                return
            left -= n
            counts = {self._counter(key): c for key, c in record.counts.items()}
            fut.add_callback(lambda _md, c=counts: _count(c))
            fut.add_errback(lambda _e, k=n: self._dropped_broker.inc(k))

    def _body(self, user: str, answer: bytes) -> Body:
        return self._bodies.get((user, answer), lambda: impression_body(user, answer))

    def stop(self) -> None:
        """Publish what is queued (the sentinel goes behind it), then flush; a full queue stops at once."""
        try:
            self._queue.put(None, timeout=1.0)
        except queue.Full:
            self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5)
        if self._producer is not None:
            with contextlib.suppress(Exception):
                self._producer.flush(5)
                self._producer.close(5)


def _count(counts: dict[Any, int]) -> None:
    """Counts a delivered record's impressions per (experiment, arm, strategy) child."""
    for child, n in counts.items():
        child.inc(n)
