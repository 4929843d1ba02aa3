"""Scenario 1: a scoring replica SIGKILLed mid-stream and restarted ends with exactly the
state and the Redis output of a replica that ran through the same events uninterrupted.

How scoring survives a crash (services/scoring/__main__.py, consumer.py): at start it
rebuilds its interaction state from the MongoDB archive, loads the newest model from
the registry, then consumes ``user-events`` from its group's committed offsets (commits
happen only after Redis was written, so the batch in flight at the kill is replayed);
a background sync tails the archive. State is deduplicated by event id, so an event
that arrives both from the archive and from the replay counts once.

Both replicas run side by side on one stack, on the same topic, archive and model, but
in their own consumer groups and their own Redis databases (``/1`` reference, ``/2``
crash), so "the same output" is a comparison of two keyspaces. Two crashes:

* A: scoring killed while the archiver is current, so on restart the archive already
  holds events the replay delivers again (duplicates must not count);
* B: the archiver is down too, so on restart the archive lacks events the crashed
  replica had already consumed and committed; they come back only through the archive
  sync once the archiver catches up, and the users they belong to must be rewritten.

Events carry timestamps whole half-lives apart (``exact_ts``), so every sum scoring
keeps is exact and "equal" is ``==`` whatever order events were applied in.
"""

from __future__ import annotations

import threading
from collections import Counter
from typing import Any

import grpc
import pytest
import redis
from kafka import KafkaAdminClient, TopicPartition
from pymongo import MongoClient
from stylerec.v1 import scoring_pb2, scoring_pb2_grpc

from cli.localstack.stack import Stack
from libs.common.kafka import TOPICS, USER_EVENTS, partition_of
from tests.reliability.conftest import (
    FAST_ENV,
    PSEUDONYMIZE,
    EventSender,
    archived_ids,
    events_for,
    id_diff,
    ingest,
    log_tail,
    metric_value,
    start,
    wait_for,
)

pytestmark = pytest.mark.integration

SEED, N_A, N_B, BATCH = 300, 600, 600, 50
USERS, ITEMS = 40, 60
REF, CRASH = "scoring-ref", "scoring-crash"


def model_info(stack: Stack, name: str) -> scoring_pb2.ModelInfoResponse:
    with grpc.insecure_channel(stack.addr_of(name)) as ch:
        return scoring_pb2_grpc.ScoringServiceStub(ch).ModelInfo(scoring_pb2.ModelInfoRequest(), timeout=5)


def state_events(stack: Stack, name: str) -> int:
    return int(model_info(stack, name).state_events)


def keyspace(r: redis.Redis) -> dict[str, Any]:
    """Everything scoring wrote to one Redis database (a ``decode_responses`` client), comparable
    with ``==``; write times left out."""
    out: dict[str, Any] = {}
    for key in r.scan_iter(count=1000):
        kind = r.type(key)
        value: Any
        if kind == "hash":
            value = dict(r.hgetall(key))
            value.pop("updated_at", None)
        elif kind == "set":
            value = sorted(r.smembers(key))
        elif kind == "zset":
            value = r.zrange(key, 0, -1, withscores=True)
        elif kind == "string":
            value = r.get(key)
        else:
            value = kind
        out[str(key)] = value
    return out


def keyspace_diff(ref: dict[str, Any], got: dict[str, Any]) -> str:
    missing = sorted(set(ref) - set(got))
    extra = sorted(set(got) - set(ref))
    differ = sorted(k for k in set(ref) & set(got) if ref[k] != got[k])
    lines = [f"{len(ref)} reference keys, {len(got)} after the crash"]
    lines.append(f"missing {len(missing)}: {missing[:5]}; unexpected {len(extra)}: {extra[:5]}")
    lines.append(f"different {len(differ)}:")
    for k in differ[:3]:
        lines.append(f"  {k}\n    reference {ref[k]}\n    crash run {got[k]}")
    return "\n".join(lines)


def drained(stack: Stack, group: str, sent: list[Any]) -> bool:
    """The group has committed every record of ``sent``: per user-events partition, its committed
    offset equals the number of those events keyed (pseudonymized user) to that partition."""
    want = Counter(partition_of(PSEUDONYMIZE(e.user_id)) for e in sent)
    admin = KafkaAdminClient(bootstrap_servers=[stack.kafka_bootstrap], request_timeout_ms=5000)
    try:
        parts = [TopicPartition(USER_EVENTS, p) for p in range(TOPICS[USER_EVENTS])]
        offsets = admin.list_group_offsets({group: parts})[group]
    finally:
        admin.close()
    got = {tp.partition: om.offset for tp, om in offsets.items()}
    return all(got.get(p, 0) == n for p, n in want.items())


def applied(stack: Stack, name: str, outcome: str) -> float:
    sample = metric_value(stack, name, "stylerec_scoring_events_applied_total", source="kafka", outcome=outcome)
    return sample or 0.0


def crash_mid_stream(stack: Stack, address: str, earlier: list[Any], events: list[Any], drain: bool) -> list[str]:
    """Stream ``events``; once the first half is acknowledged, SIGKILL the crash replica, then
    send the rest while it is down. ``drain=False`` kills as soon as it has applied some of the
    first half (a batch may be cut between the Redis write and the commit); ``drain=True`` waits
    until it has committed all of the first half (``earlier``: every event sent before), so
    exactly the second half is left to replay."""
    killed = threading.Event()
    half = len(events) // BATCH // 2
    before = state_events(stack, CRASH)
    sender = EventSender(address, events, BATCH, gates={half: killed})
    sender.start()
    sender.wait_batches(half)
    if drain:
        wait_for(
            lambda: drained(stack, CRASH, earlier + events[: half * BATCH]),
            60,
            lambda: f"{CRASH} did not commit the first half\n{log_tail(stack, CRASH)}",
        )
    else:
        wait_for(
            lambda: state_events(stack, CRASH) > before,
            60,
            lambda: f"{CRASH} applied nothing of the stream\n{log_tail(stack, CRASH)}",
            every_s=0.05,
        )
    stack.kill_component(CRASH)
    killed.set()
    log = sender.finish()
    assert log.errors == [] and not log.rejected and not log.duplicates, log
    return log.accepted


def test_scoring_sigkill_mid_stream_equals_an_uninterrupted_run(rstack: Stack, mongo_client: MongoClient[Any]) -> None:
    port = rstack.components["redis"].port
    ref_db = redis.Redis(port=port, db=1, decode_responses=True)
    crash_db = redis.Redis(port=port, db=2, decode_responses=True)
    base = f"redis://127.0.0.1:{port}"
    scoring_env = {
        "STYLEREC_TRAIN_ON_START": "false",
        "STYLEREC_ARCHIVE_SYNC_S": "1",
        "STYLEREC_POPULAR_EVERY_S": "0.2",
        # A killed member leaves the group after this; the restarted replica waits for it.
        "STYLEREC_KAFKA_SESSION_TIMEOUT_MS": "3000",
    }
    api = start(rstack, "ingestion", "ingestion", {"STYLEREC_ROLE": "api"})
    arch = start(rstack, "ingestion", "archiver", {"STYLEREC_ROLE": "archiver"})
    db = mongo_client["stylerec"]
    total = events_for("sc", SEED + N_A + N_B, users=USERS, items=ITEMS)
    seed, stream_a, stream_b = total[:SEED], total[SEED : SEED + N_A], total[SEED + N_A :]

    # Both replicas start on the archived seed; one model, trained once, is loaded by both
    # (the reference publishes it, the crash replica hot-loads it from model-updates).
    assert len(ingest(rstack.addr_of(api), seed).accepted) == SEED
    wait_for(lambda: db["events"].count_documents({}) == SEED, 60, "seed not archived")
    for name, n in ((REF, 1), (CRASH, 2)):
        env = {**FAST_ENV, **scoring_env, "STYLEREC_CONSUMER_GROUP": name, "STYLEREC_REDIS_URL": f"{base}/{n}"}
        rstack.start_service("scoring", instance=name, extra_env=env)
    rstack.wait_serving([REF, CRASH], timeout_s=120)
    with grpc.insecure_channel(rstack.addr_of(REF)) as ch:
        trained = scoring_pb2_grpc.ScoringServiceStub(ch).Train(scoring_pb2.TrainRequest(wait=True), timeout=120)
    version = trained.model_version
    assert version.startswith("ease-"), trained
    wait_for(lambda: model_info(rstack, CRASH).model_version == version, 60, f"{CRASH} never loaded {version}")

    # A: kill scoring mid-stream; the archiver keeps up, so the replay repeats archived events.
    accepted_a = crash_mid_stream(rstack, rstack.addr_of(api), seed, stream_a, drain=False)
    wait_for(lambda: db["events"].count_documents({}) == SEED + N_A, 60, "stream A not archived")
    rstack.restart_component(CRASH)
    # The restarted replica re-reads from its last commit: events already in the archive come again.
    wait_for(
        lambda: applied(rstack, CRASH, "duplicate") > 0,
        60,
        lambda: f"the restarted replica replayed nothing from Kafka\n{log_tail(rstack, CRASH)}",
    )
    wait_for(lambda: drained(rstack, CRASH, seed + stream_a), 60, lambda: f"{CRASH} did not replay A")
    assert state_events(rstack, CRASH) == SEED + N_A

    # B: the archiver is down too, and the replica had committed the first half before the kill:
    # on restart neither the archive nor the replay has those events. The replay (the second
    # half) is applied first; the first half comes back only when the archiver catches up and
    # the archive sync brings it, and the users it belongs to must then be rewritten.
    rstack.kill_component(arch)
    accepted_b = crash_mid_stream(rstack, rstack.addr_of(api), seed + stream_a, stream_b, drain=True)
    rstack.restart_component(CRASH)
    wait_for(lambda: drained(rstack, CRASH, total), 60, lambda: f"{CRASH} did not replay B\n{log_tail(rstack, CRASH)}")
    # Exactly the second half came from Kafka; the first half is in neither the archive nor the replay.
    assert applied(rstack, CRASH, "new") == N_B // 2
    assert state_events(rstack, CRASH) == SEED + N_A + N_B // 2
    rstack.restart_component(arch)

    everything = [e.event_id for e in total]
    assert sorted(accepted_a + accepted_b) == sorted(everything[SEED:])
    wait_for(
        lambda: db["events"].count_documents({}) == len(total),
        90,
        lambda: f"archive: {id_diff(everything, archived_ids(db))}",
    )
    for name in (REF, CRASH):
        wait_for(
            lambda name=name: state_events(rstack, name) == len(total),  # type: ignore[misc]
            90,
            lambda name=name: f"{name} state {state_events(rstack, name)}, want {len(total)}\n{log_tail(rstack, name)}",  # type: ignore[misc]
        )

    # Counters: the same events (each once), users, items and model on both replicas.
    ref_info, crash_info = model_info(rstack, REF), model_info(rstack, CRASH)
    for f in ("state_events", "users", "items", "model_version", "algorithm"):
        assert getattr(crash_info, f) == getattr(ref_info, f), (f, ref_info, crash_info)
    assert ref_info.state_events == len(total)

    # Output: the crash run's Redis keyspace equals the reference's, key by key. Writes settle
    # asynchronously (popularity is throttled, the archive sync runs every second), so poll.
    wait_for(
        lambda: keyspace(crash_db) == keyspace(ref_db),
        60,
        lambda: keyspace_diff(keyspace(ref_db), keyspace(crash_db)),
        every_s=1.0,
    )
    ref_keys = keyspace(ref_db)
    users = {k for k in ref_keys if k.startswith("stylerec:v1:recs-meta:")}
    assert len(users) == USERS, f"{len(users)} users with recs in the reference, want {USERS}"
    assert all(v.get("model_version") == version for k, v in ref_keys.items() if "recs-meta" in k)
