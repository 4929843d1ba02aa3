"""Scoring replicas as real processes on the session infra, isolated per test module.

Each module gets its own consumer group, its own MongoDB collections (the embedded
Mongo-protocol server does not isolate databases, so collections are renamed instead)
and its own Redis logical database, so other areas' tests cannot change what these see.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import grpc
import pytest
import redis
from pymongo import MongoClient
from pymongo.database import Database
from stylerec.v1 import common_pb2, scoring_pb2, scoring_pb2_grpc

from cli.localstack.stack import Component, Stack
from libs.common.kafka import USER_EVENTS, ProtoProducer

SCORING_REDIS_DB = 5
WEIGHTS = {1: 1.0, 2: 2.0, 3: 4.0, 4: 6.0, 5: 10.0}


@dataclass
class ScoringEnv:
    infra: Stack
    tag: str
    db: Database
    redis: redis.Redis
    producer: ProtoProducer
    started: list[str] = field(default_factory=list)

    @property
    def env(self) -> dict[str, str]:
        return {
            "STYLEREC_CONSUMER_GROUP": f"scoring-{self.tag}",
            "STYLEREC_EVENTS_COLLECTION": f"events_{self.tag}",
            "STYLEREC_MODELS_COLLECTION": f"models_{self.tag}",
            "STYLEREC_ITEMS_COLLECTION": f"items_{self.tag}",
            "STYLEREC_REDIS_URL": f"redis://127.0.0.1:{self.infra.components['redis'].port}/{SCORING_REDIS_DB}",
            "STYLEREC_KAFKA_SESSION_TIMEOUT_MS": "6000",
            "STYLEREC_KAFKA_MAX_POLL_INTERVAL_MS": "10000",
            "STYLEREC_ARCHIVE_SYNC_S": "1",
            "STYLEREC_MODEL_POLL_S": "2",
            "STYLEREC_POPULAR_EVERY_S": "0",
            "STYLEREC_LOG_LEVEL": "INFO",
        }

    def start(self, name: str, **extra: str) -> Component:
        comp = self.infra.start_service("scoring", instance=name, extra_env={**self.env, **extra})
        self.started.append(name)
        self.infra.wait_serving([name], timeout_s=90)
        return comp

    def stop(self, name: str) -> None:
        self.infra.stop_component(name)

    def stub(self, name: str) -> scoring_pb2_grpc.ScoringServiceStub:
        return scoring_pb2_grpc.ScoringServiceStub(grpc.insecure_channel(self.infra.addr_of(name)))

    def archive(self, rows: list[tuple[str, str, str, int, float]]) -> None:
        """Write events the way the ingestion archiver does (docs/contracts.md `events`)."""
        self.db[f"events_{self.tag}"].insert_many(
            [
                {"_id": e, "user_id": u, "item_id": i, "type": t, "ts": ts, "value": 0.0, "archived_at": time.time()}
                for e, u, i, t, ts in rows
            ]
        )

    def send(self, user: str, item: str, etype: int = 5, event_id: str | None = None) -> str:
        ev = common_pb2.Event(
            event_id=event_id or uuid.uuid4().hex,
            user_id=user,
            item_id=item,
            type=etype,  # type: ignore[arg-type]
        )
        ev.timestamp.FromSeconds(int(time.time()))
        self.producer.send_and_wait(USER_EVENTS, user, ev)
        return ev.event_id


def wait_for(check: Callable[[], object], timeout_s: float = 20, every_s: float = 0.2, what: str = "") -> object:
    deadline = time.monotonic() + timeout_s
    last: object = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(every_s)
    raise AssertionError(f"timed out waiting for {what or check}: last={last!r}")


def cluster_events(tag: str, users: int = 12, t0: float | None = None) -> list[tuple[str, str, str, int, float]]:
    """Two taste clusters: users 'a…' buy items A0-A3, users 'b…' buy items B0-B3."""
    t0 = t0 or time.time() - 3600
    rows = []
    n = 0
    for u in range(users):
        for cluster in ("a", "b"):
            for i in range(4):
                if (u + i) % 4 == 3:
                    continue
                rows.append((f"{tag}-e{n}", f"u_{tag}_{cluster}{u}", f"{tag}-{cluster.upper()}{i}", 5, t0 + n))
                n += 1
    return rows


@pytest.fixture(scope="module")
def scoring_env(infra: Stack) -> Iterator[ScoringEnv]:
    tag = uuid.uuid4().hex[:8]
    mongo: MongoClient = MongoClient(infra.mongo_uri)
    r = redis.Redis(port=infra.components["redis"].port, db=SCORING_REDIS_DB)
    producer = ProtoProducer([infra.kafka_bootstrap], client_id=f"scoring-test-{tag}")
    env = ScoringEnv(infra, tag, mongo["stylerec"], r, producer)
    try:
        yield env
    finally:
        for name in env.started:
            infra.stop_component(name)
            infra.components.pop(name, None)
        producer.close()
        mongo.close()


def topn(stub: scoring_pb2_grpc.ScoringServiceStub, user: str, k: int = 5) -> scoring_pb2.TopNResponse:
    return stub.TopN(scoring_pb2.TopNRequest(user_id=user, k=k, exclude_seen=True), timeout=10)


@pytest.fixture
def session_redis(infra: Stack) -> Iterator[redis.Redis]:
    """A client of the session's Redis (db 0) for tests of Redis-facing scoring parts in process."""
    client = redis.Redis.from_url(infra.redis_url)
    yield client
    client.close()
