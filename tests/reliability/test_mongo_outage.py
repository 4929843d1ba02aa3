"""Scenario 4: the Mongo-protocol server is SIGKILLed while events stream in. Ingestion
keeps accepting every event (they only need Kafka; the archive is downstream of the
topic), the archiver fails its writes and retries without committing, and once the
server is back on the same port with the same SQLite file the archive catches up to
exactly the accepted events: none lost, none twice, nothing else.
"""

from __future__ import annotations

import threading
from typing import Any

import pytest
from pymongo import MongoClient

from cli.localstack.stack import Stack, pid_alive
from tests.reliability.conftest import (
    EventSender,
    archived_ids,
    assert_exactly,
    events_for,
    id_diff,
    log_tail,
    metric_value,
    start,
    wait_for,
)

pytestmark = pytest.mark.integration

N, BATCH = 1200, 50


def archiver_errors(stack: Stack, name: str) -> float | None:
    return metric_value(
        stack, name, "stylerec_kafka_messages_consumed_total", group="archiver", topic="user-events", outcome="error"
    )


def test_mongo_outage_ingestion_keeps_accepting_and_archive_catches_up_exactly(
    rstack: Stack, mongo_client: MongoClient[Any]
) -> None:
    # role "all" (the local default): API and archiver in one process, so this also shows the
    # archiver's retry loop against a dead store does not disturb the API next to it.
    ing = start(rstack, "ingestion", "ingestion", {"STYLEREC_ARCHIVER_MAX_POLL_RECORDS": "100"})
    coll = mongo_client["stylerec"]["events"]
    events = events_for("mgo", N)
    n_batches = N // BATCH
    down = threading.Event()
    sender = EventSender(rstack.addr_of(ing), events, BATCH, gates={n_batches // 3: down})
    sender.start()
    sender.wait_batches(n_batches // 3)
    wait_for(lambda: coll.count_documents({}) > 0, 60, lambda: f"archiver wrote nothing\n{log_tail(rstack, ing)}")

    rstack.kill_component("mongo")
    assert not pid_alive(rstack.components["mongo"].pid)
    down.set()
    log = sender.finish()
    # Every event sent while the archive was down was accepted: Kafka buffers them.
    assert log.errors == [], f"ingestion failed calls during the Mongo outage: {log.errors}"
    assert_exactly([e.event_id for e in events], log.accepted, "accepted ids")
    # The archiver noticed: batches failed (and were rewound, not committed) while the server was down.
    wait_for(
        lambda: (archiver_errors(rstack, ing) or 0) > 0,
        60,
        lambda: f"the archiver never failed a batch while Mongo was down\n{log_tail(rstack, ing)}",
    )
    rstack.restart_component("mongo")  # same port, same SQLite file
    wait_for(
        lambda: coll.count_documents({}) >= N,
        120,
        lambda: (
            f"archive did not catch up: {id_diff(log.accepted, archived_ids(mongo_client['stylerec']))}\n"
            f"{log_tail(rstack, ing)}"
        ),
    )
    assert_exactly(log.accepted, archived_ids(mongo_client["stylerec"]), "archived ids after the outage")
