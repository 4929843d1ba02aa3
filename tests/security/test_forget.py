"""AdminService.ForgetUser on a real stack, and the audit log of admin actions.

After the same end-to-end run as the privacy test, the lover is forgotten. Then: MongoDB, Redis
and the service logs hold neither their raw id nor their pseudonym; Kafka holds no raw id (their
pseudonymous events stay in ``user-events`` until retention, and every consumer skips them); the
gateway answers POPULAR; scoring's state lost their events, a retrain has one user fewer, and
neither a restarted replica nor a new replica replaying ``user-events`` from the beginning brings
them back; events they send afterwards are not archived; the audit collection and the ingestion
log hold the record; a second call is harmless and returns zero counts. Bad input and the CLI's
exit codes are checked on the same stack.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from stylerec.v1 import admin_pb2, common_pb2, gateway_pb2, ingestion_pb2, scoring_pb2, scoring_pb2_grpc

from cli.localstack.stack import Stack
from cli.main import main as cli_main
from libs.common import keys
from libs.common.errors import violations_of
from libs.common.privacy import UserRefs
from services.scoring.forget import ForgottenFilter
from services.scoring.interactions import EventRecord, InteractionState
from tests.security.scenario import (
    SECRET,
    Clients,
    Scenario,
    event,
    poll,
    pseudo,
    run_scenario,
    scan_kafka,
    scan_logs,
    scan_mongo,
    scan_redis,
    start_private_stack,
)

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]
SERVICE_LOGS = ["ingestion", "scoring", "style-worker", "gateway", "scoring-replay"]
FORGET = "stylerec.v1.AdminService/ForgetUser"


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Stack, Clients, Scenario]]:
    stack = start_private_stack(tmp_path_factory.mktemp("forget-stack"))
    clients = Clients(stack)
    try:
        yield stack, clients, run_scenario(clients, uuid.uuid4().hex[:8])
    finally:
        clients.close()
        stack.stop_component("scoring-replay")
        stack.down()


def state_events(stub: scoring_pb2_grpc.ScoringServiceStub) -> int:
    return int(stub.ModelInfo(scoring_pb2.ModelInfoRequest(), timeout=10).state_events)


def audit_lines(stack: Stack) -> list[dict[str, Any]]:
    out = []
    for line in (Path(stack.dir) / "ingestion.log").read_text(errors="replace").splitlines():
        if '"audit"' in line:
            rec = json.loads(line)
            if isinstance(rec.get("audit"), dict):
                out.append(rec["audit"])
    return out


def test_forget_user_end_to_end(run: tuple[Stack, Clients, Scenario]) -> None:
    stack, c, sc = run
    user = pseudo(sc.lover)
    ref = UserRefs(SECRET)(user)
    # Before: the lover is everywhere a user can be.
    assert c.redis.exists(keys.recs(user), keys.user_seen(user), keys.style_profile(user)) == 3
    assert c.db["stylized"].count_documents({"users": user}) >= 1
    before_events = state_events(c.scoring)
    assert before_events == sc.total_events
    # The gateway's answers were archived as impressions (pseudonym only; the scans below check it).
    poll("the lover's impressions archived", lambda: c.db["impressions"].count_documents({"user_id": user}), bool, 30)

    resp = c.admin.ForgetUser(admin_pb2.ForgetUserRequest(user_id=sc.lover), timeout=60)
    assert resp.user_ref == ref and not resp.already_forgotten
    assert resp.events_deleted == sc.lover_events
    assert resp.dedup_keys_deleted == sc.lover_events
    # No count asserted for Redis: the forget command goes out first, and a scoring replica may
    # delete the user's keys before ingestion gets to them. The scan below proves they are gone.
    assert 0 <= resp.redis_keys_deleted <= len(keys.per_user(user))
    assert resp.stylized_images_deleted + resp.stylized_refs_removed >= 1
    assert resp.impressions_deleted >= 1 and c.db["impressions"].count_documents({"user_id": user}) == 0

    # Scoring replicas drop the row from the user-forget command.
    poll(
        "scoring to drop the user's events",
        lambda: state_events(c.scoring),
        lambda n: n == before_events - sc.lover_events,
        30,
    )
    ask = gateway_pb2.GetRecommendationsRequest(user_id=sc.lover, k=4)
    answer = poll(
        "a POPULAR answer for the forgotten user",
        lambda: c.gateway.GetRecommendations(ask, timeout=10),
        lambda r: r.strategy == gateway_pb2.POPULAR,
        30,
    )
    assert not answer.anchor_item_id and answer.style_confidence == 0
    # The next model never sees them.
    c.scoring.Train(scoring_pb2.TrainRequest(wait=True), timeout=120)
    info = c.scoring.ModelInfo(scoring_pb2.ModelInfoRequest(), timeout=10)
    assert info.users == sc.model_users - 1

    # Nothing of the user in MongoDB, Redis or the service logs; no raw id in Kafka.
    both = [sc.lover, user]
    mongo_found, collections = scan_mongo(c.db, both)
    redis_found, _ = scan_redis(c.redis, both)
    logs_found, _ = scan_logs(Path(stack.dir), both, SERVICE_LOGS)
    kafka_found, _ = scan_kafka(stack.kafka_bootstrap, [sc.lover])
    found = mongo_found + redis_found + logs_found + kafka_found
    assert not found, "forgotten user still found:\n" + "\n".join(map(str, found[:20]))
    assert collections.get("events") == sc.total_events - sc.lover_events
    # The other shoppers are untouched.
    assert c.db["events"].count_documents({"user_id": pseudo(sc.gifter)}) == 1

    # The audit record: who, what, target reference, when, outcome with counts; and its log line.
    rec = c.db["audit"].find_one({"action": FORGET, "target": ref})
    assert rec is not None
    assert rec["caller"] == "anonymous" and rec["outcome"] == "ok" and rec["service"] == "ingestion"
    assert rec["details"]["events_deleted"] == sc.lover_events and abs(rec["ts"] - time.time()) < 600
    assert any(a["_id"] == rec["_id"] and a["outcome"] == "ok" for a in audit_lines(stack))
    train = c.db["audit"].find_one({"action": "stylerec.v1.ScoringService/Train", "outcome": "ok"})
    assert train is not None and train["details"]["status"] == "published" and train["caller"] == "anonymous"

    # Twice is harmless: zero counts, and the second call is audited too.
    again = c.admin.ForgetUser(admin_pb2.ForgetUserRequest(user_id=sc.lover), timeout=60)
    assert again.already_forgotten and again.user_ref == ref
    assert (
        again.events_deleted,
        again.dedup_keys_deleted,
        again.redis_keys_deleted,
        again.stylized_images_deleted,
        again.stylized_refs_removed,
        again.impressions_deleted,
        again.attributions_deleted,
    ) == (0, 0, 0, 0, 0, 0, 0)
    assert c.db["audit"].count_documents({"action": FORGET, "target": ref}) == 2

    # Events the user sends afterwards are published (Kafka is the shop's pipe) but never archived
    # nor applied: the suppression list holds.
    later = event(sc.lover, sc.photos[0], common_pb2.PURCHASE, time.time(), event_id=f"after-{uuid.uuid4().hex[:6]}")
    assert c.ingestion.IngestEvents(ingestion_pb2.IngestEventsRequest(events=[later]), timeout=30).accepted == 1
    marker = event(sc.gifter, sc.photos[1], common_pb2.VIEW, time.time(), event_id=f"marker-{uuid.uuid4().hex[:6]}")
    assert c.ingestion.IngestEvents(ingestion_pb2.IngestEventsRequest(events=[marker]), timeout=30).accepted == 1
    poll("the marker event archived", lambda: c.db["events"].count_documents({"_id": marker.event_id}), bool, 30)
    assert c.db["events"].count_documents({"user_id": user}) == 0
    after_marker = sc.total_events - sc.lover_events + 1
    poll("scoring to apply the marker", lambda: state_events(c.scoring), lambda n: n == after_marker, 30)
    assert not c.redis.exists(*keys.per_user(user))

    # A restarted replica (archive rebuild + committed offsets) does not bring them back ...
    stack.stop_component("scoring")
    stack.restart_component("scoring", timeout_s=120)
    restarted = scoring_pb2_grpc.ScoringServiceStub(grpc.insecure_channel(stack.addr_of("scoring")))
    poll("the restarted replica's state", lambda: state_events(restarted), lambda n: n == after_marker, 60)
    # ... nor does a new replica in a new consumer group, replaying user-events from the beginning.
    stack.start_service("scoring", instance="scoring-replay", extra_env={"STYLEREC_CONSUMER_GROUP": "scoring-replay"})
    stack.wait_serving(["scoring-replay"], timeout_s=120)
    replay = scoring_pb2_grpc.ScoringServiceStub(grpc.insecure_channel(stack.addr_of("scoring-replay")))
    poll("the replaying replica's state", lambda: state_events(replay), lambda n: n == after_marker, 60)
    time.sleep(3)  # let the replay finish its batches, then check nothing of the user was written
    assert state_events(replay) == after_marker
    assert not c.redis.exists(*keys.per_user(user))
    redis_found, _ = scan_redis(c.redis, [user, sc.lover])
    assert not redis_found, redis_found


def test_forget_user_bad_input(run: tuple[Stack, Clients, Scenario]) -> None:
    _stack, c, _sc = run
    for bad in ("", "   ", "x" * 5000):
        with pytest.raises(grpc.RpcError) as err:
            c.admin.ForgetUser(admin_pb2.ForgetUserRequest(user_id=bad), timeout=10)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert [f for f, _ in violations_of(err.value)] == ["user_id"]


def test_forget_cli_exit_codes(run: tuple[Stack, Clients, Scenario], capsys: pytest.CaptureFixture[str]) -> None:
    stack, c, sc = run
    addr = stack.addr_of("ingestion")
    assert cli_main(["forget", "", "--addr", addr]) == 2
    assert "must not be empty" in capsys.readouterr().err
    assert cli_main(["forget", "y" * 5000, "--addr", addr]) == 2
    assert "INVALID_ARGUMENT" in capsys.readouterr().err
    assert cli_main(["forget", sc.visitors[0], "--addr", addr, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["events_deleted"] == 2 and out["user_ref"].startswith("r_") and not out["already_forgotten"]
    assert sc.visitors[0] not in json.dumps(out)
    assert c.db["events"].count_documents({"user_id": pseudo(sc.visitors[0])}) == 0
    assert cli_main(["forget", sc.visitors[0], "--addr", addr]) == 0
    assert "already forgotten" in capsys.readouterr().out
    # No server there: a retryable failure, exit 1, not a usage error.
    assert cli_main(["forget", sc.visitors[1], "--addr", "127.0.0.1:1"]) == 1


# ---------------------------------------------------------------- units (no stack)
def test_interaction_state_forget_and_filter_units() -> None:
    refs = UserRefs(SECRET)
    state = InteractionState({1: 1.0, 5: 10.0}, 30 * 86400)
    now = time.time()
    rows = [("e1", "u_a", "i1", 5), ("e2", "u_a", "i2", 1), ("e3", "u_b", "i1", 5), ("e4", "u_a", "i1", 1)]
    state.apply_all(EventRecord(e, u, i, t, now) for e, u, i, t in rows)
    before_i1 = dict(state.popular(10))["i1"]
    assert state.forget("u_a") == 3 and state.events == 1 and state.users() == ["u_b"]
    assert "i2" not in state.items()  # only u_a touched it
    assert dict(state.popular(10))["i1"] == pytest.approx(before_i1 * 10 / 21)
    assert state.forget("u_a") == 0  # idempotent
    forgotten = ForgottenFilter(refs)
    assert not forgotten("u_a")
    assert forgotten.add([refs("u_a")]) == {refs("u_a")} and forgotten.add([refs("u_a")]) == set()
    state.exclude = forgotten
    assert not state.apply(EventRecord("e5", "u_a", "i1", 5, now)) and state.users() == ["u_b"]
    assert forgotten.users_of(refs("u_b"), ["u_a", "u_b"]) == ["u_b"]
    assert refs("u_a").startswith("r_") and refs("u_a") != UserRefs("other-secret")("u_a")
