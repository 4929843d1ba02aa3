"""Scenario 2: the archiver (ingestion ``--role archiver``) is SIGKILLed mid-stream and
restarted; MongoDB ends with exactly the accepted events, each once, each as sent.

The archiver commits offsets only after its bulk upsert returned, so a kill between
the write and the commit replays that batch on restart; the upsert keyed by event id
makes the replay rewrite the same documents. Rejected events and repeated ids (which
ingestion reports as duplicates) must not appear at all or appear once.
"""

from __future__ import annotations

import threading
from typing import Any

import pytest
from pymongo import MongoClient
from stylerec.v1 import common_pb2

from cli.localstack.stack import Stack
from tests.reliability.conftest import (
    PSEUDONYMIZE,
    EventSender,
    archived_ids,
    assert_exactly,
    events_for,
    id_diff,
    log_tail,
    make_event,
    start,
    wait_for,
)

pytestmark = pytest.mark.integration

N, BATCH = 1500, 50


def test_archiver_sigkill_mid_stream_archives_exactly_the_accepted_events(
    rstack: Stack, mongo_client: MongoClient[Any]
) -> None:
    token = "arc"
    api = start(rstack, "ingestion", "ingestion", {"STYLEREC_ROLE": "api"})
    # Small polls: many write-then-commit cycles, so the kill is likely to land between the two.
    arch = start(
        rstack, "ingestion", "archiver", {"STYLEREC_ROLE": "archiver", "STYLEREC_ARCHIVER_MAX_POLL_RECORDS": "40"}
    )
    coll = mongo_client["stylerec"]["events"]

    events = events_for(token, N)
    # Noise the archive must not reflect: repeated ids (ingestion answers "duplicate") and
    # events ingestion rejects (unknown type), one of each in every fifth batch.
    stream: list[common_pb2.Event] = []
    noise = 0
    for b in range(0, N, BATCH):
        stream += events[b : b + BATCH]
        if (b // BATCH) % 5 == 4:
            stream.append(events[b])  # an id already sent: ingestion answers "duplicate"
            stream.append(make_event(f"{token}-bad-{b}", "shopper-bad", "item-bad", etype=9))
            noise += 1

    killed = threading.Event()
    n_batches = -(-len(stream) // BATCH)
    kill_after = n_batches // 3
    sender = EventSender(rstack.addr_of(api), stream, BATCH, gates={kill_after: killed})
    sender.start()
    sender.wait_batches(kill_after)
    wait_for(lambda: coll.count_documents({}) > 0, 60, lambda: f"archiver wrote nothing\n{log_tail(rstack, arch)}")
    rstack.kill_component(arch)  # SIGKILL: no commit, no clean-up
    at_kill = coll.count_documents({})
    killed.set()  # the stream goes on while the archiver is down and coming back
    rstack.restart_component(arch)
    log = sender.finish()

    assert log.errors == [], f"ingestion calls failed: {log.errors}"
    assert len(log.rejected) == noise and all("type" in r for r in log.rejected.values()), log.rejected
    assert len(log.duplicates) == noise, log.duplicates
    assert_exactly([e.event_id for e in events], log.accepted, "accepted ids")
    assert 0 < at_kill < N, f"kill did not land mid-stream ({at_kill} of {N} archived): the test proves nothing"

    wait_for(
        lambda: coll.count_documents({}) >= N,
        120,
        lambda: (
            f"archive incomplete: {id_diff(log.accepted, archived_ids(mongo_client['stylerec']))}\n"
            f"{log_tail(rstack, arch)}"
        ),
    )
    # Exactly the accepted ids, each once, nothing else (rejected ids never archived).
    assert_exactly(log.accepted, archived_ids(mongo_client["stylerec"]), "archived ids")
    # And each document is the event as accepted: pseudonymized user, item, type, time.
    by_id = {e.event_id: e for e in events}
    wrong = []
    for d in coll.find({}):
        e = by_id[d["_id"]]
        want = (PSEUDONYMIZE(e.user_id), e.item_id, int(e.type), e.timestamp.seconds + e.timestamp.nanos / 1e9)
        if (d["user_id"], d["item_id"], d["type"], d["ts"]) != want:
            wrong.append((d["_id"], d["user_id"], d["item_id"], d["type"], d["ts"], want))
    assert not wrong, f"{len(wrong)} archived documents differ from the accepted events: {wrong[:5]}"
