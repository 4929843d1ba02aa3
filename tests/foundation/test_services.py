"""The four services over real sockets: health, reflection, metrics, bad input, the thin e2e path."""

from __future__ import annotations

import os
import signal
import time
import urllib.request
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from stylerec.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc, ingestion_pb2, ingestion_pb2_grpc

from cli.localstack.stack import SERVICES, Stack, free_port, grpc_serving, pid_alive
from libs.common.errors import violations_of

EXPECTED_SERVICE = {
    "ingestion": "stylerec.v1.IngestionService",
    "scoring": "stylerec.v1.ScoringService",
    "style-worker": "stylerec.v1.StyleWorkerService",
    "gateway": "stylerec.v1.GatewayService",
}


def _event(user: str, item: str, etype: int = common_pb2.PURCHASE, event_id: str = "") -> common_pb2.Event:
    e = common_pb2.Event(event_id=event_id, user_id=user, item_id=item, type=etype)  # type: ignore[arg-type]
    e.timestamp.GetCurrentTime()
    return e


@pytest.mark.parametrize("name", SERVICES)
def test_health_reports_serving(stack: Stack, name: str) -> None:
    with grpc.insecure_channel(stack.addr_of(name)) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        for service in ("", EXPECTED_SERVICE[name]):
            resp = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert resp.status == health_pb2.HealthCheckResponse.SERVING


@pytest.mark.parametrize("name", SERVICES)
def test_reflection_lists_services(stack: Stack, name: str) -> None:
    with grpc.insecure_channel(stack.addr_of(name)) as ch:
        stub = reflection_pb2_grpc.ServerReflectionStub(ch)
        responses = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
        names = {s.name for r in responses for s in r.list_services_response.service}
    assert {EXPECTED_SERVICE[name], "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"} <= names


@pytest.mark.parametrize("name", SERVICES)
def test_metrics_endpoint_counts_rpcs(stack: Stack, name: str) -> None:
    with grpc.insecure_channel(stack.addr_of(name)) as ch:
        health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
    port = stack.components[name].metrics_port
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    assert (
        'stylerec_grpc_server_handled_total{grpc_code="OK",grpc_method="Check",grpc_service="grpc.health.v1.Health"}'
        in body
    )
    assert "stylerec_grpc_server_handling_seconds_bucket" in body
    assert "stylerec_serving 1.0" in body


@pytest.mark.parametrize(
    ("event", "reason"),
    [
        (_event("", "i1"), "user_id is required"),
        (_event("u1", ""), "item_id is required"),
        (_event("u1", "i1", etype=0), "not one of VIEW"),
        (_event("u1", "i1", etype=42), "not one of VIEW"),
        (common_pb2.Event(user_id="u1", item_id="i1", type=common_pb2.VIEW), "timestamp is required"),
    ],
)
def test_ingest_all_bad_is_invalid_argument_with_details(stack: Stack, event: common_pb2.Event, reason: str) -> None:
    with grpc.insecure_channel(stack.addr_of("ingestion")) as ch:
        stub = ingestion_pb2_grpc.IngestionServiceStub(ch)
        with pytest.raises(grpc.RpcError) as err:
            stub.IngestEvents(ingestion_pb2.IngestEventsRequest(events=[event]), timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert reason in err.value.details()
    violations = violations_of(err.value)
    assert violations and violations[0][0] == "events[0]" and reason in violations[0][1]


def test_ingest_mixed_batch_reports_index_and_reason(stack: Stack, unique: str) -> None:
    events = [_event(f"m{unique}", "i1"), _event("", "i2"), _event(f"m{unique}", "i3")]
    with grpc.insecure_channel(stack.addr_of("ingestion")) as ch:
        resp = ingestion_pb2_grpc.IngestionServiceStub(ch).IngestEvents(
            ingestion_pb2.IngestEventsRequest(events=events), timeout=10
        )
    assert resp.accepted == 2
    assert [(r.index, r.reason) for r in resp.rejected] == [(1, "user_id is required")]


def _recommend(stack: Stack, user: str, k: int = 5) -> gateway_pb2.GetRecommendationsResponse:
    with grpc.insecure_channel(stack.addr_of("gateway")) as ch:
        return gateway_pb2_grpc.GatewayServiceStub(ch).GetRecommendations(
            gateway_pb2.GetRecommendationsRequest(user_id=user, k=k), timeout=10
        )


def test_end_to_end_history_vs_unknown_user(stack: Stack, unique: str) -> None:
    """ingestion → Kafka → scoring → Redis → gateway, with several users.

    The session stack is shared: other tests' events decide which items are most popular (the
    Ctrl-C bulk-ingest test alone sends tens of thousands), so the test makes the difference it
    checks itself: user 0 also buys the current most popular item, which an unknown user is
    shown and user 0 must not be.
    """
    items = [f"item-{unique}-{i}" for i in range(6)]
    users = [f"shopper-{unique}-{u}" for u in range(4)]
    events = []
    for u, user in enumerate(users):
        for i in range(u + 2):  # item 0 is the most popular of these
            events.append(_event(user, items[i], event_id=f"{unique}-{u}-{i}"))
    with grpc.insecure_channel(stack.addr_of("ingestion")) as ch:
        ingest = ingestion_pb2_grpc.IngestionServiceStub(ch)
        resp = ingest.IngestEvents(ingestion_pb2.IngestEventsRequest(events=events), timeout=10)
        assert resp.accepted == len(events)
        # Popularity is eventually consistent (scoring throttles its writes, the gateway caches it briefly).
        deadline = time.monotonic() + 60
        unknown = _recommend(stack, f"nobody-{unique}")
        while not unknown.items and time.monotonic() < deadline:
            time.sleep(0.5)
            unknown = _recommend(stack, f"nobody-{unique}")
        assert unknown.strategy == gateway_pb2.POPULAR and unknown.items
        top = unknown.items[0].item_id
        bought = {items[0], items[1], top}
        resp = ingest.IngestEvents(
            ingestion_pb2.IngestEventsRequest(events=[_event(users[0], top, event_id=f"{unique}-top")]), timeout=10
        )
        assert resp.accepted == 1

    deadline = time.monotonic() + 60
    known = _recommend(stack, users[0])
    while not (known.strategy == gateway_pb2.CF and not bought & {r.item_id for r in known.items}):
        assert time.monotonic() < deadline, f"scoring never folded user 0's purchases in: {known}"
        time.sleep(0.3)
        known = _recommend(stack, users[0])
    unknown = _recommend(stack, f"nobody-{unique}")
    assert unknown.strategy == gateway_pb2.POPULAR
    assert known.model_version and unknown.model_version
    known_items = [r.item_id for r in known.items]
    unknown_items = [r.item_id for r in unknown.items]
    # One more purchase keeps the most popular item on top of the unknown user's list ...
    assert known_items and unknown_items and top in unknown_items
    # ... and user 0, who bought it (and items 0 and 1), is not recommended what they already have.
    assert known_items != unknown_items and not bought & set(known_items)


def _health_once_reachable(address: str, service: str = "") -> int:
    """The health status of a just-started process, once its gRPC port answers."""
    deadline = time.monotonic() + 30
    while True:
        with grpc.insecure_channel(address) as ch:
            try:
                resp = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=service), timeout=2)
                return int(resp.status)
            except grpc.RpcError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.3)


def _metrics_text(stack: Stack, name: str) -> str:
    """A component's /metrics ("" while its metrics server is not up yet)."""
    port = stack.components[name].metrics_port
    try:
        return str(urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode())
    except OSError:
        return ""


def test_health_not_serving_while_dependency_down(infra: Stack, unique: str) -> None:
    """Ingestion pointed at a dead Redis (its dedup store) runs but must not claim SERVING."""
    name = f"ing-dead-redis-{unique}"
    comp = infra.start_service(
        "ingestion",
        instance=name,
        extra_env={"STYLEREC_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0", "STYLEREC_HEALTH_INTERVAL_S": "0.5"},
    )
    try:
        # Give the health loop a few rounds: NOT_SERVING must be the steady state, not a start-up blip.
        deadline = time.monotonic() + 20
        while 'stylerec_dependency_up{dependency="redis"} 0.0' not in _metrics_text(infra, name):
            assert time.monotonic() < deadline, "ingestion never probed Redis"
            time.sleep(0.3)
        assert _health_once_reachable(comp.address) == health_pb2.HealthCheckResponse.NOT_SERVING
        # Liveness stays SERVING: an outage makes the pod unready, it does not restart it.
        assert _health_once_reachable(comp.address, "stylerec.liveness") == health_pb2.HealthCheckResponse.SERVING
    finally:
        infra.stop_component(name)


def test_gateway_stays_ready_and_answers_degraded_while_redis_down(infra: Stack, unique: str) -> None:
    """The gateway answers every call without Redis (degraded, reason named), so its readiness
    does not depend on Redis; the outage shows in stylerec_dependency_up instead."""
    name = f"gw-dead-redis-{unique}"
    comp = infra.start_service(
        "gateway",
        instance=name,
        extra_env={
            "STYLEREC_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0",
            "STYLEREC_HEALTH_INTERVAL_S": "0.5",
            "STYLEREC_SCORING_ADDR": "",
        },
    )
    try:
        deadline = time.monotonic() + 20
        while 'stylerec_dependency_up{dependency="redis"} 0.0' not in _metrics_text(infra, name):
            assert time.monotonic() < deadline, "the gateway does not export Redis as a dependency"
            time.sleep(0.3)
        assert _health_once_reachable(comp.address) == health_pb2.HealthCheckResponse.SERVING
        with grpc.insecure_channel(comp.address) as ch:
            resp = gateway_pb2_grpc.GatewayServiceStub(ch).GetRecommendations(
                gateway_pb2.GetRecommendationsRequest(user_id=f"shopper-{unique}", k=5), timeout=5
            )
        assert resp.degraded and "redis" in resp.degraded_reason, resp
        assert 'stylerec_gateway_degraded_parts_total{dependency="redis"}' in _metrics_text(infra, name)
    finally:
        infra.stop_component(name)


def test_sigterm_stops_gracefully(infra: Stack, unique: str) -> None:
    name = f"ingest-term-{unique}"
    comp = infra.start_service("ingestion", instance=name)
    infra.wait_serving([name], timeout_s=60)
    os.kill(comp.pid, signal.SIGTERM)
    deadline = time.monotonic() + 20
    while pid_alive(comp.pid) and time.monotonic() < deadline:
        try:
            os.waitpid(comp.pid, os.WNOHANG)
        except ChildProcessError:
            break
        time.sleep(0.1)
    assert not pid_alive(comp.pid)
    assert not grpc_serving(comp.address, timeout_s=1)
    log = Path(comp.log).read_text()
    assert '"msg": "signal received"' in log and '"msg": "stopped"' in log
