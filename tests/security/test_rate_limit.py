"""Per-caller event rate limit on ingestion: the token bucket alone, then a real ingestion process
with authentication, so each bucket belongs to an authenticated caller name."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from stylerec.v1 import common_pb2, ingestion_pb2, ingestion_pb2_grpc

from cli.localstack.stack import Stack
from libs.common.authz import token_digest
from libs.common.errors import violations_of
from libs.common.kafka import ensure_topics
from services.ingestion.rate_limit import CallerRateLimiter
from tests.ingestion.conftest import LIMITS_ENV, make_event, read_records
from tests.security.conftest import metric

# ---------------------------------------------------------------- the bucket (unit)


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_bucket_burst_refill_and_retry_after() -> None:
    clock = FakeClock()
    lim = CallerRateLimiter(rate_eps=10, burst=30, clock=clock)
    assert lim.acquire("a", 20).allowed
    assert lim.acquire("a", 10).allowed
    refused = lim.acquire("a", 5)
    assert not refused.allowed and refused.retry_after_s == pytest.approx(0.5)
    clock.now += 0.49
    assert not lim.acquire("a", 5).allowed  # a refusal takes nothing: still 4.9 tokens
    clock.now += 0.01
    assert lim.acquire("a", 5).allowed
    # Another caller has its own bucket; idle time refills up to the burst, never beyond.
    assert lim.acquire("b", 30).allowed
    clock.now += 100
    assert lim.acquire("a", 30).allowed
    assert not lim.acquire("a", 1).allowed


def test_bucket_off_and_too_large_calls() -> None:
    off = CallerRateLimiter(0, 1)
    assert not off.enabled and off.fits(10**9) and off.acquire("a", 10**9).allowed
    lim = CallerRateLimiter(1, 10)
    assert lim.fits(10) and not lim.fits(11)
    with pytest.raises(ValueError):
        lim.acquire("a", 11)
    with pytest.raises(ValueError):
        CallerRateLimiter(5, 0)


# ---------------------------------------------------------------- a real ingestion process

RATE_EPS = 2  # slow refill: the refusals below hold even if the box stalls the test for seconds
BURST = 20
CHUNK = 10
TOKENS = {"shop-a": "rl-token-a-3c9e", "shop-b": "rl-token-b-71d2", "shop-c": "rl-token-c-0a5f"}


class Limited:
    def __init__(self, stack: Stack, name: str, topic: str) -> None:
        self.stack, self.name, self.topic = stack, name, topic

    def stub(self, channel: grpc.Channel) -> ingestion_pb2_grpc.IngestionServiceStub:
        return ingestion_pb2_grpc.IngestionServiceStub(channel)

    @property
    def metrics_port(self) -> int:
        return self.stack.components[self.name].metrics_port


@pytest.fixture(scope="module")
def limited(infra: Stack) -> Iterator[Limited]:
    token = uuid.uuid4().hex[:8]
    name, topic = f"ingestion-rl-{token}", f"rl-{token}"
    ensure_topics([infra.kafka_bootstrap], {topic: 1})
    callers = [{"name": n, "token_sha256": token_digest(t), "roles": ["ingest"]} for n, t in TOKENS.items()]
    infra.start_service(
        "ingestion",
        instance=name,
        extra_env={
            **LIMITS_ENV,
            "STYLEREC_ROLE": "api",
            "STYLEREC_EVENTS_TOPIC": topic,
            "STYLEREC_AUTH_REQUIRED": "true",
            "STYLEREC_AUTH_CALLERS": json.dumps(callers),
            "STYLEREC_INGEST_RATE_LIMIT_EPS": str(RATE_EPS),
            "STYLEREC_INGEST_RATE_LIMIT_BURST": str(BURST),
        },
    )
    infra.wait_serving([name], timeout_s=60)
    yield Limited(infra, name, topic)
    infra.stop_component(name)


def auth(caller: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {TOKENS[caller]}")]


def batch(tag: str, n: int = CHUNK) -> ingestion_pb2.IngestEventsRequest:
    return ingestion_pb2.IngestEventsRequest(
        events=[make_event(f"u-{tag}-{i}", f"item-{i}", common_pb2.VIEW, event_id=f"{tag}-{i}") for i in range(n)]
    )


def retry_delay_s(err: grpc.RpcError) -> float:
    status = rpc_status.from_call(err)
    assert status is not None, "no rich status details"
    for detail in status.details:
        if detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            info = error_details_pb2.RetryInfo()
            detail.Unpack(info)
            return float(info.retry_delay.ToMilliseconds()) / 1000
    raise AssertionError("no google.rpc.RetryInfo in the error")


def test_unary_burst_then_refusal_with_retry_info_then_accepted(limited: Limited) -> None:
    run = uuid.uuid4().hex[:6]
    with grpc.insecure_channel(limited.stack.addr_of(limited.name)) as ch:
        stub = limited.stub(ch)
        first = batch(f"{run}-1")
        second = batch(f"{run}-2")
        third = batch(f"{run}-3")
        assert stub.IngestEvents(first, metadata=auth("shop-a"), timeout=20).accepted == CHUNK
        assert stub.IngestEvents(second, metadata=auth("shop-a"), timeout=20).accepted == CHUNK
        with pytest.raises(grpc.RpcError) as err:
            stub.IngestEvents(third, metadata=auth("shop-a"), timeout=20)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err.value.details()
        assert "rate limit" in (err.value.details() or "")
        delay = retry_delay_s(err.value)
        assert 0 < delay <= CHUNK / RATE_EPS
        # Another caller is not held back by shop-a's empty bucket.
        assert stub.IngestEvents(batch(f"{run}-b"), metadata=auth("shop-b"), timeout=20).accepted == CHUNK
        time.sleep(delay)
        # The refused call took nothing: the same events are new, not duplicates.
        resp = stub.IngestEvents(third, metadata=auth("shop-a"), timeout=20)
        assert resp.accepted == CHUNK and not resp.duplicate_indexes
    assert metric(limited.metrics_port, "stylerec_ingestion_rate_limited", caller="shop-a") >= 1
    assert metric(limited.metrics_port, "stylerec_ingestion_rate_limited", caller="shop-b") == 0
    published = {r.value for r in read_records(limited.stack.kafka_bootstrap, limited.topic)}
    ids = set()
    for value in published:
        e = common_pb2.Event()
        e.ParseFromString(value)
        ids.add(e.event_id)
    for tag in ("1", "2", "3", "b"):
        assert {f"{run}-{tag}-{i}" for i in range(CHUNK)} <= ids, tag


def test_stream_chunks_before_the_refusal_are_acknowledged(limited: Limited) -> None:
    run = uuid.uuid4().hex[:6]
    chunks = [batch(f"{run}-s{k}") for k in range(3)]
    for k, c in enumerate(chunks, 1):
        c.sequence = k
    got: list[ingestion_pb2.IngestEventsResponse] = []
    with grpc.insecure_channel(limited.stack.addr_of(limited.name)) as ch:
        stub = limited.stub(ch)
        with pytest.raises(grpc.RpcError) as err:
            for resp in stub.StreamEvents(iter(chunks), metadata=auth("shop-c"), timeout=30):
                got.append(resp)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err.value.details()
        assert [(r.sequence, r.accepted) for r in got] == [(1, CHUNK), (2, CHUNK)]
        time.sleep(retry_delay_s(err.value))
        again = list(stub.StreamEvents(iter([chunks[2]]), metadata=auth("shop-c"), timeout=30))
        assert [(r.sequence, r.accepted) for r in again] == [(3, CHUNK)]


def test_call_larger_than_the_burst_is_refused_without_retry(limited: Limited) -> None:
    with grpc.insecure_channel(limited.stack.addr_of(limited.name)) as ch, pytest.raises(grpc.RpcError) as err:
        limited.stub(ch).IngestEvents(batch(uuid.uuid4().hex[:6], BURST + 1), metadata=auth("shop-b"), timeout=20)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert violations_of(err.value) == [
        ("events", f"at most {BURST} events per call (rate-limit burst); split the batch")
    ]
