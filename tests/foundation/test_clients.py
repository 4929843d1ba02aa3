"""Integration tests of the libs/common client helpers against real processes."""

from __future__ import annotations

import threading
import time

import gridfs
import pytest
from kafka import KafkaConsumer
from prometheus_client import REGISTRY
from pymongo import UpdateOne
from pymongo.errors import ServerSelectionTimeoutError
from stylerec.v1 import common_pb2

from cli.localstack.stack import Stack, free_port
from libs.common.kafka import Decoded, ProtoConsumerLoop, ProtoProducer, dead_letter_topic, ensure_topics
from libs.common.stores import make_mongo, make_redis, with_retries


def _event(user: str, item: str) -> common_pb2.Event:
    e = common_pb2.Event(event_id=f"{user}-{item}", user_id=user, item_id=item, type=common_pb2.VIEW)
    e.timestamp.GetCurrentTime()
    return e


def _wait(predicate, timeout_s: float = 30) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.2)
    return False


def _event_loop(infra: Stack, group: str, topic: str, handle, producer: ProtoProducer, service: str):  # type: ignore[no-untyped-def]
    """A started consumer loop of Events with short group timeouts (fast rebalances on tansu)."""
    return ProtoConsumerLoop(
        bootstrap=[infra.kafka_bootstrap],
        group_id=group,
        topics=[topic],
        message_type=common_pb2.Event,
        handle=handle,
        producer=producer,
        service=service,
        session_timeout_ms=6000,
        max_poll_interval_ms=10000,
    ).start()


def test_producer_consumer_roundtrip_with_dead_letter(infra: Stack, unique: str) -> None:
    topic = f"t-{unique}"
    ensure_topics([infra.kafka_bootstrap], {topic: 3, dead_letter_topic(f"svc{unique}"): 1})
    producer = ProtoProducer([infra.kafka_bootstrap], client_id="test")
    got: list[Decoded[common_pb2.Event]] = []
    lock = threading.Lock()

    def handle(batch: list[Decoded[common_pb2.Event]]) -> None:
        with lock:
            got.extend(batch)

    loop = _event_loop(infra, f"g-{unique}", topic, handle, producer, f"svc{unique}")
    try:
        for i in range(10):
            producer.send_and_wait(topic, f"user{i}", _event(f"user{i}", "i1"))
        producer.send_raw(topic, b"bad", b"\xff\xff\xff not protobuf").get(timeout=10)
        assert _wait(lambda: len(got) == 10), f"consumed {len(got)} of 10"
        assert {d.record.key for d in got} == {f"user{i}".encode() for i in range(10)}
        assert all(d.message.item_id == "i1" for d in got)
    finally:
        loop.stop()
    # Each step of the cycles that carried records is timed (the dashboard's busy-time panel).
    for phase in ("poll", "handle", "commit"):
        labels = {"group": f"g-{unique}", "phase": phase}
        count = REGISTRY.get_sample_value("stylerec_kafka_consumer_batch_seconds_count", labels)
        assert count is not None and count >= 1, f"no {phase} timing"
        assert (REGISTRY.get_sample_value("stylerec_kafka_consumer_batch_seconds_sum", labels) or 0) > 0
    # The undecodable record is parked with its reason, not lost and not retried forever.
    dlq = KafkaConsumer(
        dead_letter_topic(f"svc{unique}"),
        bootstrap_servers=[infra.kafka_bootstrap],
        auto_offset_reset="earliest",
        consumer_timeout_ms=8000,
    )
    letters = [common_pb2.DeadLetter.FromString(r.value) for r in dlq]
    dlq.close()
    assert len(letters) == 1
    assert letters[0].reason.startswith("undecodable") and letters[0].value.startswith(b"\xff\xff")
    assert letters[0].source_topic == topic

    # Offsets were committed after handling: a new consumer in the same group sees nothing new.
    again: list[Decoded[common_pb2.Event]] = []
    loop2 = _event_loop(infra, f"g-{unique}", topic, again.extend, producer, f"svc{unique}")
    try:
        assert _wait(lambda: bool(loop2.assignment()))
        producer.send_and_wait(topic, "late", _event("late", "i2"))
        assert _wait(lambda: len(again) >= 1)
        time.sleep(1)
        assert [d.message.user_id for d in again] == ["late"]
    finally:
        loop2.stop()
        producer.close()


def test_failed_handler_is_retried_not_committed(infra: Stack, unique: str) -> None:
    topic = f"r-{unique}"
    ensure_topics([infra.kafka_bootstrap], {topic: 1})
    producer = ProtoProducer([infra.kafka_bootstrap], client_id="test")
    calls: list[int] = []
    delivered: list[str] = []

    def flaky(batch: list[Decoded[common_pb2.Event]]) -> None:
        calls.append(len(batch))
        if len(calls) == 1:
            raise RuntimeError("transient failure")
        delivered.extend(d.message.user_id for d in batch)

    loop = _event_loop(infra, f"g-{unique}", topic, flaky, producer, "test")
    try:
        producer.send_and_wait(topic, "u", _event("u", "i"))
        assert _wait(lambda: delivered == ["u"])
        assert len(calls) >= 2
    finally:
        loop.stop()
        producer.close()


def test_redis_client(infra: Stack, unique: str) -> None:
    r = make_redis(infra.redis_url, timeout_s=1, retries=2)
    assert r.ping()
    r.set(f"k-{unique}", "v", ex=60)
    assert r.get(f"k-{unique}") == b"v"
    assert 0 < r.ttl(f"k-{unique}") <= 60


def test_redis_client_times_out_fast_on_dead_port() -> None:
    import redis

    r = make_redis(f"redis://127.0.0.1:{free_port()}/0", timeout_s=0.5, retries=1)
    t0 = time.monotonic()
    with pytest.raises(redis.ConnectionError):
        r.ping()
    assert time.monotonic() - t0 < 10


def test_mongo_client_bulk_upsert_and_gridfs(infra: Stack, unique: str) -> None:
    client = make_mongo(infra.mongo_uri, timeout_s=2)
    db = client["stylerec"]
    coll = db[f"c_{unique}"]
    ops = [UpdateOne({"_id": f"e{i}"}, {"$setOnInsert": {"n": i}}, upsert=True) for i in range(5)]
    with_retries(lambda: coll.bulk_write(ops, ordered=False))
    with_retries(lambda: coll.bulk_write(ops, ordered=False))  # idempotent
    assert coll.count_documents({}) == 5
    fs = gridfs.GridFS(db)
    fid = fs.put(b"x" * 300_000, filename=f"f-{unique}")
    assert len(fs.get(fid).read()) == 300_000
    client.close()


def test_mongo_client_gives_up_after_bounded_retries() -> None:
    client = make_mongo(f"mongodb://127.0.0.1:{free_port()}", timeout_s=0.3)
    attempts: list[int] = []

    def op() -> object:
        attempts.append(1)
        return client.admin.command("ping")

    with pytest.raises(ServerSelectionTimeoutError):
        with_retries(op, attempts=2, base_delay_s=0.01)
    assert len(attempts) == 3


def test_a_consumer_behind_its_topic_fetches_a_bounded_answer_not_its_whole_backlog(infra: Stack, unique: str) -> None:
    """30,000 events waiting (about 4 MB): the first batch handed over is one fetch of at most
    FETCH_MAX_BYTES, not the whole backlog (the broker's default answer, which a lagging consumer
    then held until it had worked it off), and the rest still all arrive."""
    from libs.common.kafka import FETCH_MAX_BYTES

    topic = f"backlog-{unique}"
    ensure_topics([infra.kafka_bootstrap], {topic: 1})
    producer = ProtoProducer([infra.kafka_bootstrap], client_id="test", linger_ms=20)
    futures = [producer.send(topic, "u", _event(f"u{n % 50}", f"item-{n:06d}-{'x' * 40}")) for n in range(30_000)]
    for f in futures[-10:]:
        f.get(timeout=30)
    sizes: list[tuple[int, int]] = []
    lock = threading.Lock()

    def handle(batch: list[Decoded[common_pb2.Event]]) -> None:
        with lock:
            sizes.append((len(batch), sum(len(d.record.value) for d in batch)))

    loop = ProtoConsumerLoop(
        bootstrap=[infra.kafka_bootstrap],
        group_id=f"g-backlog-{unique}",
        topics=[topic],
        message_type=common_pb2.Event,
        handle=handle,
        producer=producer,
        service=f"svc{unique}",
        max_poll_records=100_000,
        session_timeout_ms=6000,
        max_poll_interval_ms=10000,
    ).start()
    try:
        assert _wait(lambda: sum(n for n, _ in sizes) >= 30_000, timeout_s=60), sizes
    finally:
        loop.stop()
    first_records, first_bytes = sizes[0]
    assert first_records < 30_000 and first_bytes <= FETCH_MAX_BYTES, sizes[:3]
    assert sum(n for n, _ in sizes) == 30_000
