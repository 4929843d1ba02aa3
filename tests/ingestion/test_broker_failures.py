"""A slow (SIGSTOPped) or absent (SIGKILLed) broker: fast, retryable errors, no hang, nothing lost.

Uses its own broker/Redis/Mongo so stopping the broker does not disturb other tests.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from stylerec.v1 import common_pb2, ingestion_pb2, ingestion_pb2_grpc

from cli.localstack.stack import Stack
from libs.common.kafka import USER_EVENTS
from tests.ingestion.conftest import make_event, read_records, start_ingestion

pytestmark = pytest.mark.integration


@pytest.fixture
def own_stack(tmp_path: Path) -> Iterator[Stack]:
    stack = Stack(dir=tmp_path / "stack")
    try:
        stack.start_infra()
        yield stack
    finally:
        kafka = stack.components.get("kafka")
        if kafka is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(kafka.pid, signal.SIGCONT)
        stack.down(timeout_s=5)


def retry_delay_s(err: grpc.RpcError) -> float | None:
    status = rpc_status.from_call(err)  # type: ignore[arg-type]
    for detail in status.details if status else []:
        if detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            info = error_details_pb2.RetryInfo()
            detail.Unpack(info)
            return info.retry_delay.ToMilliseconds() / 1000
    return None


def _events(tag: str, n: int) -> list[common_pb2.Event]:
    return [make_event(f"shopper-{i % 5}", f"item-{i}", event_id=f"{tag}-{i}") for i in range(n)]


def test_slow_then_absent_broker(own_stack: Stack) -> None:
    name = "ingestion-broker-test"
    start_ingestion(
        own_stack,
        name,
        {
            "STYLEREC_ROLE": "api",
            "STYLEREC_MAX_BATCH_EVENTS": "50",
            "STYLEREC_MAX_INFLIGHT_EVENTS": "60",
            "STYLEREC_PUBLISH_TIMEOUT_S": "2",
            "STYLEREC_KAFKA_REQUEST_TIMEOUT_MS": "1000",
            "STYLEREC_KAFKA_MAX_BLOCK_MS": "1000",
            "STYLEREC_BROKER_COOLDOWN_S": "1",
            "STYLEREC_DEDUP_PENDING_S": "5",
        },
    )
    broker = own_stack.components["kafka"]
    tag = uuid.uuid4().hex[:8]
    with grpc.insecure_channel(own_stack.addr_of(name)) as ch:
        stub = ingestion_pb2_grpc.IngestionServiceStub(ch)
        assert (
            stub.IngestEvents(ingestion_pb2.IngestEventsRequest(events=_events(f"{tag}-ok", 10)), timeout=10).accepted
            == 10
        )

        # Slow broker: the first call holds the in-flight budget until its publish timeout ...
        os.kill(broker.pid, signal.SIGSTOP)
        held = ingestion_pb2.IngestEventsRequest(events=_events(f"{tag}-held", 50))
        errors: list[grpc.RpcError] = []

        def hold() -> None:
            try:
                stub.IngestEvents(held, timeout=20)
            except grpc.RpcError as exc:
                errors.append(exc)

        holder = threading.Thread(target=hold)
        holder.start()
        # Wait for the server to hold the batch (a fixed sleep lost this race on a busy CI box: the second
        # call arrived first, took the budget itself and timed out as UNAVAILABLE).
        deadline = time.monotonic() + 10
        while own_stack.scrape(name).get(("stylerec_ingestion_inflight_events", frozenset())) != 50:
            assert time.monotonic() < deadline, "the held batch never reached the in-flight budget"
            time.sleep(0.05)
        # ... so a second caller is turned away at once instead of queueing without bound.
        with pytest.raises(grpc.RpcError) as err:
            stub.IngestEvents(ingestion_pb2.IngestEventsRequest(events=_events(f"{tag}-more", 20)), timeout=20)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err.value.details()
        assert retry_delay_s(err.value) is not None
        holder.join(30)
        assert errors and errors[0].code() == grpc.StatusCode.UNAVAILABLE, errors
        assert retry_delay_s(errors[0]) is not None

        # The broker comes back: retrying the failed batch (as the client must) stores every event.
        os.kill(broker.pid, signal.SIGCONT)
        deadline = time.monotonic() + 40
        final = None
        while time.monotonic() < deadline:
            try:
                resp = stub.IngestEvents(held, timeout=20)
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.UNAVAILABLE, exc.details()
                time.sleep(retry_delay_s(exc) or 0.5)
                continue
            if all(r.reason.startswith("in_progress") for r in resp.rejected) and resp.rejected:
                time.sleep(0.5)
                continue
            final = resp
            break
        assert final is not None and not final.rejected
        assert final.accepted + final.duplicates == 50
        on_topic = {
            common_pb2.Event.FromString(r.value).event_id for r in read_records(own_stack.kafka_bootstrap, USER_EVENTS)
        }
        assert {e.event_id for e in held.events} <= on_topic

        # Absent broker: UNAVAILABLE with RetryInfo, bounded by the publish timeout, never a hang.
        os.killpg(broker.pid, signal.SIGKILL)
        codes = []
        for i in range(3):
            with pytest.raises(grpc.RpcError) as err:
                stub.IngestEvents(ingestion_pb2.IngestEventsRequest(events=_events(f"{tag}-gone{i}", 5)), timeout=15)
            codes.append(err.value.code())
            assert retry_delay_s(err.value) is not None
        assert set(codes) == {grpc.StatusCode.UNAVAILABLE}
