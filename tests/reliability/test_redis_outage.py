"""Scenario 3: Redis is SIGKILLed under a steady stream of GetRecommendations calls.

The gateway must answer every call (zero failed RPCs), degraded with Redis named,
for a known user still from scoring's TopN (CF, not an empty list); its readiness
stays SERVING (no dependency gates it, docs/gateway.md) while
``stylerec_dependency_up{dependency="redis"}`` reports the outage. When Redis comes
back on the same port (empty: the local Redis has no persistence) the same gateway
process recovers by itself: non-degraded answers, the dependency gauge back to 1, and
recs that scoring writes again are read from Redis.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest
import redis
from grpc_health.v1 import health_pb2, health_pb2_grpc
from pymongo import MongoClient
from stylerec.v1 import gateway_pb2, gateway_pb2_grpc, scoring_pb2, scoring_pb2_grpc

from cli.localstack.stack import Stack
from libs.common import keys
from tests.reliability.conftest import (
    PSEUDONYMIZE,
    events_for,
    ingest,
    log_tail,
    make_event,
    metric_value,
    start,
    wait_for,
)

pytestmark = pytest.mark.integration

KNOWN = "shopper-red-0"  # a user of events_for("red", ...)
UNKNOWN = "never-seen-shopper"


@dataclass
class Call:
    phase: str
    user: str
    resp: gateway_pb2.GetRecommendationsResponse | None = None
    error: str = ""


@dataclass
class CallStream:
    """A steady client: GetRecommendations for a known and an unknown user in turn, every call recorded
    with the phase the test was in from its start to its end."""

    address: str
    phase: str = "before"
    calls: list[Call] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="call-stream", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        with grpc.insecure_channel(self.address) as ch:
            stub = gateway_pb2_grpc.GatewayServiceStub(ch)
            n = 0
            while not self._stop.is_set():
                call = Call(self.phase, (KNOWN, UNKNOWN)[n % 2])
                n += 1
                try:
                    call.resp = stub.GetRecommendations(
                        gateway_pb2.GetRecommendationsRequest(user_id=call.user, k=5), timeout=5
                    )
                except grpc.RpcError as exc:
                    call.error = f"{exc.code()}: {exc.details()}"
                if self.phase != call.phase:
                    # The test moved on while this call ran (e.g. Redis died under it): it belongs
                    # to no phase, so the per-phase checks below judge only calls wholly inside one.
                    call.phase = f"{call.phase}->{self.phase}"
                self.calls.append(call)
                time.sleep(0.02)

    def in_phase(self, phase: str) -> list[Call]:
        return [c for c in list(self.calls) if c.phase == phase]

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(15)


def readiness(address: str) -> int:
    with grpc.insecure_channel(address) as ch:
        return int(health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""), timeout=3).status)


def redis_up_gauge(stack: Stack, gw: str) -> float | None:
    return metric_value(stack, gw, "stylerec_dependency_up", dependency="redis")


def test_redis_outage_gateway_answers_degraded_and_recovers_without_restart(
    rstack: Stack, mongo_client: MongoClient[Any]
) -> None:
    fast = {"STYLEREC_TRAIN_ON_START": "false", "STYLEREC_ARCHIVE_SYNC_S": "1", "STYLEREC_POPULAR_EVERY_S": "0.2"}
    ing = start(rstack, "ingestion", "ingestion")
    scoring = start(rstack, "scoring", "scoring", fast)
    gw = start(rstack, "gateway", "gateway", {"STYLEREC_SCORING_ADDR": rstack.addr_of(scoring)})
    gw_pid = rstack.components[gw].pid
    r = redis.Redis(port=rstack.components["redis"].port, socket_timeout=2, decode_responses=True)
    known = PSEUDONYMIZE(KNOWN)

    seed = events_for("red", 300, users=15, items=30)
    assert len(ingest(rstack.addr_of(ing), seed).accepted) == len(seed)
    coll = mongo_client["stylerec"]["events"]
    wait_for(lambda: coll.count_documents({}) == len(seed), 60, "seed events not archived")
    with grpc.insecure_channel(rstack.addr_of(scoring)) as ch:
        version = (
            scoring_pb2_grpc.ScoringServiceStub(ch)
            .Train(scoring_pb2.TrainRequest(wait=True), timeout=120)
            .model_version
        )
    wait_for(
        lambda: r.hget(keys.recs_meta(known), "model_version") == version,
        60,
        lambda: f"scoring never wrote {KNOWN}'s recs with {version}\n{log_tail(rstack, scoring)}",
    )

    stream = CallStream(rstack.addr_of(gw))
    stream.start()
    try:
        wait_for(lambda: len(stream.in_phase("before")) >= 20, 60, "no calls answered before the outage")

        stream.phase = "killing"
        rstack.kill_component("redis")
        stream.phase = "outage"
        # Readiness stays SERVING and the gauge shows the outage (the health loop probes every 0.5 s).
        wait_for(lambda: redis_up_gauge(rstack, gw) == 0.0, 30, "stylerec_dependency_up{redis} never went to 0")
        assert readiness(rstack.addr_of(gw)) == health_pb2.HealthCheckResponse.SERVING, "readiness follows Redis"
        wait_for(
            lambda: len(stream.in_phase("outage")) >= 60,
            90,
            lambda: f"only {len(stream.in_phase('outage'))} calls during the outage",
        )
        assert readiness(rstack.addr_of(gw)) == health_pb2.HealthCheckResponse.SERVING

        stream.phase = "restarting"
        rstack.restart_component("redis")  # same port, empty
        stream.phase = "recovering"
        wait_for(
            lambda: any(
                c.resp is not None and not c.resp.degraded and c.user == KNOWN for c in stream.in_phase("recovering")
            ),
            60,
            lambda: (
                f"the gateway never answered non-degraded after Redis came back; last "
                f"{[(c.user, c.resp.degraded_reason if c.resp else c.error) for c in stream.calls[-4:]]}"
            ),
        )
        stream.phase = "after"
        wait_for(lambda: len(stream.in_phase("after")) >= 20, 60, "no calls answered after the recovery")
        wait_for(lambda: redis_up_gauge(rstack, gw) == 1.0, 30, "stylerec_dependency_up{redis} never back to 1")

        # Scoring writes the known user's recs (and popularity) again on their next event; the
        # gateway serves exactly those from Redis.
        fresh = make_event("red-after-outage", KNOWN, "item-29", ts=seed[0].timestamp.seconds)
        assert ingest(rstack.addr_of(ing), [fresh]).accepted == ["red-after-outage"]
        wait_for(
            lambda: r.exists(keys.recs(known)) == 1, 60, lambda: f"recs not rewritten\n{log_tail(rstack, scoring)}"
        )
        wait_for(lambda: r.exists(keys.popular()) == 1, 30, "popularity not rewritten")
        stored = sorted(
            ((str(i), float(s)) for i, s in r.hgetall(keys.recs(known)).items()), key=lambda kv: (-kv[1], kv[0])
        )
        with grpc.insecure_channel(rstack.addr_of(gw)) as ch:
            stub = gateway_pb2_grpc.GatewayServiceStub(ch)
            answer = stub.GetRecommendations(gateway_pb2.GetRecommendationsRequest(user_id=KNOWN, k=5), timeout=5)
            stranger = stub.GetRecommendations(gateway_pb2.GetRecommendationsRequest(user_id=UNKNOWN, k=5), timeout=5)
    finally:
        stream.stop()

    errors = [(c.phase, c.user, c.error) for c in stream.calls if c.error]
    assert not errors, f"{len(errors)} of {len(stream.calls)} calls failed: {errors[:5]}"
    before, outage, after = stream.in_phase("before"), stream.in_phase("outage"), stream.in_phase("after")

    def odd(calls: list[Call], want_degraded: bool) -> list[tuple[int, str, str]]:
        """(index in the stream, user, reason) of answers that are not what the phase requires."""
        return [
            (stream.calls.index(c), c.user, c.resp.degraded_reason if c.resp else c.error)
            for c in calls
            if c.resp is None
            or c.resp.degraded != want_degraded
            or (want_degraded and "redis" not in c.resp.degraded_reason)
        ]

    assert not odd(before, False), f"degraded before the outage: {odd(before, False)[:5]}"
    assert not odd(outage, True), (
        f"of {len(outage)} calls during the outage, not degraded by Redis: {odd(outage, True)[:5]}"
    )
    assert not odd(after, False), f"degraded after the recovery: {odd(after, False)[:5]}"
    # Without Redis a known user still gets a personal list: the gateway asks scoring's TopN.
    known_out = [c.resp for c in outage if c.user == KNOWN and c.resp]
    assert known_out and all(r.strategy == gateway_pb2.CF and len(r.items) == 5 for r in known_out), known_out[:2]
    assert rstack.components[gw].pid == gw_pid, "the gateway was restarted"

    assert not answer.degraded and answer.strategy == gateway_pb2.CF, answer
    assert [i.item_id for i in answer.items] == [i for i, _ in stored][:5], (answer, stored)
    assert not stranger.degraded and stranger.strategy == gateway_pb2.POPULAR and len(stranger.items) == 5, stranger
