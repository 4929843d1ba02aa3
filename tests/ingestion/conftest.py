"""Fixtures for the ingestion tests: one dedicated ingestion process on the session infra.

It publishes to its own topic and archives into its own collection with its own
consumer group, so these tests neither see nor disturb other areas' events
(and the scoring consumer never sees the junk the dead-letter tests produce).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from kafka import KafkaConsumer, TopicPartition
from kafka.consumer.fetcher import ConsumerRecord
from pymongo import MongoClient
from pymongo.database import Database
from stylerec.v1 import common_pb2, ingestion_pb2_grpc

from cli.localstack.stack import Stack
from libs.common.kafka import ensure_topics

LIMITS_ENV = {
    "STYLEREC_MAX_BATCH_EVENTS": "500",
    "STYLEREC_MAX_REQUEST_BYTES": str(256 * 1024),
    "STYLEREC_MAX_BATCH_ITEMS": "20",
    "STYLEREC_MAX_IMAGE_BYTES": str(120 * 1024),
    "STYLEREC_MAX_IMAGE_PIXELS": str(4_000_000),
    "STYLEREC_IMAGE_FETCH_TIMEOUT_S": "1.5",
    "STYLEREC_IMAGE_FETCH_ALLOW_PRIVATE": "true",
    "STYLEREC_KAFKA_SESSION_TIMEOUT_MS": "6000",
    "STYLEREC_HEALTH_INTERVAL_S": "0.5",
    "STYLEREC_PSEUDONYM_SECRET": "test-secret-ingestion",
}


@dataclass
class Ingestion:
    stack: Stack
    name: str
    topic: str
    collection: str
    group: str

    @property
    def addr(self) -> str:
        return self.stack.addr_of(self.name)

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.stack.components[self.name].metrics_port}/metrics"

    def channel(self) -> grpc.Channel:
        return grpc.insecure_channel(self.addr)

    def stub(self, channel: grpc.Channel) -> ingestion_pb2_grpc.IngestionServiceStub:
        return ingestion_pb2_grpc.IngestionServiceStub(channel)


def start_ingestion(stack: Stack, name: str, env: dict[str, str], wait: bool = True) -> None:
    stack.start_service("ingestion", instance=name, extra_env={**LIMITS_ENV, **env})
    if wait:
        stack.wait_serving([name], timeout_s=60)


@pytest.fixture(scope="session")
def ing(infra: Stack) -> Iterator[Ingestion]:
    token = uuid.uuid4().hex[:8]
    handle = Ingestion(
        stack=infra,
        name=f"ingestion-t-{token}",
        topic=f"ing-test-{token}",
        collection=f"events_t_{token}",
        group=f"archiver-t-{token}",
    )
    ensure_topics([infra.kafka_bootstrap], {handle.topic: 3, f"{handle.topic}-impressions": 1})
    start_ingestion(
        infra,
        handle.name,
        {
            "STYLEREC_EVENTS_TOPIC": handle.topic,
            "STYLEREC_EVENTS_COLLECTION": handle.collection,
            "STYLEREC_ARCHIVER_GROUP": handle.group,
            # Attribution on its own groups and collections (tests/ingestion/test_attribution.py has its own).
            "STYLEREC_IMPRESSIONS_TOPIC": f"{handle.topic}-impressions",
            "STYLEREC_IMPRESSIONS_GROUP": f"{handle.group}-impressions",
            "STYLEREC_ATTRIBUTION_GROUP": f"{handle.group}-attribution",
            "STYLEREC_IMPRESSIONS_COLLECTION": f"{handle.collection}_impressions",
            "STYLEREC_ATTRIBUTIONS_COLLECTION": f"{handle.collection}_attributions",
            "STYLEREC_ATTRIBUTION_PENDING_COLLECTION": f"{handle.collection}_pending",
        },
    )
    yield handle
    infra.stop_component(handle.name)


@pytest.fixture(scope="session")
def mongo_db(infra: Stack) -> Iterator[Database[Any]]:
    client: MongoClient[Any] = MongoClient(infra.mongo_uri, serverSelectionTimeoutMS=5000)
    yield client["stylerec"]
    client.close()


# ---------- helpers ----------
def make_event(
    user: str,
    item: str,
    etype: int = common_pb2.VIEW,
    event_id: str = "",
    ts: float | None = None,
    value: float = 0.0,
) -> common_pb2.Event:
    e = common_pb2.Event(user_id=user, item_id=item, type=etype, event_id=event_id, value=value)  # type: ignore[arg-type]
    e.timestamp.FromNanoseconds(int((time.time() if ts is None else ts) * 1e9))
    return e


def with_overrides(e: common_pb2.Event, **kw: Any) -> common_pb2.Event:
    """Set fields of a good event for bad-input cases: ``ts`` (unix s), ``no_ts``, context fields, or any field."""
    for k, v in kw.items():
        if k == "ts":
            e.timestamp.FromNanoseconds(int(v * 1e9))
        elif k == "no_ts":
            e.ClearField("timestamp")
        elif k in ("session_id", "device", "page"):
            setattr(e.context, k, v)
        else:
            setattr(e, k, v)
    return e


def read_records(bootstrap: str, topic: str, idle_s: float = 1.5) -> list[ConsumerRecord]:
    """Every record of ``topic`` from the beginning, until nothing new arrives for ``idle_s``.

    Not end_offsets(): the embedded broker reports the high watermark of a
    partition as the base offset of its last batch + 1, so "read up to the end"
    would silently stop early. The test topics are small and dedicated.
    """
    consumer = KafkaConsumer(bootstrap_servers=[bootstrap], enable_auto_commit=False)
    try:
        parts = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or [])]
        consumer.assign(parts)
        consumer.seek_to_beginning(*parts)
        out: list[ConsumerRecord] = []
        quiet_since = time.monotonic()
        while time.monotonic() - quiet_since < idle_s:
            polled = consumer.poll(timeout_ms=300)
            for records in polled.values():
                out.extend(records)
            if polled:
                quiet_since = time.monotonic()
        return out
    finally:
        consumer.close()


def wait_until(cond: Callable[[], bool], timeout_s: float = 30, interval_s: float = 0.2) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(interval_s)
    return cond()
