"""Scenario 7: the broker stops while shops keep sending events.

Two ways a broker "stops", on the ingestion process (API + archiver) of a private stack:

* hung (SIGSTOP, later SIGCONT): connections stay open and nothing answers — the case
  that turns a missing timeout into a hang;
* dead (SIGKILL, then restarted on the same port): connections are refused. The embedded
  broker (tansu) stores in memory, so it comes back EMPTY: records acknowledged but not yet
  consumed at the kill are gone with it. That is a property of the dev broker, not of
  ingestion (production Kafka replicates, acks=all); this test proves what can be proved —
  everything archived before the kill stays, and ingestion + archiver recover on the new broker.

Each phase: clients keep calling for a while; every call must end with UNAVAILABLE (or
RESOURCE_EXHAUSTED when the in-flight budget is full), both with RetryInfo, well inside the
client's deadline (never DEADLINE_EXCEEDED, never a hang); the ingestion process's RSS must
stay within a generous bound; after the broker returns, new events are accepted and reach
the archiver (exact counts in Mongo). Measured latencies and RSS go to
``out/reliability/broker_outage.json`` and stdout; only generous bounds are asserted.
"""

from __future__ import annotations

import json
import os
import signal
import statistics
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from pymongo import MongoClient
from stylerec.v1 import ingestion_pb2, ingestion_pb2_grpc

from cli.localstack.stack import REPO, Stack
from tests.ingestion.conftest import LIMITS_ENV, make_event
from tests.reliability.faults import private_stack, rss_kib, tail, wait_for

pytestmark = pytest.mark.integration

NAME = "ingestion"
CLIENT_DEADLINE_S = 8.0
HAMMER_S = 8.0
CLIENTS = 4
BATCH = 50
RSS_BOUND_KIB = 100 * 1024
RESULTS = REPO / "out" / "reliability" / "broker_outage.json"


@pytest.fixture(scope="module")
def outage_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with private_stack(tmp_path_factory.mktemp("outage")) as stack:
        stack.start_service(
            "ingestion",
            extra_env={
                **LIMITS_ENV,
                "STYLEREC_ROLE": "all",
                "STYLEREC_PUBLISH_TIMEOUT_S": "2",
                "STYLEREC_KAFKA_REQUEST_TIMEOUT_MS": "1000",
                "STYLEREC_KAFKA_MAX_BLOCK_MS": "1000",
                "STYLEREC_BROKER_COOLDOWN_S": "1",
                "STYLEREC_DEDUP_PENDING_S": "5",
                "STYLEREC_MAX_INFLIGHT_EVENTS": "500",
            },
        )
        stack.wait_serving([NAME], timeout_s=60)
        yield stack


@pytest.fixture(scope="module")
def events_db(outage_stack: Stack) -> Iterator[Any]:
    client: MongoClient[Any] = MongoClient(outage_stack.mongo_uri, serverSelectionTimeoutMS=5000)
    yield client["stylerec"]["events"]
    client.close()


def batch(tag: str, n: int, start: int = 0) -> ingestion_pb2.IngestEventsRequest:
    return ingestion_pb2.IngestEventsRequest(
        events=[
            make_event(f"shopper-{i % 7}", f"item-{i % 40}", event_id=f"{tag}-{i}") for i in range(start, start + n)
        ]
    )


def archived(events_db: Any, tag: str) -> set[str]:
    return {d["_id"] for d in events_db.find({"_id": {"$regex": f"^{tag}-"}}, {"_id": 1})}


def send_until_accepted(stub: ingestion_pb2_grpc.IngestionServiceStub, req: ingestion_pb2.IngestEventsRequest) -> int:
    """Retry as a client must (UNAVAILABLE / RESOURCE_EXHAUSTED are retryable) until the batch is in."""
    deadline = time.monotonic() + 60
    while True:
        try:
            resp = stub.IngestEvents(req, timeout=CLIENT_DEADLINE_S)
        except grpc.RpcError as exc:
            assert exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED), exc.details()
            assert time.monotonic() < deadline, f"ingestion did not recover within 60 s: {exc.details()}"
            time.sleep(0.5)
            continue
        if resp.rejected and all(r.reason.startswith("in_progress") for r in resp.rejected):
            time.sleep(0.5)  # an earlier unacknowledged attempt of the same ids is still pending
            continue
        assert not resp.rejected, list(resp.rejected)
        return int(resp.accepted + resp.duplicates)


def hammer(stack: Stack, stub: ingestion_pb2_grpc.IngestionServiceStub, tag: str) -> dict[str, Any]:
    """CLIENTS threads call IngestEvents back to back for HAMMER_S while RSS is sampled."""
    pid = stack.components[NAME].pid
    calls: list[tuple[str, float]] = []
    lock = threading.Lock()
    stop = threading.Event()

    def client(k: int) -> None:
        i = 0
        while not stop.is_set():
            req = batch(f"{tag}-c{k}", BATCH, start=i * BATCH)
            i += 1
            t0 = time.perf_counter()
            try:
                stub.IngestEvents(req, timeout=CLIENT_DEADLINE_S)
                code = "OK"
            except grpc.RpcError as exc:
                code = exc.code().name
            with lock:
                calls.append((code, time.perf_counter() - t0))

    rss_before = rss_kib(pid)
    threads = [threading.Thread(target=client, args=(k,)) for k in range(CLIENTS)]
    for t in threads:
        t.start()
    samples = []
    end = time.monotonic() + HAMMER_S
    while time.monotonic() < end:
        samples.append(rss_kib(pid))
        time.sleep(0.2)
    stop.set()
    for t in threads:
        t.join(CLIENT_DEADLINE_S + 5)
    lat = sorted(s for _, s in calls)
    codes: dict[str, int] = {}
    for c, _ in calls:
        codes[c] = codes.get(c, 0) + 1
    return {
        "calls": len(calls),
        "codes": codes,
        "latency_s": {
            "p50": round(statistics.median(lat), 4) if lat else None,
            "p95": round(lat[int(0.95 * (len(lat) - 1))], 4) if lat else None,
            "max": round(lat[-1], 4) if lat else None,
        },
        "rss_kib": {"before": rss_before, "max": max(samples), "growth": max(samples) - rss_before},
    }


def record(phase: str, numbers: dict[str, Any]) -> None:
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    data = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    data[phase] = {**numbers, "machine": f"{os.cpu_count()} CPUs, shared", "at": time.strftime("%Y-%m-%dT%H:%M:%SZ")}
    RESULTS.write_text(json.dumps(data, indent=2))
    print(f"\n{phase}: {json.dumps(numbers)}")


def check_outage(stack: Stack, numbers: dict[str, Any]) -> None:
    codes = numbers["codes"]
    assert numbers["calls"] >= CLIENTS, numbers
    assert set(codes) <= {"UNAVAILABLE", "RESOURCE_EXHAUSTED"}, (
        f"during the outage every call must fail fast and retryably: {codes}\n{tail(stack.components[NAME].log)}"
    )
    assert numbers["latency_s"]["max"] < CLIENT_DEADLINE_S, numbers
    assert numbers["rss_kib"]["growth"] < RSS_BOUND_KIB, f"ingestion RSS grew without bound: {numbers['rss_kib']}"


def test_hung_broker_fails_fast_with_bounded_memory_and_recovers(outage_stack: Stack, events_db: Any) -> None:
    tag = f"hung-{uuid.uuid4().hex[:6]}"
    broker = outage_stack.components["kafka"]
    with grpc.insecure_channel(outage_stack.addr_of(NAME)) as ch:
        stub = ingestion_pb2_grpc.IngestionServiceStub(ch)
        assert send_until_accepted(stub, batch(f"{tag}-before", 100)) == 100
        wait_for(lambda: len(archived(events_db, f"{tag}-before")) == 100, 60, "100 events archived before the stop")

        os.kill(broker.pid, signal.SIGSTOP)
        try:
            numbers = hammer(outage_stack, stub, f"{tag}-during")
        finally:
            os.kill(broker.pid, signal.SIGCONT)
        record("hung_broker_sigstop", numbers)
        check_outage(outage_stack, numbers)

        accepted = send_until_accepted(stub, batch(f"{tag}-after", 120))
        assert accepted == 120
    wait_for(lambda: len(archived(events_db, f"{tag}-after")) >= 120, 60, "events sent after SIGCONT archived")
    # Exact: every accepted id once (the archive is keyed by event id), and nothing accepted was lost.
    assert archived(events_db, f"{tag}-after") == {f"{tag}-after-{i}" for i in range(120)}
    assert archived(events_db, f"{tag}-before") == {f"{tag}-before-{i}" for i in range(100)}
    # Calls answered UNAVAILABLE were not acknowledged; some of them may still land once the
    # broker thaws (it had them in its socket buffer). Reported, not asserted: at-least-once.
    late = len(archived(events_db, f"{tag}-during"))
    record("hung_broker_sigstop_unacked_that_landed", {"events": late})


def test_dead_broker_fails_fast_with_bounded_memory_and_recovers_after_restart(
    outage_stack: Stack, events_db: Any
) -> None:
    tag = f"dead-{uuid.uuid4().hex[:6]}"
    with grpc.insecure_channel(outage_stack.addr_of(NAME)) as ch:
        stub = ingestion_pb2_grpc.IngestionServiceStub(ch)
        assert send_until_accepted(stub, batch(f"{tag}-before", 100)) == 100
        wait_for(lambda: len(archived(events_db, f"{tag}-before")) == 100, 60, "100 events archived before the kill")

        outage_stack.kill_component("kafka")
        numbers = hammer(outage_stack, stub, f"{tag}-during")
        record("dead_broker_sigkill", numbers)
        check_outage(outage_stack, numbers)

        outage_stack.restart_component("kafka")  # same port, empty (memory storage), topics recreated
        t0 = time.monotonic()
        assert send_until_accepted(stub, batch(f"{tag}-after", 120)) == 120
        recovered_s = time.monotonic() - t0
    wait_for(
        lambda: len(archived(events_db, f"{tag}-after")) >= 120,
        90,
        f"events sent after the restart archived\n{tail(outage_stack.components[NAME].log)}",
    )
    assert archived(events_db, f"{tag}-after") == {f"{tag}-after-{i}" for i in range(120)}
    assert archived(events_db, f"{tag}-before") == {f"{tag}-before-{i}" for i in range(100)}
    assert not archived(events_db, f"{tag}-during"), "calls answered UNAVAILABLE by a dead broker cannot have landed"
    record("dead_broker_restart_recovery", {"first_accepted_after_restart_s": round(recovered_s, 2)})
