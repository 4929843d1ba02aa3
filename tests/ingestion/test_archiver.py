"""The archiver as its own process: SIGKILL mid-stream loses nothing and duplicates nothing."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kafka import KafkaProducer
from pymongo.database import Database
from stylerec.v1 import common_pb2, ingestion_pb2

from cli.localstack.stack import Stack, pid_alive
from libs.common.kafka import dead_letter_topic, ensure_topics
from services.ingestion.validation import PSEUDONYM_RE
from tests.ingestion.conftest import make_event, read_records, start_ingestion, wait_until

pytestmark = pytest.mark.integration

N_CHUNKS, CHUNK = 20, 200


def _kill(stack: Stack, name: str) -> None:
    pid = stack.components[name].pid
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while pid_alive(pid) and time.monotonic() < deadline:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
        time.sleep(0.05)
    assert not pid_alive(pid)


def test_archiver_sigkill_mid_stream_ends_with_exactly_the_accepted_events(
    infra: Stack, mongo_db: Database[Any]
) -> None:
    token = uuid.uuid4().hex[:8]
    topic, coll_name, group = f"arch-kill-{token}", f"events_k_{token}", f"archiver-k-{token}"
    ensure_topics([infra.kafka_bootstrap], {topic: 3})
    env = {
        "STYLEREC_EVENTS_TOPIC": topic,
        "STYLEREC_EVENTS_COLLECTION": coll_name,
        "STYLEREC_ARCHIVER_GROUP": group,
        "STYLEREC_ARCHIVER_MAX_POLL_RECORDS": "100",
    }
    api, arch1, arch2 = f"ing-api-{token}", f"archiver-x-{token}", f"archiver-y-{token}"
    coll = mongo_db[coll_name]
    try:
        start_ingestion(infra, api, {**env, "STYLEREC_ROLE": "api"}, wait=False)
        start_ingestion(infra, arch1, {**env, "STYLEREC_ROLE": "archiver"}, wait=False)
        infra.wait_serving([api, arch1], timeout_s=60)
        # Junk on the topic: the archiver must dead-letter it, not crash and not archive it.
        dlq_key_junk, dlq_key_raw = f"junk-{token}".encode(), f"raw-{token}".encode()
        raw_event = make_event(f"raw-shopper-{token}", "item-1", event_id=f"{token}-raw")
        producer = KafkaProducer(bootstrap_servers=[infra.kafka_bootstrap], acks="all")
        producer.send(topic, key=dlq_key_junk, value=b"\xff\x00 not a protobuf").get(10)
        producer.send(topic, key=dlq_key_raw, value=raw_event.SerializeToString()).get(10)
        producer.close()

        accepted: list[int] = []
        ids = [f"{token}-{c}-{i}" for c in range(N_CHUNKS) for i in range(CHUNK)]

        def chunks() -> Iterator[ingestion_pb2.IngestEventsRequest]:
            for c in range(N_CHUNKS):
                events = [
                    make_event(f"shopper-{i % 37}", f"item-{i % 101}", event_id=ids[c * CHUNK + i])
                    for i in range(CHUNK)
                ]
                yield ingestion_pb2.IngestEventsRequest(events=events, sequence=c + 1)
                time.sleep(0.1)  # a steady producer, so the kill lands mid-stream

        def produce() -> None:
            import grpc
            from stylerec.v1 import ingestion_pb2_grpc

            with grpc.insecure_channel(infra.addr_of(api)) as ch:
                for ack in ingestion_pb2_grpc.IngestionServiceStub(ch).StreamEvents(chunks(), timeout=120):
                    accepted.append(ack.accepted)

        sender = threading.Thread(target=produce)
        sender.start()
        assert wait_until(lambda: coll.count_documents({}) > 0, 60, 0.05), "archiver wrote nothing"
        _kill(infra, arch1)
        at_kill = coll.count_documents({})
        sender.join(120)
        assert sum(accepted) == len(ids) and len(accepted) == N_CHUNKS
        assert at_kill < len(ids), "the archiver finished before it was killed; the test proves nothing"

        start_ingestion(infra, arch2, {**env, "STYLEREC_ROLE": "archiver"})
        assert wait_until(lambda: coll.count_documents({}) >= len(ids), 90, 0.5), coll.count_documents({})
        time.sleep(2)  # anything replayed twice would show up now
        docs = list(coll.find({}, {"user_id": 1}))
        assert len(docs) == len(ids)
        assert sorted(d["_id"] for d in docs) == sorted(ids)
        assert all(PSEUDONYM_RE.match(d["user_id"]) for d in docs)

        # A user-events key that is not a pseudonym may be a raw id: dead letters drop it (and
        # redact the raw user id of a decodable event), so they are told apart by reason.
        letters = [
            common_pb2.DeadLetter.FromString(r.value)
            for r in read_records(infra.kafka_bootstrap, dead_letter_topic("ingestion"))
        ]
        # By source record: the SIGKILLed archiver may dead-letter a record again on replay.
        letters = list({(dl.partition, dl.offset): dl for dl in letters if dl.source_topic == topic}.values())
        reasons = sorted(dl.reason for dl in letters)
        assert len(letters) == 2 and all(dl.key == b"" for dl in letters), reasons
        assert reasons[0].startswith("invalid: user_id is not a pseudonym"), reasons
        assert reasons[1].startswith("undecodable"), reasons
        assert all(raw_event.user_id.encode() not in dl.SerializeToString() for dl in letters)
    finally:
        for name in (api, arch1, arch2):
            infra.stop_component(name)


def test_dev_mode_without_secret_warns_loudly(infra: Stack) -> None:
    name = f"ing-devkey-{uuid.uuid4().hex[:6]}"
    try:
        start_ingestion(infra, name, {"STYLEREC_ROLE": "api", "STYLEREC_PSEUDONYM_SECRET": ""})
        log = Path(infra.components[name].log).read_text()
        assert "PUBLIC dev key" in log and '"level": "warning"' in log
    finally:
        infra.stop_component(name)


def test_a_replayed_batch_ends_with_each_event_once_at_the_replays_content(mongo_db: Database[Any]) -> None:
    """The archive inserts and upserts only the ids already there: a replay overlapping what a
    crashed run wrote must end with every event once, the overlap rewritten (as the upsert-only
    write did: archived_at moves to the replay's stamp), the rest inserted."""
    from libs.common.kafka import Decoded
    from services.ingestion.archiver import EventArchiver

    name = f"events_replay_{uuid.uuid4().hex[:8]}"
    archive = EventArchiver(mongo_db, name)
    user = f"u_{uuid.uuid4().hex}"

    def batch(ids: range, value: float) -> list[Decoded[common_pb2.Event]]:
        return [Decoded(None, make_event(user, f"i{n}", event_id=f"e{n}", value=value)) for n in ids]  # type: ignore[arg-type]

    archive(batch(range(0, 5), 1.0))
    archive(batch(range(3, 8), 2.0))
    archive(batch(range(3, 8), 2.0))  # the same replay twice: nothing new to insert at all
    docs = {d["_id"]: d for d in mongo_db[name].find()}
    assert sorted(docs) == [f"e{n}" for n in range(8)]
    assert [docs[f"e{n}"]["value"] for n in range(8)] == [1.0] * 3 + [2.0] * 5
    assert all(docs[f"e{n}"]["user_id"] == user and docs[f"e{n}"]["item_id"] == f"i{n}" for n in range(8))
    mongo_db.drop_collection(name)
