"""Pseudonymization end to end: after a full run on a real stack, no raw user id is anywhere.

One private stack (broker, Redis, Mongo-protocol server, the four services, own log files):
items with photos, events through ingestion (one with an event id and a session id that quote
the raw id), the archive, a training, personalized recommendations through the gateway and a
stylized image streamed. Then every Kafka topic from the beginning, every MongoDB collection
(GridFS files and chunks included), every Redis key and value in every logical database and
every log line is searched for the raw ids.

A producer that bypasses ingestion and puts a raw id on ``user-events`` is dead-lettered by
the archiver and scoring; the dead-letter copies must not repeat that raw id either.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kafka import KafkaProducer
from kafka.consumer.fetcher import ConsumerRecord
from stylerec.v1 import common_pb2

from cli.localstack.stack import Stack
from libs.common.kafka import USER_EVENTS, dead_letter_topic
from libs.common.privacy import PSEUDONYM_RE, redact_user_event
from services.ingestion.events import mentions, scrub_user_mentions
from tests.security.scenario import (
    Clients,
    Scenario,
    kafka_records,
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


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Stack, Clients, Scenario]]:
    stack = start_private_stack(tmp_path_factory.mktemp("privacy-stack"))
    clients = Clients(stack)
    try:
        yield stack, clients, run_scenario(clients, uuid.uuid4().hex[:8])
    finally:
        clients.close()
        stack.down()


def test_no_raw_user_id_in_any_store_or_log(run: tuple[Stack, Clients, Scenario]) -> None:
    stack, c, sc = run
    raw = sc.raw_ids
    # The scan must be able to find what it looks for: the pseudonyms are there.
    assert c.db["events"].count_documents({"user_id": pseudo(sc.lover)}) == sc.lover_events
    kafka_found, topics = scan_kafka(stack.kafka_bootstrap, raw)
    mongo_found, collections = scan_mongo(c.db, raw)
    redis_found, n_keys = scan_redis(c.redis, raw)
    logs_found, n_lines = scan_logs(Path(stack.dir), raw)
    # The scan covered the stores the scenario wrote: no vacuous pass.
    assert topics.get(USER_EVENTS, 0) >= sc.total_events and topics.get("style-jobs", 0) > 0
    assert collections.get("events") == sc.total_events and collections.get("fs.files", 0) >= 5
    assert collections.get("stylized", 0) >= 1 and collections.get("fs.content_bytes", 0) > 10_000
    assert n_keys > 10 and n_lines > 20
    found = kafka_found + mongo_found + redis_found + logs_found
    assert not found, "raw user ids found:\n" + "\n".join(map(str, found[:20]))
    # The same scan does find what is there: the lover's pseudonym in each store.
    lover = [pseudo(sc.lover)]
    assert scan_kafka(stack.kafka_bootstrap, lover)[0] and scan_mongo(c.db, lover)[0]
    assert scan_redis(c.redis, lover)[0]


def test_event_and_session_ids_quoting_the_raw_id_are_replaced(run: tuple[Stack, Clients, Scenario]) -> None:
    _stack, c, sc = run
    docs = list(c.db["events"].find({"user_id": pseudo(sc.lover)}))
    assert len(docs) == sc.lover_events
    assert all(sc.lover not in d["_id"] for d in docs)
    sessions = [d["context"]["session_id"] for d in docs if d["context"]["session_id"]]
    assert len(sessions) == 1 and sessions[0].startswith("s_") and sc.lover not in sessions[0]


def test_stylized_records_name_requesters_by_pseudonym(run: tuple[Stack, Clients, Scenario]) -> None:
    _stack, c, sc = run
    stylized = list(c.db["stylized"].find({"content_item_id": sc.stylized_item}))
    assert stylized and all(u == pseudo(sc.lover) for d in stylized for u in d.get("users", []))
    assert any(d.get("users") for d in stylized)
    for d in c.db["events"].find({}):
        assert PSEUDONYM_RE.match(d["user_id"]), d


def test_dead_letters_of_a_raw_id_event_do_not_repeat_it(run: tuple[Stack, Clients, Scenario]) -> None:
    stack, c, _sc = run
    rogue = f"rogue-{uuid.uuid4().hex[:8]}@example.com"
    bad = common_pb2.Event(event_id=f"rogue-event-{uuid.uuid4().hex[:6]}", user_id=rogue, item_id="x")
    bad.type = common_pb2.PURCHASE
    bad.timestamp.GetCurrentTime()
    producer = KafkaProducer(bootstrap_servers=[stack.kafka_bootstrap], acks="all")
    try:
        producer.send(USER_EVENTS, key=rogue.encode(), value=bad.SerializeToString()).get(10)
        producer.send(USER_EVENTS, key=rogue.encode(), value=b"\xff\x00garbage " + rogue.encode()).get(10)
    finally:
        producer.close()

    def letters() -> list[common_pb2.DeadLetter]:
        out = []
        for topic, _key, value in kafka_records(stack.kafka_bootstrap, idle_s=1.0):
            if topic in (dead_letter_topic("ingestion"), dead_letter_topic("scoring")):
                dl = common_pb2.DeadLetter.FromString(value)
                if dl.source_topic == USER_EVENTS and dl.offset >= 0:
                    out.append(dl)
        return out

    # Two records x two consumers (archiver -> dlq-ingestion, scoring -> dlq-scoring).
    got = poll("four dead letters", letters, lambda ls: len(ls) >= 4, 60, 1.0)
    reasons = sorted(dl.reason for dl in got)
    assert any(r.startswith("invalid: user_id is not a pseudonym") for r in reasons), reasons
    assert any(r.startswith("undecodable") and "value withheld" in r for r in reasons), reasons
    for dl in got:
        assert rogue.encode() not in dl.SerializeToString(), dl
        assert dl.key == b""
        if dl.value:
            assert common_pb2.Event.FromString(dl.value).user_id == "<redacted>"
    # Nothing of the rogue reached the archive or Redis.
    assert c.db["events"].count_documents({"_id": bad.event_id}) == 0
    redis_found, _ = scan_redis(c.redis, [rogue])
    assert not redis_found, redis_found


# ---------------------------------------------------------------- units (no stack)
def _record(key: bytes, value: bytes) -> Any:
    return ConsumerRecord(
        topic=USER_EVENTS,
        partition=0,
        leader_epoch=0,
        offset=7,
        timestamp=0,
        timestamp_type=0,
        key=key,
        value=value,
        headers=[],
        checksum=None,
        serialized_key_size=len(key),
        serialized_value_size=len(value),
        serialized_header_size=-1,
    )


def test_redact_user_event_units() -> None:
    raw = common_pb2.Event(event_id="e1", user_id="alice@example.com", item_id="i1", type=common_pb2.VIEW)
    key, value, reason = redact_user_event(_record(b"alice@example.com", raw.SerializeToString()), "invalid: x")
    assert key == b"" and b"alice" not in value and reason == "invalid: x (user_id redacted)"
    assert common_pb2.Event.FromString(value).item_id == "i1"
    good = common_pb2.Event(event_id="e2", user_id=pseudo("bob"), item_id="i1", type=common_pb2.VIEW)
    key, value, reason = redact_user_event(_record(pseudo("bob").encode(), good.SerializeToString()), "invalid: y")
    assert key == pseudo("bob").encode() and common_pb2.Event.FromString(value) == good and reason == "invalid: y"
    key, value, reason = redact_user_event(_record(b"k", b"\xff\x00alice@example.com"), "undecodable: z")
    assert (key, value) == (b"", b"") and reason.startswith("undecodable: z (value withheld: 19 bytes, sha256 ")


def test_scrub_user_mentions_units() -> None:
    raw = "12748"
    e = common_pb2.Event(event_id="order-12748-1", user_id=raw, item_id="i")
    e.context.session_id = "sess-112748"  # a longer number, not the id
    e.context.page = "/u/12748"
    scrub_user_mentions(e, raw, pseudo(raw))
    assert e.event_id.startswith("e_") and raw not in e.event_id
    assert e.context.session_id == "sess-112748" and e.context.page.startswith("p_")
    again = common_pb2.Event(event_id="order-12748-1", user_id=raw, item_id="i")
    scrub_user_mentions(again, raw, pseudo(raw))
    assert again.event_id == e.event_id  # deterministic: a retry is still deduplicated
    assert mentions("a@b.c-1", "a@b.c") and not mentions("xa@b.c", "a@b.c") and not mentions("abc", "zz")
