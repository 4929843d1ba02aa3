"""The archive tail (services/scoring/consumer.py ArchiveSync) against the real Mongo-protocol
server: it finds everything archived after its cursor (late events with old timestamps and
writes that became visible out of order included). On the archivers' progress documents it
re-reads only the batches in flight, whatever the write rate; on the slack fallback only the
slack window each tick, however large the archive. The Publisher it writes through is a
recording fake."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterable, Iterator
from typing import Any

import pytest
from pymongo import MongoClient
from pymongo.database import Database

from cli.localstack.stack import Stack
from libs.common.archive_progress import STALE_S, ProgressWriter, live_progress
from libs.common.kafka import partition_of
from services.scoring.config import ScoringSettings
from services.scoring.consumer import ArchiveSync, CategoryCache
from services.scoring.interactions import InteractionState
from services.scoring.trainer import archive_events, newest_archived_at

WEIGHTS = {1: 1.0, 2: 2.0, 3: 4.0, 4: 6.0, 5: 10.0}
T0 = 1_790_000_000.0  # archiver clock of the first old document
SLACK = 30.0


class RecordingPublisher:
    def __init__(self) -> None:
        self.written: list[str] = []

    def users(self, users: Iterable[str], profiles: bool = True) -> None:
        self.written.extend(users)


@pytest.fixture
def archive(infra: Stack) -> Iterator[tuple[Database[dict[str, Any]], str]]:
    client: MongoClient[dict[str, Any]] = MongoClient(infra.mongo_uri)
    name = f"events_sync_{uuid.uuid4().hex[:8]}"
    db = client["stylerec"]
    db[name].create_index("archived_at")
    try:
        yield db, name
    finally:
        db[name].drop()
        client.close()


def doc(n: int, archived_at: float, ts: float, tag: str = "old") -> dict[str, Any]:
    return {
        "_id": f"{tag}-{n}",
        "user_id": f"u_{n % 40:032x}",
        "item_id": f"i{n % 90}",
        "type": 1 + n % 5,
        "ts": ts,
        "value": 0.0,
        "archived_at": archived_at,
    }


def make_sync(
    db: Database[dict[str, Any]], collection: str, progress_collection: str = ""
) -> tuple[ArchiveSync, InteractionState, RecordingPublisher]:
    """A sync on the slack rule, or (``progress_collection`` given) on the archivers' progress."""
    settings = ScoringSettings(
        events_collection=collection,
        archive_slack_s=SLACK,
        archive_sync_s=1.0,
        archive_tail="progress" if progress_collection else "slack",
        archive_progress_collection=progress_collection or "archive_progress",
    )
    state = InteractionState(WEIGHTS, 30 * 86400.0)
    pub = RecordingPublisher()
    sync = ArchiveSync(
        settings,
        db,
        state,
        pub,  # type: ignore[arg-type]
        CategoryCache(None, "items"),
        owned_partitions=lambda: list(range(6)),
    )
    return sync, state, pub


def test_tail_reads_only_the_slack_window_and_finds_late_and_out_of_order_writes(
    archive: tuple[Database[dict[str, Any]], str],
) -> None:
    db, name = archive
    coll = db[name]
    # 3000 documents archived one a second over the last 50 minutes (archiver clock).
    old = [doc(n, T0 + n, T0 + n) for n in range(3000)]
    coll.insert_many(old)
    newest = T0 + 2999

    sync, state, pub = make_sync(db, name)
    sync.begin()  # before the rebuild, as run_serving does
    assert sync.cursor == newest
    assert state.apply_all(archive_events(db, name)) == 3000  # the start-up rebuild

    # Archived after the rebuild: one event timestamped a week ago (a lagging archiver or a
    # backfill), fresh ones, and one whose archived_at is 20 s *older* than the cursor (a bulk
    # write stamped before, visible only now) - all within the slack.
    coll.insert_many(
        [
            doc(1, newest + 2, T0 - 7 * 86400, "late"),
            *[doc(n, newest + 3 + n, newest + 3 + n, "new") for n in range(5)],
            doc(2, newest - 20, newest - 20, "slow"),
        ]
    )
    assert sync.sync_once() == 7
    in_window = sum(1 for d in old if d["archived_at"] >= newest - SLACK) + 7
    assert sync.last_read == in_window  # not the 3000 old ones
    assert sync.cursor == newest + 7
    assert state.events == 3007
    late_user = doc(1, 0, 0)["user_id"]
    assert late_user in pub.written and all(partition_of(u) in range(6) for u in pub.written)

    # Nothing new: the next tick re-reads just the slack window and applies nothing.
    pub.written.clear()
    assert sync.sync_once() == 0
    assert sync.last_read == sum(1 for d in coll.find({"archived_at": {"$gte": newest + 7 - SLACK}}))
    assert sync.last_read < 40
    assert pub.written == []
    assert state.events == 3007


def test_empty_archive_then_first_documents_are_read(archive: tuple[Database[dict[str, Any]], str]) -> None:
    db, name = archive
    sync, state, _ = make_sync(db, name)
    sync.begin()
    assert sync.cursor is None and newest_archived_at(db, name) is None
    assert sync.sync_once() == 0
    db[name].insert_many([doc(n, T0 + n, T0 + n) for n in range(10)])
    assert sync.sync_once() == 10
    assert sync.cursor == T0 + 9 and state.events == 10


def test_full_read_after_a_failed_rebuild(archive: tuple[Database[dict[str, Any]], str]) -> None:
    db, name = archive
    db[name].insert_many([doc(n, T0 + n, T0 + n) for n in range(500)])
    sync, _, _ = make_sync(db, name)
    sync.begin()
    sync.full_needed = True  # what bootstrap sets when the rebuild raised
    assert sync.sync_once() == 500
    assert sync.last_read == 500 and not sync.full_needed
    assert sync.sync_once() == 0 and sync.last_read <= SLACK + 1


# ---------------------------------------------------------------- progress-driven tail
class Archiver:
    """Writes batches the way services/ingestion/archiver.py does: a ProgressWriter stamps the
    batch, the bulk write lands, the progress is published."""

    def __init__(self, db: Database[dict[str, Any]], events: str, progress: str, clock_offset_s: float = 0.0) -> None:
        self.writer = ProgressWriter(db, progress, clock=lambda: time.time() + clock_offset_s)
        self.db, self.events = db, events
        self.n = 0

    def stamp(self) -> float:
        return self.writer.begin()

    def write(self, stamp: float, count: int, tag: str) -> None:
        self.db[self.events].insert_many(
            [doc(self.n + k, stamp, stamp, f"{tag}-{self.writer.id}") for k in range(count)]
        )
        self.n += count

    def batch(self, count: int, tag: str = "b") -> None:
        stamp = self.stamp()
        self.write(stamp, count, tag)
        self.writer.done()


@pytest.fixture
def progress_name(archive: tuple[Database[dict[str, Any]], str]) -> Iterator[str]:
    db, _ = archive
    name = f"progress_{uuid.uuid4().hex[:8]}"
    try:
        yield name
    finally:
        db[name].drop()


def test_progress_tail_rereads_only_what_was_in_flight_whatever_the_write_rate(
    archive: tuple[Database[dict[str, Any]], str], progress_name: str
) -> None:
    db, name = archive
    arch = Archiver(db, name, progress_name)
    for _ in range(5):
        arch.batch(400)  # history before the replica starts
    sync, state, pub = make_sync(db, name, progress_name)
    sync.begin()
    assert state.apply_all(archive_events(db, name)) == 2000  # the start-up rebuild

    # A heavy stream: 10 batches of 500 between two ticks. The slack rule would re-read all of
    # them again next tick (they are seconds old); the progress tail reads each once.
    for _ in range(10):
        arch.batch(500)
    assert sync.sync_once() == 5000 and sync.last_mode == "progress"
    assert sync.last_read == 5000
    assert sync.sync_once() == 0 and sync.last_read == 0

    # A batch stamped before the tick but visible only after it (a bulk write in flight).
    stamp = arch.stamp()
    assert sync.sync_once() == 0
    arch.write(stamp, 300, "slow")
    arch.writer.done()
    arch.batch(200)
    assert sync.sync_once() == 500
    assert sync.last_read == 500  # the in-flight batch and the next one, nothing older
    assert state.events == 7500
    assert pub.written and all(partition_of(u) in range(6) for u in pub.written)


def test_progress_tail_finds_a_new_archiver_whose_clock_is_behind(
    archive: tuple[Database[dict[str, Any]], str], progress_name: str
) -> None:
    db, name = archive
    fast = Archiver(db, name, progress_name)
    fast.batch(100)
    sync, state, _ = make_sync(db, name, progress_name)
    sync.begin()
    state.apply_all(archive_events(db, name))
    fast.batch(100)
    assert sync.sync_once() == 100
    # A second archiver starts whose clock runs 60 s behind: its stamps are older than anything
    # the tail has read, and it is found because it is new (read from its own started_at).
    slow = Archiver(db, name, progress_name, clock_offset_s=-60.0)
    slow.batch(50, "slow")
    fast.batch(10)
    assert sync.sync_once() == 60
    assert state.events == 260
    # Next tick: both known, the bound is the slow archiver's, nothing re-read twice over.
    assert sync.sync_once() == 0


def test_a_dead_archiver_does_not_hold_the_tail_back(
    archive: tuple[Database[dict[str, Any]], str], progress_name: str
) -> None:
    db, name = archive
    alive = Archiver(db, name, progress_name)
    alive.batch(100)
    # A killed archiver leaves its document behind; its heartbeat stops.
    db[progress_name].insert_one(
        {"_id": "dead", "started_at": T0, "safe_before": T0, "heartbeat": time.time() - 10 * STALE_S}
    )
    sync, state, _ = make_sync(db, name, progress_name)
    sync.begin()
    state.apply_all(archive_events(db, name))
    alive.batch(100)
    assert sync.sync_once() == 100 and sync.last_read == 100
    assert [p.archiver for p in live_progress(db, progress_name)] == [alive.writer.id]


def test_without_progress_documents_the_tail_falls_back_to_the_slack_rule(
    archive: tuple[Database[dict[str, Any]], str], progress_name: str
) -> None:
    db, name = archive
    db[name].insert_many([doc(n, T0 + n, T0 + n) for n in range(100)])
    sync, state, _ = make_sync(db, name, progress_name)  # progress mode, but no archiver publishes
    sync.begin()
    state.apply_all(archive_events(db, name))
    db[name].insert_many([doc(n, T0 + 100 + n, T0 + 100 + n, "more") for n in range(5)])
    assert sync.sync_once() == 5 and sync.last_mode == "slack"
    assert sync.last_read == sum(1 for _ in db[name].find({"archived_at": {"$gte": T0 + 99 - SLACK}}))
