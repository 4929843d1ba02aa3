"""Serving replica's event path: ``user-events`` → state → fold-in → Redis, plus the two
background feeds that keep a replica consistent with the cluster:

* :class:`ArchiveSync` tails the MongoDB archive, so events of users on *other*
  replicas' partitions (needed for popularity, for training-free consistency and for
  users that move here on a rebalance) reach this replica's state too;
* :class:`ModelUpdates` listens on ``model-updates`` (every replica sees every message:
  no consumer group) and hot-loads new versions, with a registry poll as a safety net.

Offsets of ``user-events`` are committed by ProtoConsumerLoop only after
:class:`EventApplier` returned, i.e. after Redis was rewritten.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterable

import redis
from kafka import KafkaConsumer, TopicPartition
from kafka.errors import KafkaError
from pymongo.database import Database
from stylerec.v1 import common_pb2, scoring_pb2

from libs.common import keys
from libs.common.archive_progress import Progress, TailCursor, live_progress
from libs.common.kafka import MODEL_UPDATES, USER_EVENTS, Decoded, kafka_security, partition_of
from libs.common.metrics import STORE_ERRORS
from services.scoring import metrics
from services.scoring.config import ScoringSettings
from services.scoring.foldin import ModelHolder, Recommender, RecsWriter
from services.scoring.interactions import EventRecord, InteractionState
from services.scoring.registry import ModelRegistry, ServingModel
from services.scoring.style_profile import ProfileWriter, StyleProfile
from services.scoring.trainer import archive_events, newest_archived_at

log = logging.getLogger(__name__)

KNOWN_TYPES = {1, 2, 3, 4, 5}


def event_problem(event: common_pb2.Event) -> str | None:
    """Why an event cannot be applied (the record then goes to dlq-scoring with this reason)."""
    if not event.event_id:
        return "event_id is required"
    if not event.user_id:
        return "user_id is required"
    if not event.user_id.startswith("u_"):
        # The topic carries pseudonyms only (the archiver checks their exact form); anything
        # else may be a raw id, which must not become a Redis key.
        return "user_id is not a pseudonym"
    if not event.item_id:
        return "item_id is required"
    if event.type not in KNOWN_TYPES:
        return f"type {event.type} is unknown"
    return None


class CategoryCache:
    """item → category and the newest catalog arrivals, from MongoDB ``items``; refreshed by
    the archive sync (plain find with a projection: the catalog is small next to the events)."""

    def __init__(self, db: Database | None, collection: str, arrivals: int = 200) -> None:
        self.db = db
        self.collection = collection
        self.arrivals = arrivals
        self._map: dict[str, str] = {}
        self._newest: list[tuple[str, float]] = []

    def refresh(self) -> None:
        if self.db is None:
            return
        try:
            docs = list(self.db[self.collection].find({}, {"category": 1, "created_at": 1}))
        except Exception:
            STORE_ERRORS.labels("mongo", "item_categories").inc()
            return
        self._map = {str(d["_id"]): str(d.get("category") or "") for d in docs}
        dated = []
        for d in docs:
            try:
                dated.append((str(d["_id"]), float(d.get("created_at") or 0.0)))
            except (TypeError, ValueError):
                continue
        dated.sort(key=lambda it: (-it[1], it[0]))
        self._newest = dated[: self.arrivals]

    def __call__(self) -> dict[str, str]:
        return self._map

    def newest(self) -> list[tuple[str, float]]:
        """Newest catalog items first: (item id, created_at)."""
        return self._newest


class Publisher:
    """Everything this replica writes to Redis: per-user recs/seen/profile and popularity."""

    def __init__(
        self,
        settings: ScoringSettings,
        r: redis.Redis,
        state: InteractionState,
        engine: Recommender,
        profiles: ProfileWriter,
        categories: CategoryCache,
    ) -> None:
        self.settings = settings
        self.redis = r
        self.state = state
        self.engine = engine
        # With repeat_policy decay the user's own items may come back: the lists keep them.
        exclude_seen = settings.recs_exclude_seen and settings.repeat_policy == "off"
        self.recs = RecsWriter(
            r, engine, settings.top_n, settings.recs_ttl_s, exclude_seen, known_ttl_s=settings.known_user_ttl_s
        )
        self.profiles = profiles
        self.categories = categories
        self._pop_at = 0.0
        self._pop_dirty = False
        self._pop_lock = threading.Lock()
        # Compute-and-write of Redis output is serialized: the consumer, the archive sync and
        # the ownership rewrite all write users, and without it a writer that computed from an
        # older state could finish last and leave stale recs behind.
        self._write_lock = threading.RLock()
        self._stop = threading.Event()
        self._flusher = threading.Thread(target=self._flush_loop, name="popularity-flush", daemon=True)

    def start(self) -> Publisher:
        """Trailing writes for throttled popularity updates (the last batch of a burst counts too)."""
        self._flusher.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def _flush_loop(self) -> None:
        every = max(0.2, self.settings.popular_every_s)
        while not self._stop.wait(every):
            if self._pop_dirty:
                try:
                    self.popularity()
                except Exception:
                    log.warning("popularity flush failed", exc_info=True)

    def users(self, users: Iterable[str], profiles: bool = True, added: dict[str, set[str]] | None = None) -> None:
        """Rewrite recs (and, unless ``profiles`` is False, style profiles) of ``users``.

        Profiles depend on history and embeddings only, not on the model, so a model swap
        or a rebalance rewrites recs alone; a user's next event refreshes the profile.
        ``added``: the items each user's history gained in the caller's batch (RecsWriter).
        """
        users = list(dict.fromkeys(users))
        if not users:
            return
        prefetched = None
        if profiles:
            try:
                prefetched = self.profiles.lookup(self.state.items_of(users))
            except redis.RedisError:
                STORE_ERRORS.labels("redis", "style_profile").inc()
                raise
        written: dict[str, StyleProfile | None] = {}

        def queue_profiles(pipe: redis.client.Pipeline, part: dict[str, dict[str, float]], scale: float) -> None:
            try:
                written.update(self.profiles.queue_many(pipe, part, prefetched, scale))
            except redis.RedisError:
                STORE_ERRORS.labels("redis", "style_profile").inc()
                raise

        with self._write_lock:
            marks = self.state.write_marks(users, self.engine.holder.version)
            # Read once under the lock: recs, seen sets and profiles all come from this state,
            # and go out in the same MULTI/EXEC per chunk of users.
            histories, scale = self.state.stored_histories(users)
            self.recs.write_users(
                users, histories=histories, scale=scale, added=added, also=queue_profiles if profiles else None
            )
            if not profiles:
                return
            self.state.mark_written(marks)
        for p in written.values():
            metrics.PROFILES_WRITTEN.labels("written" if p else "none").inc()

    def popularity(self, force: bool = False) -> None:
        now = time.monotonic()
        with self._pop_lock:
            if not force and now - self._pop_at < self.settings.popular_every_s:
                self._pop_dirty = True
                return
            self._pop_at = now
            self._pop_dirty = False
        with self._write_lock:
            self._write_popularity()
        metrics.STATE_USERS.set(self.state.n_users)
        metrics.STATE_ITEMS.set(self.state.n_items)
        metrics.STATE_PAIRS.set(self.state.n_pairs)
        metrics.STATE_APPLIED_IDS.set(self.state.n_applied_ids)

    def _write_popularity(self) -> None:
        n = self.settings.popular_size
        pipe = self.redis.pipeline(transaction=True)
        top = self.state.popular(n)
        pipe.delete(keys.popular())
        if top:
            pipe.zadd(keys.popular(), dict(top))
        by_cat: dict[str, set[str]] = {}
        for item, cat in self.categories().items():
            if cat:
                by_cat.setdefault(cat, set()).add(item)
        for cat, items in by_cat.items():
            ctop = self.state.popular(n, only=items)
            pipe.delete(keys.popular(cat))
            if ctop:
                pipe.zadd(keys.popular(cat), dict(ctop))
        pipe.set(keys.model_version(), self.engine.holder.version)
        pipe.execute()


class EventApplier:
    """ProtoConsumerLoop handler: apply, fold in, write; raise to have the batch retried."""

    def __init__(self, state: InteractionState, publisher: Publisher) -> None:
        self.state = state
        self.publisher = publisher
        self.applied = 0  # new events seen by this replica (drives "retrain after N events")

    def __call__(self, batch: list[Decoded[common_pb2.Event]]) -> None:
        """One poll = one micro-batch: the state takes the whole batch under one lock, each user
        it touched is folded in once (however many of their events the poll held), all of them
        through one batched model call and one Redis transaction per chunk, then the consumer
        loop commits. A poll returns what the broker already has (``max_poll_records`` at most),
        so the batch grows with the backlog and stays one event when the shop is quiet: no wait
        to fill it ever adds latency."""
        records = [
            EventRecord(e.event_id, e.user_id, e.item_id, int(e.type), e.timestamp.seconds + e.timestamp.nanos / 1e9)
            for e in (d.message for d in batch)
        ]
        fresh = self.state.apply_many(records)
        users: set[str] = set()
        duplicates: set[str] = set()
        added: dict[str, set[str]] = {}
        for ev, new in zip(records, fresh, strict=True):
            (users if new else duplicates).add(ev.user_id)
            if new:
                added.setdefault(ev.user_id, set()).add(ev.item_id)
        n_new = sum(fresh)
        self.applied += n_new
        metrics.EVENTS_APPLIED.labels("kafka", "new").inc(n_new)
        metrics.EVENTS_APPLIED.labels("kafka", "duplicate").inc(len(records) - n_new)
        # A duplicate still rewrites its user unless this process already wrote them from their
        # current state: a replay after a crash must leave Redis right, but an event the archive
        # sync applied (and wrote) first while this consumer was behind needs no second fold-in;
        # under a backlog that second fold-in had doubled scoring's work (docs/load.md).
        version = self.publisher.engine.holder.version
        users |= {u for u in duplicates - users if self.state.needs_write(u, version)}
        # Popularity first: a reader that sees the user's new recs must also see the popularity
        # they were computed against (the gateway caches popularity briefly).
        self.publisher.popularity()
        self.publisher.users(users, added=added)
        done = time.time()
        for d in batch:
            if d.record.timestamp and d.record.timestamp > 0:
                metrics.FRESHNESS_SECONDS.observe(max(0.0, done - d.record.timestamp / 1000.0))


class ArchiveSync:
    """Tails the archive every ``archive_sync_s`` by ``archived_at``, the archiver's clock at
    the write.

    Where each read starts: the archivers publish how far their writes are visible
    (libs/common/archive_progress.py); a read starts at the smallest such bound seen before the
    previous read (or at the start of an archiver seen for the first time), so it re-reads at
    most the batches that were in flight then, whatever the write rate. Without progress
    documents (archivers of an older release) it falls back to the slack rule: re-read what was
    archived up to ``archive_slack_s`` before the newest document read, which covers bulk writes
    visible out of order and clock skew between archivers but re-reads slack x write rate
    documents every tick (35,000 a tick at 1,000 events/s, which made scoring fall behind).
    What is read twice is absorbed by the state's event-id dedup.

    Tailing by archive time and not by event time is what finds events archived late with old
    timestamps: a replica that crashed after committing events the archiver had not written
    yet gets them back only from the archive, and only this way. (An earlier version also
    re-read every event timestamped within the last 10 minutes, each tick, through an ``$or``:
    at 160 events/s that was up to 178,000 documents a tick, 76 s per 5 s tick on nx-27017,
    and scoring fell behind; docs/load.md.)

    Nothing here holds the publisher's write lock while it reads MongoDB: documents are read and
    applied to the state (which has its own short lock) first; then users of this replica's
    partitions whose state changed are rewritten: their recs were computed without these events
    (after a crash, from the rebuilt state), and no Kafka record of theirs may ever come again
    to trigger it. A user the consumer already wrote from the same state is not folded in again
    (the events read back were duplicates, so the user is not "changed").
    """

    def __init__(
        self,
        settings: ScoringSettings,
        db: Database,
        state: InteractionState,
        publisher: Publisher,
        categories: CategoryCache,
        owned_partitions: Callable[[], list[int]] | None = None,
    ) -> None:
        self.settings = settings
        self.db = db
        self.state = state
        self.publisher = publisher
        self.categories = categories
        self.owned_partitions = owned_partitions
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="archive-sync", daemon=True)
        # Set when the start-up rebuild failed: the next sync reads the whole archive.
        self.full_needed = False
        # Newest archived_at read (archiver's clock); None = the next sync reads everything.
        self.cursor: float | None = None
        self.tail = TailCursor()
        self.last_read = 0  # documents the last sync read (new or not), for tests and logs
        self.last_mode = ""  # how the last read chose its start: full, progress or slack

    def _progress(self) -> list[Progress]:
        if self.settings.archive_tail != "progress":
            return []
        return live_progress(self.db, self.settings.archive_progress_collection)

    def begin(self) -> None:
        """Call before the start-up rebuild reads the archive: the first sync then covers
        whatever was archived while (or after) the rebuild ran."""
        progress = self._progress()
        self.cursor = newest_archived_at(self.db, self.settings.events_collection)
        _, bound = self.tail.plan(progress)
        self.tail.advance(progress, bound)

    def sync_once(self) -> int:
        progress = self._progress()
        start, bound = self.tail.plan(progress)
        if self.full_needed or (self.cursor is None and start is None):
            since, self.last_mode = None, "full"
        elif start is not None:
            since, self.last_mode = start, "progress"
        else:
            assert self.cursor is not None
            since, self.last_mode = self.cursor - self.settings.archive_slack_s, "slack"
        n = read = 0
        newest = self.cursor
        changed: set[str] = set()
        chunk: list[EventRecord] = []

        def flush() -> int:
            fresh = self.state.apply_many(chunk)
            changed.update(ev.user_id for ev, new in zip(chunk, fresh, strict=True) if new)
            chunk.clear()
            return sum(fresh)

        for ev in archive_events(self.db, self.settings.events_collection, since):
            read += 1
            if newest is None or ev.archived_at > newest:
                newest = ev.archived_at
            chunk.append(ev)
            if len(chunk) >= 2000:
                n += flush()
        n += flush()
        self.full_needed = False
        self.cursor = newest
        self.tail.advance(progress, bound)
        self.last_read = read
        metrics.ARCHIVE_SYNC_READ.labels(self.last_mode).inc(read)
        metrics.EVENTS_APPLIED.labels("archive", "new").inc(n)
        self.categories.refresh()
        if changed and self.owned_partitions is not None:
            mine = set(self.owned_partitions())
            self.publisher.users([u for u in changed if partition_of(u) in mine])
        return n

    def start(self) -> ArchiveSync:
        if self.settings.archive_sync_s > 0:
            self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.settings.archive_sync_s):
            try:
                if self.sync_once():
                    self.publisher.popularity()
            except Exception:
                log.warning("archive sync failed", exc_info=True)

    def stop(self) -> None:
        self._stop.set()


class ModelUpdates:
    """Hot-loads published versions: ``model-updates`` messages plus a periodic registry poll."""

    def __init__(
        self,
        settings: ScoringSettings,
        registry: ModelRegistry,
        holder: ModelHolder,
        on_swap: Callable[[ServingModel], None],
    ) -> None:
        self.settings = settings
        self.registry = registry
        self.holder = holder
        self.on_swap = on_swap
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="model-updates", daemon=True)
        self._consumer: KafkaConsumer | None = None

    def install(self, sm: ServingModel) -> bool:
        if self.holder.swap(sm):
            log.info("model hot-loaded", extra={"version": sm.version, "algorithm": sm.algorithm})
            self.on_swap(sm)
            return True
        return False

    def load_latest(self) -> bool:
        doc = self.registry.latest()
        cur = self.holder.get()
        if doc is None or (cur is not None and cur.version == doc["_id"]):
            return False
        return self.install(self.registry.load(doc))

    def start(self) -> ModelUpdates:
        self._thread.start()
        return self

    def _connect(self) -> KafkaConsumer:
        c = KafkaConsumer(
            bootstrap_servers=self.settings.kafka_servers,
            group_id=None,
            enable_auto_commit=False,
            client_id=f"scoring-model-updates-{self.settings.replica_name}",
            **kafka_security(self.settings),
        )
        tp = TopicPartition(MODEL_UPDATES, 0)
        c.assign([tp])
        c.seek_to_end(tp)
        return c

    def _run(self) -> None:
        last_poll = time.monotonic()
        while not self._stop.is_set():
            try:
                if self._consumer is None:
                    self._consumer = self._connect()
                polled = self._consumer.poll(timeout_ms=500)
                for records in polled.values():
                    for rec in records:
                        self._handle(rec.value)
            except KafkaError:
                log.warning("model-updates consumer error; retrying", exc_info=True)
                self._consumer = None
                self._stop.wait(1.0)
            except Exception:
                log.exception("model hot-load failed; keeping the current model")
                self._stop.wait(1.0)
            if self.settings.model_poll_s > 0 and time.monotonic() - last_poll > self.settings.model_poll_s:
                last_poll = time.monotonic()
                try:
                    self.load_latest()
                except Exception:
                    log.warning("registry poll failed", exc_info=True)

    def _handle(self, value: bytes | None) -> None:
        msg = scoring_pb2.ModelUpdate()
        try:
            msg.ParseFromString(value or b"")
        except Exception:
            log.warning("undecodable model-updates message ignored")
            return
        cur = self.holder.get()
        if not msg.model_version or (cur is not None and cur.version == msg.model_version):
            return
        sm = self.registry.load_version(msg.model_version)
        if sm is None:
            log.warning("model-updates names an unknown version", extra={"version": msg.model_version})
            return
        self.install(sm)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(3)
        if self._consumer is not None:
            with contextlib.suppress(KafkaError):
                self._consumer.close()


class Ownership:
    """Which users this replica owns (those on its assigned user-events partitions).

    When partitions arrive (start-up, rebalance) or a new model is installed, the owned
    users' top-N are rewritten from this replica's state, which already holds their
    history thanks to the archive rebuild and sync.
    """

    def __init__(
        self,
        assignment: Callable[[], set[TopicPartition]],
        state: InteractionState,
        publisher: Publisher,
        every_s: float = 1.0,
    ) -> None:
        self.assignment = assignment
        self.state = state
        self.publisher = publisher
        self.every_s = every_s
        self._last: set[int] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ownership", daemon=True)
        self._rewrite_lock = threading.Lock()

    def partitions(self) -> list[int]:
        try:
            return sorted(tp.partition for tp in self.assignment() if tp.topic == USER_EVENTS)
        except Exception:
            return []

    def owned_users(self, partitions: Iterable[int]) -> list[str]:
        wanted = set(partitions)
        return [u for u in self.state.users() if partition_of(u) in wanted]

    def rewrite(self, partitions: Iterable[int] | None = None) -> int:
        parts = list(partitions) if partitions is not None else self.partitions()
        users = self.owned_users(parts)
        with self._rewrite_lock:
            for start in range(0, len(users), 500):
                self.publisher.users(users[start : start + 500], profiles=False)
        self.publisher.popularity(force=True)
        return len(users)

    def rewrite_in_background(self) -> None:
        threading.Thread(target=self._safe_rewrite, name="rewrite-owned", daemon=True).start()

    def _safe_rewrite(self, partitions: Iterable[int] | None = None) -> None:
        try:
            n = self.rewrite(partitions)
            log.info("owned users rewritten", extra={"users": n})
        except Exception:
            log.warning("rewrite of owned users failed", exc_info=True)

    def start(self) -> Ownership:
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            current = set(self.partitions())
            gained = current - self._last
            if current != self._last:
                log.info("user-events partitions", extra={"partitions": sorted(current)})
            self._last = current
            if gained:
                self._safe_rewrite(gained)

    def stop(self) -> None:
        self._stop.set()
