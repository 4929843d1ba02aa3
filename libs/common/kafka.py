"""Kafka helpers on kafka-python: protobuf serde, explicit keys, commit-after-processing.

Topics, their partition counts and the dead-letter convention live here so the
stack launcher, the services and the deployment job agree on one list.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from google.protobuf import timestamp_pb2
from google.protobuf.message import DecodeError, Message
from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition
from kafka.admin import NewTopic
from kafka.consumer.fetcher import ConsumerRecord
from kafka.errors import KafkaError, TopicAlreadyExistsError
from kafka.partitioner.default import murmur2
from stylerec.v1 import common_pb2

from libs.common.metrics import CONSUMED, CONSUMER_BATCH, CONSUMER_LAG, DEAD_LETTERS, PRODUCED

if TYPE_CHECKING:
    from libs.common.settings import ServiceSettings

log = logging.getLogger(__name__)

USER_EVENTS = "user-events"
ITEM_UPDATES = "item-updates"
STYLE_JOBS = "style-jobs"
STYLE_RESULTS = "style-results"
MODEL_UPDATES = "model-updates"
# ForgetUser commands (admin.proto ForgetCommand, key = user reference); every scoring replica
# reads the whole topic without a consumer group.
USER_FORGET = "user-forget"
# What GetRecommendations answers showed (common.proto ImpressionBatch: impressions whose users
# share a partition, key = the first one's pseudonym); the ingestion archiver stores them and
# attributes events to them (docs/experiments.md).
IMPRESSIONS = "impressions"


def dead_letter_topic(service: str) -> str:
    return f"dlq-{service}"


SERVICES_WITH_CONSUMERS = ("ingestion", "scoring", "style-worker")

# topic -> partitions. user-events carries the bulk and is keyed by user.
TOPICS: dict[str, int] = {
    USER_EVENTS: 6,
    ITEM_UPDATES: 3,
    STYLE_JOBS: 3,
    STYLE_RESULTS: 3,
    MODEL_UPDATES: 1,
    USER_FORGET: 1,
    IMPRESSIONS: 6,
    **{dead_letter_topic(s): 1 for s in SERVICES_WITH_CONSUMERS},
}


# The shoppers of the last minute or two, not every pseudonym ever asked: a shop's one-visit
# shoppers (8% of the load's reads, a new user each) filled the earlier 65,536 entries at about
# 0.6 MiB a minute through a whole 10-minute soak, and that was most of the gateway's RSS slope.
PARTITION_MEMO = 4096


@functools.lru_cache(maxsize=PARTITION_MEMO)
def partition_of(key: str, partitions: int = TOPICS[USER_EVENTS]) -> int:
    """The partition kafka's default (murmur2) partitioner gives a record with this key.
    Memoized: kafka-python's murmur2 is pure Python (~10 µs), and the gateway asks it for every
    answer's impression, mostly for the same shoppers again (2.5% of its GIL time)."""
    return (murmur2(key.encode()) & 0x7FFFFFFF) % partitions


# What one fetch of a ProtoConsumerLoop brings back at most: a few seconds of the busiest stream
# (about 6,600 events), so a consumer catching up still takes several polls per round trip.
FETCH_MAX_BYTES = 1024 * 1024

M = TypeVar("M", bound=Message)
# (record, reason) -> (key, value, reason) actually written to the dead-letter topic.
Redactor = Callable[[ConsumerRecord, str], tuple[bytes, bytes, str]]


def kafka_security(settings: ServiceSettings) -> dict[str, Any]:
    """The kafka-python security keyword arguments for every producer, consumer and admin client.

    One function so no client can be built without the cluster's credentials: PLAINTEXT adds
    nothing; SSL/SASL_SSL verify the brokers against ``kafka_ssl_cafile`` (or the system CAs)
    with host-name checks; SASL_* add the mechanism and the user/password from the Secret.
    """
    protocol = settings.kafka_security_protocol
    if protocol == "PLAINTEXT":
        return {}
    config: dict[str, Any] = {"security_protocol": protocol}
    if "SSL" in protocol:
        config["ssl_check_hostname"] = True
        if settings.kafka_ssl_cafile:
            config["ssl_cafile"] = settings.kafka_ssl_cafile
    if protocol.startswith("SASL_"):
        config["sasl_mechanism"] = settings.kafka_sasl_mechanism
        config["sasl_plain_username"] = settings.kafka_sasl_username
        config["sasl_plain_password"] = settings.kafka_sasl_password.get_secret_value()
    return config


def ensure_topics(
    bootstrap: Sequence[str],
    topics: dict[str, int] | None = None,
    timeout_s: float = 20,
    security: Mapping[str, Any] | None = None,
) -> None:
    """Create missing topics (idempotent); raises if the broker stays unreachable."""
    wanted = topics or TOPICS
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            admin = KafkaAdminClient(bootstrap_servers=list(bootstrap), request_timeout_ms=5000, **(security or {}))
            break
        except KafkaError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.3)
    try:
        existing = set(admin.list_topics())
        new = [NewTopic(name, n, 1) for name, n in wanted.items() if name not in existing]
        if new:
            with contextlib.suppress(TopicAlreadyExistsError):
                admin.create_topics(new)
    finally:
        admin.close()


def now_timestamp() -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.GetCurrentTime()
    return ts


class ProtoProducer:
    """A KafkaProducer that sends protobuf messages with explicit keys.

    ``acks='all'`` is the default because every producer in StyleRec sends data
    someone was told is safe. kafka-python's idempotent mode is off: in 3.0 a
    producer whose batch expired once (broker stall) never recovers, every later
    send times out. Ordering per partition is kept by one in-flight request per
    connection, and duplicates from a retry are harmless because every consumer
    is idempotent (upserts by id, Redis SET NX, result keys per job).
    """

    def __init__(
        self,
        bootstrap: Sequence[str],
        *,
        client_id: str,
        linger_ms: int = 5,
        max_block_ms: int = 5000,
        request_timeout_ms: int = 10000,
        max_request_size: int = 8 * 1024 * 1024,
        security: Mapping[str, Any] | None = None,
    ) -> None:
        """``security`` is :func:`kafka_security` of the service's settings (empty = PLAINTEXT)."""
        self._producer = KafkaProducer(
            bootstrap_servers=list(bootstrap),
            client_id=client_id,
            acks="all",
            retries=3,
            linger_ms=linger_ms,
            max_block_ms=max_block_ms,
            request_timeout_ms=request_timeout_ms,
            max_in_flight_requests_per_connection=1,
            max_request_size=max_request_size,
            enable_idempotence=False,
            **(security or {}),
        )

    def send(self, topic: str, key: str, message: Message):  # type: ignore[no-untyped-def]
        """Queue one message; returns kafka-python's future (``.get()`` confirms delivery)."""
        return self.send_raw(topic, key.encode(), message.SerializeToString())

    def send_raw(self, topic: str, key: bytes, value: bytes, partition: int | None = None):  # type: ignore[no-untyped-def]
        """``partition``: where the record goes, for a caller that grouped records by partition
        itself; None lets the key's hash choose (kafka's default partitioner)."""
        fut = self._producer.send(topic, key=key, value=value, partition=partition)
        fut.add_callback(lambda _md: PRODUCED.labels(topic, "ok").inc())
        fut.add_errback(lambda _e: PRODUCED.labels(topic, "error").inc())
        return fut

    def send_and_wait(self, topic: str, key: str, message: Message, timeout_s: float = 10) -> None:
        self.send(topic, key, message).get(timeout=timeout_s)

    def dead_letter(self, service: str, record: ConsumerRecord, reason: str, redact: Redactor | None = None) -> None:
        """Park an unusable record with the reason; waits for the broker's ack.

        ``redact`` rewrites what is copied (key, value, reason), for topics whose records
        may hold personal data that must not be repeated on the dead-letter topic.
        """
        key, value = record.key or b"", record.value or b""
        label = reason.split(":", 1)[0]
        if redact is not None:
            key, value, reason = redact(record, reason)
        dl = common_pb2.DeadLetter(
            source_topic=record.topic,
            partition=record.partition,
            offset=record.offset,
            key=key,
            value=value,
            reason=reason,
            service=service,
            failed_at=now_timestamp(),
        )
        topic = dead_letter_topic(service)
        self.send_raw(topic, key, dl.SerializeToString()).get(timeout=10)
        DEAD_LETTERS.labels(topic, label).inc()

    def partition_count(self, topic: str) -> int:
        """The topic's partitions as the broker reports them (cached metadata, refreshed by the
        client; waits up to ``max_block_ms`` the first time)."""
        return len(self._producer.partitions_for(topic))

    def bootstrap_connected(self) -> bool:
        return bool(self._producer.bootstrap_connected())

    def flush(self, timeout_s: float | None = None) -> None:
        self._producer.flush(timeout=timeout_s)

    def close(self, timeout_s: float = 5) -> None:
        self._producer.close(timeout=timeout_s)


@dataclass
class Decoded(Generic[M]):
    record: ConsumerRecord
    message: M


class ProtoConsumerLoop(Generic[M]):
    """Poll → decode → handle a batch → commit, in a background thread.

    Offsets are committed only after ``handle`` returns, so a crash replays the
    batch instead of losing it (handlers must be idempotent). Records that do
    not decode go to the service's dead-letter topic with the reason and are
    then committed like any other. If ``handle`` raises, nothing is committed
    and the consumer seeks back so the batch is retried.
    """

    def __init__(
        self,
        *,
        bootstrap: Sequence[str],
        group_id: str,
        topics: Sequence[str],
        message_type: type[M],
        handle: Callable[[list[Decoded[M]]], None],
        producer: ProtoProducer,
        service: str,
        max_poll_records: int = 500,
        poll_timeout_ms: int = 200,
        max_poll_interval_ms: int = 30000,
        session_timeout_ms: int = 10000,
        validate: Callable[[M], str | None] | None = None,
        auto_offset_reset: str = "earliest",
        fetch_max_wait_ms: int | None = None,
        fetch_max_bytes: int = FETCH_MAX_BYTES,
        poll_tick_s: float = 0.0,
        security: Mapping[str, Any] | None = None,
        redact: Redactor | None = None,
        dead_letter: bool = True,
    ) -> None:
        """``dead_letter=False``: unusable records are skipped (counted ``skipped``), for a second
        group on a topic whose owner already dead-letters them, so none is parked twice.

        ``fetch_max_bytes``: the most one fetch brings back. The embedded broker honours this limit
        and not the per-partition one, so with kafka-python's 50 MiB a consumer that had fallen
        behind fetched its whole backlog at once (30,000 events in one answer, measured) and held
        the bytes until it had worked them off, so its memory grew with its lag. A first record
        larger than the limit still comes back whole (measured on tansu too).

        ``poll_tick_s`` > 0 makes the loop take its records in ticks: a poll starts at most that
        often, so under a steady stream a cycle carries everything that arrived since the last one
        instead of whatever trickled in. That matters on the embedded broker, whose cost per fetch
        grows with the number of record batches in each partition it reads (docs/load.md, "The
        broker's fetch cost"). The tick is kept here, not by the broker (``fetch_min_bytes``):
        a fetch parked at the broker until its wait is over starts only after the handler is done
        (kafka-python does not overlap the two here), so a cycle whose handling already took a tick
        waited another one; measured, a 95 ms handler polled for 110 ms with a 1 MiB minimum and
        32 ms without. Here a cycle that took longer than the tick polls at once, and so does a
        cycle whose poll came back full (``max_poll_records``): that consumer is behind, and a tick
        would cap it at ``max_poll_records`` a tick (the archiver, 1,000 records and a 1 s tick, fell
        400,000 events behind a 2,400 events/s soak while its handler was busy a third of the time)."""
        self.group_id = group_id
        self._dead_letter = dead_letter
        self._redact = redact
        self.topics = list(topics)
        self._type = message_type
        self._handle = handle
        self._validate = validate
        self._producer = producer
        self._service = service
        self._poll_timeout_ms = poll_timeout_ms
        # fetch_max_wait_ms (None = kafka-python's 500 ms): a broker that does not wake a parked
        # fetch when data arrives (the embedded tansu) adds up to this much latency per hop.
        self._poll_tick_s = poll_tick_s
        self._polled_at = 0.0
        self._max_poll_records = max_poll_records
        extra: dict[str, int] = {"fetch_max_bytes": fetch_max_bytes}
        if fetch_max_wait_ms is not None:
            extra["fetch_max_wait_ms"] = fetch_max_wait_ms
        self._consumer = KafkaConsumer(
            bootstrap_servers=list(bootstrap),
            group_id=group_id,
            enable_auto_commit=False,
            auto_offset_reset=auto_offset_reset,
            max_poll_records=max_poll_records,
            max_poll_interval_ms=max_poll_interval_ms,
            session_timeout_ms=session_timeout_ms,
            heartbeat_interval_ms=max(500, session_timeout_ms // 4),
            client_id=f"{service}-{group_id}",
            **extra,
            **(security or {}),
        )
        self._consumer.subscribe(self.topics)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"consumer-{group_id}", daemon=True)
        self._lock = threading.Lock()
        self.last_error: str | None = None
        self.batches = 0
        self._lag_every_s = 5.0
        self._lag_at = 0.0
        self._lag_series: set[tuple[str, str]] = set()
        # Snapshot of the assignment taken by the consumer thread after each poll, so readers
        # (health, ModelInfo, ownership) never wait on the lock while poll() sits in a rebalance.
        self._assigned: frozenset[TopicPartition] = frozenset()

    def start(self) -> ProtoConsumerLoop[M]:
        self._thread.start()
        return self

    def assignment(self) -> set[TopicPartition]:
        """Partitions owned as of the last poll; never blocks (a rebalance can hold poll() for seconds)."""
        return set(self._assigned)

    def _decode(self, record: ConsumerRecord) -> M | str:
        if record.value is None:
            return "empty: record has no value"
        msg = self._type()
        try:
            msg.ParseFromString(record.value)
        except (DecodeError, ValueError, RuntimeError) as exc:
            return f"undecodable: {type(exc).__name__}: {exc}"
        if self._validate is not None:
            problem = self._validate(msg)
            if problem:
                return f"invalid: {problem}"
        return msg

    def _run(self) -> None:
        while not self._stop.is_set():
            if self._poll_tick_s > 0:
                due = self._polled_at + self._poll_tick_s - time.monotonic()
                if due > 0 and self._stop.wait(due):
                    break
                self._polled_at = time.monotonic()
            try:
                started = time.perf_counter()
                with self._lock:
                    polled = self._consumer.poll(timeout_ms=self._poll_timeout_ms)
                    self._assigned = frozenset(self._consumer.assignment())
                if not polled:
                    self._export_lag()
                    continue
                CONSUMER_BATCH.labels(self.group_id, "poll").observe(time.perf_counter() - started)
                self._process(polled)
                if sum(len(records) for records in polled.values()) >= self._max_poll_records:
                    self._polled_at = 0.0  # a full poll: more is waiting, take it without a tick
            except Exception as exc:
                self.last_error = f"{type(exc).__name__}: {exc}"
                log.exception("consumer loop error", extra={"group": self.group_id})
                # A handler that keeps failing (store down, poison batch) is when the lag
                # matters most; without this the gauge froze at its last value and the lag
                # alert (which needs it to grow) stayed quiet while the backlog piled up.
                with contextlib.suppress(Exception):
                    self._export_lag()
                time.sleep(0.5)

    def _process(self, polled: dict[TopicPartition, list[ConsumerRecord]]) -> None:
        started = time.perf_counter()
        good: list[Decoded[M]] = []
        for tp, records in polled.items():
            for record in records:
                decoded = self._decode(record)
                if isinstance(decoded, str) and not self._dead_letter:
                    CONSUMED.labels(self.group_id, tp.topic, "skipped").inc()
                elif isinstance(decoded, str):
                    self._producer.dead_letter(self._service, record, decoded, self._redact)
                    CONSUMED.labels(self.group_id, tp.topic, "dead_letter").inc()
                else:
                    good.append(Decoded(record, decoded))
        try:
            if good:
                self._handle(good)
        except Exception:
            # Rewind so the batch is redelivered; nothing was committed.
            with self._lock:
                for tp, records in polled.items():
                    self._consumer.seek(tp, records[0].offset)
            for tp, records in polled.items():
                CONSUMED.labels(self.group_id, tp.topic, "error").inc(len(records))
            raise
        handled = time.perf_counter()
        CONSUMER_BATCH.labels(self.group_id, "handle").observe(handled - started)
        with self._lock:
            self._consumer.commit()
        CONSUMER_BATCH.labels(self.group_id, "commit").observe(time.perf_counter() - handled)
        self.batches += 1
        for d in good:
            CONSUMED.labels(self.group_id, d.record.topic, "ok").inc()
        self._export_lag()

    def _export_lag(self) -> None:
        # end_offsets is a broker round trip: export at most every few seconds.
        now = time.monotonic()
        if now - self._lag_at < self._lag_every_s:
            return
        self._lag_at = now
        with self._lock:
            assigned = list(self._consumer.assignment())
            # Partitions moved to another replica by a rebalance: drop their series, or this
            # replica would report their last lag forever and the per-topic sum would count
            # them twice (the lag alert and dashboard sum over replicas).
            current = {(tp.topic, str(tp.partition)) for tp in assigned}
            for topic, partition in self._lag_series - current:
                with contextlib.suppress(KeyError):
                    CONSUMER_LAG.remove(self.group_id, topic, partition)
            self._lag_series = current
            if not assigned:
                return
            try:
                ends = self._consumer.end_offsets(assigned)
            except KafkaError:
                return
            for tp in assigned:
                try:
                    pos = self._consumer.position(tp, timeout_ms=500)
                except (KafkaError, TypeError):
                    continue
                if pos is None:
                    continue
                CONSUMER_LAG.labels(self.group_id, tp.topic, str(tp.partition)).set(max(0, ends[tp] - pos))

    def stop(self, timeout_s: float = 10) -> None:
        """Stop polling, let the current batch finish and commit, then leave the group."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout_s)
        with self._lock:
            try:
                self._consumer.close(autocommit=False)
            except KafkaError:
                log.warning("consumer close failed", extra={"group": self.group_id})
