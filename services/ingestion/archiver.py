"""The archiver: ``user-events`` → MongoDB ``events``, exactly once in effect.

It runs as its own consumer group (``archiver``) on top of
:class:`libs.common.kafka.ProtoConsumerLoop`, which commits offsets only after
the handler returned. A crash (even SIGKILL) between the bulk write and the
commit replays the batch; the write inserts by event id and upserts the ids
already there, so the replay rewrites the same documents and MongoDB ends with
every event exactly once. Records that do not decode, or that are not a
pseudonymized event, go to ``dlq-ingestion`` with the reason (and without any
raw user id they may hold, libs/common/privacy.py) and are committed like the
rest. Events of users on the suppression list (AdminService.ForgetUser) are
dropped, so an event still in flight when its user was forgotten never reaches
the archive again.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from kafka import KafkaProducer
from kafka.errors import KafkaError
from pymongo import UpdateOne
from pymongo.database import Database
from pymongo.errors import BulkWriteError
from stylerec.v1 import common_pb2

from libs.common.archive_progress import ProgressWriter
from libs.common.kafka import Decoded, ProtoConsumerLoop, ProtoProducer, kafka_security
from libs.common.metrics import STORE_ERRORS
from libs.common.privacy import ForgottenUsers, UserRefs, redact_user_event
from libs.common.stores import with_retries
from services.ingestion import metrics
from services.ingestion.config import IngestionSettings
from services.ingestion.validation import KNOWN_TYPES, PSEUDONYM_RE, check_id

log = logging.getLogger(__name__)

DUPLICATE_KEY = 11000  # MongoDB's error code for an _id that is already there


def archived_problem(event: common_pb2.Event) -> str | None:
    """Why a record on the topic cannot be archived. Deliberately lenient on time:
    replaying an old topic must not dead-letter history."""
    problem = check_id("event_id", event.event_id, 1024)
    if problem:
        return problem
    if not PSEUDONYM_RE.match(event.user_id):
        return "user_id is not a pseudonym (raw ids are never archived)"
    if not event.item_id:
        return "item_id is required"
    if event.type not in KNOWN_TYPES:
        return f"type {event.type} is unknown"
    return None


def event_document(event: common_pb2.Event, archived_at: float | None = None) -> dict[str, Any]:
    """The ``events`` collection row (docs/contracts.md); ``_id`` is the event id.

    ``archived_at`` (this process's clock at the write; one value per bulk write, taken from the
    archive progress, libs/common/archive_progress.py) is what scoring's archive sync tails:
    an event can reach the archive long after its own ``ts`` (a lagging or crashed archiver,
    a backfill of old events), and a tail by ``ts`` alone would never see it.
    """
    return {
        "archived_at": time.time() if archived_at is None else archived_at,
        "user_id": event.user_id,
        "item_id": event.item_id,
        "type": int(event.type),
        "ts": event.timestamp.seconds + event.timestamp.nanos / 1e9,
        "value": event.value,
        "context": {
            "session_id": event.context.session_id,
            "device": event.context.device,
            "page": event.context.page,
        },
        "recommendation_id": event.recommendation_id,
    }


class EventArchiver:
    """Batch handler: one unordered bulk insert per polled batch; ids already archived are upserted."""

    # archived_at: scoring's archive tail reads a range of it every few seconds; user_id:
    # ForgetUser deletes by it. Without them MongoDB scans the whole archive for both.
    INDEXES = ("archived_at", "user_id")

    def __init__(
        self,
        db: Database,
        collection: str,
        forgotten: ForgottenUsers | None = None,
        progress: ProgressWriter | None = None,
    ) -> None:
        self.collection = db[collection]
        self.forgotten = forgotten
        self.progress = progress
        self._indexed = False

    def ensure_indexes(self) -> None:
        """Idempotent; tried on each batch until it worked once (the store may be down at start)."""
        if self._indexed:
            return
        try:
            for field in self.INDEXES:
                self.collection.create_index(field)
        except Exception as exc:
            STORE_ERRORS.labels("mongo", "archive_create_index").inc()
            log.warning("archive indexes not created yet", extra={"error": type(exc).__name__})
            return
        self._indexed = True

    def __call__(self, batch: list[Decoded[common_pb2.Event]]) -> None:
        self.ensure_indexes()
        if self.forgotten is not None:
            # One query per batch; if it fails the batch is retried, never archived unchecked.
            gone = self.forgotten.forgotten_among(d.message.user_id for d in batch)
            if gone:
                batch = [d for d in batch if d.message.user_id not in gone]
                if not batch:
                    return
        # One stamp for the batch, published as visible once the write returned: scoring's tail
        # then re-reads at most the batch in flight instead of a window of time.
        stamp = self.progress.begin() if self.progress is not None else None
        # Later records of the same id win within a batch; across batches a replayed id is upserted.
        docs = {d.message.event_id: event_document(d.message, stamp) for d in batch}
        start = time.perf_counter()
        try:
            with_retries(lambda: self._write(docs))
        except Exception:
            STORE_ERRORS.labels("mongo", "archive_bulk_write").inc()
            raise
        finally:
            if self.progress is not None:
                self.progress.done()
        metrics.ARCHIVE_WRITE_SECONDS.observe(time.perf_counter() - start)
        metrics.ARCHIVED.inc(len(docs))

    def _write(self, docs: dict[str, dict[str, Any]]) -> None:
        """Insert, then upsert only the ids already there (a replay after a crash, or a retry of a
        write that half-landed), so a replay still ends with the replayed documents. Nearly every
        batch is new events: an insert costs the Mongo-protocol stand-in two thirds of an upsert
        (1,000 documents: 13,100 against 8,700 a second), and the event archive's write was 80%
        of its handler when it ended a soak 62 s of writes behind (docs/load.md)."""
        ids = list(docs)
        try:
            self.collection.insert_many([{"_id": eid, **docs[eid]} for eid in ids], ordered=False)
        except BulkWriteError as exc:
            errors = exc.details.get("writeErrors", [])
            if not errors or any(e.get("code") != DUPLICATE_KEY for e in errors):
                raise
            again = [ids[e["index"]] for e in errors]
            self.collection.bulk_write(
                [UpdateOne({"_id": eid}, {"$set": docs[eid]}, upsert=True) for eid in again], ordered=False
            )


class DeadLetterProducer(ProtoProducer):
    """ProtoProducer whose KafkaProducer is not idempotent: kafka-python 3's idempotent producer
    never recovers once a batch expires (see publisher.producer_config), which would leave the
    archiver unable to dead-letter anything after a broker stall, i.e. stuck."""

    def __init__(self, bootstrap: list[str], client_id: str, security: dict[str, Any] | None = None) -> None:
        self._producer = KafkaProducer(
            bootstrap_servers=bootstrap,
            client_id=client_id,
            acks="all",
            retries=3,
            enable_idempotence=False,
            max_in_flight_requests_per_connection=1,
            linger_ms=5,
            max_block_ms=5000,
            request_timeout_ms=10000,
            bootstrap_timeout_ms=5000,
            **(security or {}),
        )


class ArchiverRunner:
    """Starts the consumer loop once the broker answers (retrying in the background), so an
    ingestion process started before Kafka still comes up; stops it on shutdown."""

    def __init__(self, settings: IngestionSettings, db: Database, refs: UserRefs | None = None) -> None:
        self.settings = settings
        self.db = db
        self.forgotten = ForgottenUsers(db, refs) if refs is not None else None
        self.loop: ProtoConsumerLoop[common_pb2.Event] | None = None
        self.producer: ProtoProducer | None = None
        self.progress = ProgressWriter(db, settings.archive_progress_collection)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._start_loop, name="archiver-start", daemon=True)

    def start(self) -> ArchiverRunner:
        self._thread.start()
        return self

    def _start_loop(self) -> None:
        s = self.settings
        while not self._stop.is_set():
            try:
                self.producer = self.producer or DeadLetterProducer(
                    s.kafka_servers, client_id="ingestion-archiver", security=kafka_security(s)
                )
                self.loop = ProtoConsumerLoop(
                    bootstrap=s.kafka_servers,
                    group_id=s.archiver_group,
                    topics=[s.events_topic],
                    message_type=common_pb2.Event,
                    handle=EventArchiver(self.db, s.events_collection, self.forgotten, self.progress),
                    producer=self.producer,
                    service="ingestion",
                    max_poll_records=s.archiver_max_poll_records,
                    fetch_max_wait_ms=s.archive_fetch_max_wait_ms,
                    poll_tick_s=s.archive_poll_tick_ms / 1000,
                    max_poll_interval_ms=s.kafka_max_poll_interval_ms,
                    session_timeout_ms=s.kafka_session_timeout_ms,
                    validate=archived_problem,
                    redact=redact_user_event,
                    security=kafka_security(s),
                ).start()
                self.progress.start()
                log.info("archiver started", extra={"group": s.archiver_group, "topic": s.events_topic})
                return
            except KafkaError as exc:
                log.warning("archiver cannot reach the broker yet", extra={"error": str(exc)})
                self._stop.wait(1.0)

    @property
    def running(self) -> bool:
        return self.loop is not None

    def stop(self) -> None:
        self._stop.set()
        if self.loop is not None:
            self.loop.stop()
            self.progress.stop()
        if self.producer is not None:
            self.producer.close()
