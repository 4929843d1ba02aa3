"""Scenario 6: poison records on every topic that has a consumer; each consumer parks or skips
them exactly once and goes on with the valid records sent after them.

A private stack runs the four services. The consumers (libs/common/kafka.py TOPICS, and every
ProtoConsumerLoop / KafkaConsumer in services/):

| topic          | consumer (group)                          | poison goes to                        |
|----------------|-------------------------------------------|---------------------------------------|
| user-events    | ingestion archiver (``archiver``)         | ``dlq-ingestion``                     |
| user-events    | scoring (``scoring``)                     | ``dlq-scoring``                       |
| style-jobs     | style worker (``style-worker``)           | ``dlq-style-worker``                  |
| item-updates   | style worker (``style-worker-items``)     | ``dlq-style-worker``                  |
| item-updates   | gateway item-cache invalidation           | skipped, counted ``outcome="skipped"``|
| model-updates  | every scoring replica, no group           | skipped, logged                       |
| user-forget    | every scoring replica, no group           | skipped, logged                       |

The last three are by design not dead-lettered: the gateway's copy of ``item-updates`` is a
cache hint (the style worker already parks the same record), and ``model-updates`` and
``user-forget`` are read by every replica without a group, so N replicas would write N
copies of each dead letter; for those the test counts the warning in the JSON log instead.
(``style-results`` has no consumer in the services.)

Each poison record is located by (topic, partition, offset) from the producer's ack; the
dead letters are matched on ``source_topic``/``partition``/``offset`` (the key and value of a
``user-events`` dead letter may be redacted, libs/common/privacy.py). Exact counts: one dead
letter per poison record per consuming group, nothing else on the dead-letter topics, and
the consumers' ``stylerec_kafka_messages_consumed_total`` deltas equal what was sent.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gridfs
import pytest
import redis
from pymongo import MongoClient
from stylerec.v1 import admin_pb2, common_pb2, scoring_pb2, style_pb2

from cli.localstack.stack import SERVICES, Stack
from libs.common import keys
from libs.common.kafka import ITEM_UPDATES, MODEL_UPDATES, STYLE_JOBS, USER_EVENTS, USER_FORGET, ProtoProducer
from libs.common.privacy import UserRefs
from tests.reliability.faults import UNDECODABLE, dead_letters, metric, private_stack, scrape, tail, wait_for
from tests.style_worker.conftest import encoded, photo

pytestmark = pytest.mark.integration

CONSUMED = "stylerec_kafka_messages_consumed_total"
N_EVENTS = 20
SECRET = "test-secret-poison"


@pytest.fixture(scope="module")
def full_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with private_stack(tmp_path_factory.mktemp("poison")) as stack:
        stack.env_overrides = {
            "STYLEREC_HEALTH_INTERVAL_S": "0.5",
            "STYLEREC_MAX_OUTPUT_SIDE": "256",
            "STYLEREC_PSEUDONYM_SECRET": SECRET,
        }
        stack.start_services(SERVICES, timeout_s=180)
        yield stack


def consumed(stack: Stack, service: str, group: str, topic: str, outcome: str) -> float:
    return metric(scrape(stack, service), CONSUMED, group=group, topic=topic, outcome=outcome)


def log_lines(stack: Stack, service: str, needle: str) -> int:
    return sum(
        1 for line in Path(stack.components[service].log).read_text(errors="replace").splitlines() if needle in line
    )


def event(tag: str, i: int, **kw: Any) -> common_pb2.Event:
    e = common_pb2.Event(
        event_id=f"{tag}-{i}", user_id=f"u_{i % 5:032x}", item_id=f"item-{i % 7}", type=common_pb2.VIEW
    )
    for k, v in kw.items():
        setattr(e, k, v)
    e.timestamp.GetCurrentTime()
    return e


def test_poison_on_every_consumed_topic(full_stack: Stack) -> None:
    t = uuid.uuid4().hex[:6]
    bootstrap = full_stack.kafka_bootstrap
    producer = ProtoProducer([bootstrap], client_id="poison-test")
    client: MongoClient[Any] = MongoClient(full_stack.mongo_uri, serverSelectionTimeoutMS=5000)
    db = client["stylerec"]
    fs = gridfs.GridFS(db)
    r = redis.Redis.from_url(full_stack.redis_url)

    # ---- consumers that start at the end of their topic: wait until they read, with probes
    # that are themselves valid records (counted in the baselines below).
    probe = f"probe-{t}"
    r.set(keys.item_meta(probe), "x")

    def gateway_reads() -> bool:
        if r.exists(keys.item_meta(probe)):
            producer.send_and_wait(ITEM_UPDATES, probe, common_pb2.ItemUpdate(item_id=probe))
            time.sleep(0.3)
            return not r.exists(keys.item_meta(probe))
        return True

    wait_for(gateway_reads, 60, "the gateway's item-updates consumer to be assigned", every_s=0.5)

    def scoring_model_updates_reads() -> bool:
        producer.send_and_wait(MODEL_UPDATES, "probe", scoring_pb2.ModelUpdate(model_version=f"probe-{t}"))
        time.sleep(0.3)
        return log_lines(full_stack, "scoring", f"probe-{t}") > 0

    wait_for(scoring_model_updates_reads, 60, "scoring's model-updates consumer to be connected", every_s=0.5)
    # Let every probe be handled before the baselines are taken.
    wait_for(
        lambda: consumed(full_stack, "style-worker", "style-worker-items", ITEM_UPDATES, "ok") >= 1,
        60,
        "style worker saw the probes",
    )
    time.sleep(1.5)
    base = {s: scrape(full_stack, s) for s in SERVICES}

    def delta(service: str, group: str, topic: str, outcome: str) -> float:
        before = metric(base[service], CONSUMED, group=group, topic=topic, outcome=outcome)
        return consumed(full_stack, service, group, topic, outcome) - before

    # ---- items the valid style jobs need
    embed_items = [f"pz{i}-{t}" for i in range(2)]
    for i, item in enumerate(embed_items):
        ref = str(fs.put(encoded(photo(seed=500 + i)), filename=f"items/{item}", metadata={"kind": "item-image"}))
        db.items.replace_one({"_id": item}, {"_id": item, "title": item, "image_ref": ref}, upsert=True)
    gone = f"gone-{t}"
    r.set(keys.item_meta(gone), "cached")
    r.set(keys.item_embedding(gone), b"\0" * 400)

    # ---- poison first, then valid records; remember where each poison record landed
    poison: dict[str, tuple[str, int, int, bytes]] = {}

    def send_poison(name: str, topic: str, key: str, value: bytes) -> None:
        md = producer.send_raw(topic, key.encode(), value).get(timeout=10)
        poison[name] = (topic, md.partition, md.offset, value)

    send_poison("events-undecodable", USER_EVENTS, f"u_{0:032x}", UNDECODABLE)
    send_poison("events-invalid", USER_EVENTS, f"u_{1:032x}", event(f"bad-{t}", 1, item_id="").SerializeToString())
    send_poison("jobs-undecodable", STYLE_JOBS, "j1", UNDECODABLE)
    bad_job = style_pb2.StyleJob(job_id=f"bad-{t}", kind=style_pb2.STYLIZE, content_item_id=embed_items[0])
    send_poison("jobs-invalid", STYLE_JOBS, "j2", bad_job.SerializeToString())
    send_poison("updates-undecodable", ITEM_UPDATES, "i1", UNDECODABLE)
    send_poison("updates-invalid", ITEM_UPDATES, "i2", common_pb2.ItemUpdate(image_ref="orphan").SerializeToString())
    send_poison("models-undecodable", MODEL_UPDATES, "m1", UNDECODABLE)

    tag = f"ok-{t}"
    for i in range(N_EVENTS):
        producer.send(USER_EVENTS, f"u_{i % 5:032x}", event(tag, i))
    for i, item in enumerate(embed_items):
        producer.send(
            STYLE_JOBS, item, style_pb2.StyleJob(job_id=f"ok-{t}-{i}", kind=style_pb2.EMBED, content_item_id=item)
        )
    producer.send(ITEM_UPDATES, gone, common_pb2.ItemUpdate(item_id=gone, deleted=True))
    producer.send(MODEL_UPDATES, "m2", scoring_pb2.ModelUpdate(model_version=f"after-poison-{t}"))
    producer.flush(10)

    # ---- the valid records after the poison are processed (exact counts)
    events = db["events"]
    wait_for(
        lambda: events.count_documents({"_id": {"$regex": f"^{tag}-"}}) >= N_EVENTS,
        60,
        f"archived events\n{tail(full_stack.components['ingestion'].log)}",
    )
    assert {d["_id"] for d in events.find({"_id": {"$regex": f"^{tag}-"}}, {"_id": 1})} == {
        f"{tag}-{i}" for i in range(N_EVENTS)
    }
    wait_for(lambda: delta("scoring", "scoring", USER_EVENTS, "ok") >= N_EVENTS, 60, "scoring applied the events")
    # user-forget: a poison command, then a valid one for a user scoring now holds.
    send_poison("forget-undecodable", USER_FORGET, "f1", UNDECODABLE)
    ref = UserRefs(SECRET)(f"u_{4:032x}")
    producer.send_and_wait(USER_FORGET, ref, admin_pb2.ForgetCommand(user_ref=ref, audit_id=f"poison-{t}"))
    wait_for(
        lambda: log_lines(full_stack, "scoring", ref) >= 1, 60, "scoring applied the forget command after the poison"
    )
    wait_for(lambda: all(r.exists(keys.item_embedding(i)) for i in embed_items), 90, "embeddings after the poison")
    wait_for(lambda: not r.exists(keys.item_embedding(gone)), 60, "style worker applied the delete after the poison")
    wait_for(lambda: not r.exists(keys.item_meta(gone)), 60, "gateway invalidated after the poison")
    wait_for(lambda: log_lines(full_stack, "scoring", f"after-poison-{t}") >= 1, 60, "scoring read model-updates on")
    time.sleep(1.5)  # any late duplicate would show up in the counts below

    # ---- dead letters: exactly one per poison record per consuming group, nothing else
    expected = {
        "ingestion": {"events-undecodable": "undecodable:", "events-invalid": "invalid:"},
        "scoring": {"events-undecodable": "undecodable:", "events-invalid": "invalid:"},
        "style-worker": {
            "jobs-undecodable": "undecodable:",
            "jobs-invalid": "invalid: stylize job without style_item_id",
            "updates-undecodable": "undecodable:",
            "updates-invalid": "invalid: item update without item_id",
        },
    }
    for service, wanted in expected.items():
        dls = dead_letters(bootstrap, service)
        where = {(d.source_topic, d.partition, d.offset): d for d in dls}
        assert len(where) == len(dls), f"dlq-{service}: a record was dead-lettered twice: {dls}"
        for name, reason in wanted.items():
            topic, partition, offset, value = poison[name]
            d = where.get((topic, partition, offset))
            assert d is not None, f"{name} ({topic}/{partition}@{offset}) is not on dlq-{service}: {list(where)}"
            assert d.reason.startswith(reason), (name, d.reason)
            assert d.service == service, (name, d.service)
            if topic != USER_EVENTS:  # user-events dead letters may be redacted (privacy)
                assert d.value == value, name
        extra = set(where) - {poison[n][:3] for n in wanted}
        assert not extra, f"dlq-{service} holds records that were not poison: {[where[k] for k in extra]}"

    # ---- consumer counts: the poison once, every valid record once
    assert delta("ingestion", "archiver", USER_EVENTS, "dead_letter") == 2
    assert delta("ingestion", "archiver", USER_EVENTS, "ok") == N_EVENTS
    assert delta("scoring", "scoring", USER_EVENTS, "dead_letter") == 2
    assert delta("scoring", "scoring", USER_EVENTS, "ok") == N_EVENTS
    assert delta("style-worker", "style-worker", STYLE_JOBS, "dead_letter") == 2
    assert delta("style-worker", "style-worker", STYLE_JOBS, "ok") == len(embed_items)
    # item-updates: the undecodable one fails decoding; the one without item_id decodes and is
    # parked by the handler (so it counts as consumed "ok" and appears on the DLQ above).
    assert delta("style-worker", "style-worker-items", ITEM_UPDATES, "dead_letter") == 1
    assert delta("style-worker", "style-worker-items", ITEM_UPDATES, "ok") == 2
    assert delta("gateway", "gateway-item-cache", ITEM_UPDATES, "skipped") == 1
    assert delta("gateway", "gateway-item-cache", ITEM_UPDATES, "ok") == 2
    assert log_lines(full_stack, "scoring", "undecodable model-updates") == 1
    assert log_lines(full_stack, "scoring", f"after-poison-{t}") == 1
    assert log_lines(full_stack, "scoring", "undecodable user-forget") == 1
    forgotten = [line for line in Path(full_stack.components["scoring"].log).read_text().splitlines() if ref in line]
    assert len(forgotten) == 1 and "user forgotten" in forgotten[0], forgotten
    for service in SERVICES:
        assert full_stack.component_healthy(service), f"{service} is not SERVING after the poison"
    print(
        f"\npoison: {len(poison)} poison records on 5 topics, 8 dead letters matched; "
        f"{N_EVENTS} events, 2 jobs, 1 item update, 1 model update, 1 forget command processed after them"
    )

    producer.close()
    client.close()
