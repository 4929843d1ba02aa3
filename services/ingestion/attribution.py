"""Impression archive and attribution: which shown item a click, cart or purchase belongs to.

Why here (the archiver role of ingestion) and not in a new service or in the gateway: ingestion
already owns the system of record in MongoDB (the event archive), the suppression list and
ForgetUser, and its archiver role is the one place that turns Kafka topics into MongoDB rows with
commit-after-write. Attribution is exactly that — two more consumer groups next to the event
archiver — so it reuses the same loop, dead-lettering, redaction and scaling knob
(``--role archiver``), and keeps the gateway's request path free of any store write.

Two consumer groups, both idempotent:

* ``impressions`` → MongoDB ``impressions`` (``_id`` = recommendation id, expired by ``shown_at``);
  afterwards the pending outcome events of those users are re-examined (an event may have been
  consumed before its impression: different topics, different lags);
* ``user-events`` → for CLICK / ADD_TO_CART / PURCHASE: the event is first *parked* in
  ``attribution_pending``, then matched: by its ``recommendation_id`` when it carries one, else to
  the same user's latest impression that showed the item within ``attribution_window_s`` before
  the event. A match writes ``attributions`` with ``_id`` = recommendation id | item | outcome via
  ``$setOnInsert``, so a replayed, duplicated or re-matched event never counts twice, and the
  ``stylerec_ingestion_attributed_total`` counter only moves when the row was new.

Store-then-look on both sides (park, then read impressions; archive impressions, then read the
parked events) means that whichever of the two arrives second finds the other: no interleaving
loses an outcome. Unmatched parked events expire after the window (:meth:`Attribution.expire`).

An event with a recommendation id names its impression, so it is settled as soon as that is
archived. An event without one is matched by "latest impression before it, else the earliest
within the clock skew after it", which is only right once every impression that can match it is
archived: one shown up to ``attribution_clock_skew_s`` after the event's time, archived by a
consumer that may lag behind the event consumer (it did on a cold start in the simulation, and a
list archived late would lose the click to an older one). So a window match is decided
``attribution_clock_skew_s + attribution_settle_s`` after the event's time (:attr:`decide_after_s`);
a sweeper decides events as they come due, and replayed old events are decided at once.

That is also what keeps the impression archive cheap: an impression archived within
``attribution_settle_s`` of being shown is there before any event it can match is decided, so
only the impressions of a lagging archive re-examine parked events (:meth:`Attribution._archive`).
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

from kafka.errors import KafkaError
from pymongo import UpdateOne
from pymongo.collection import Collection
from pymongo.database import Database
from stylerec.v1 import common_pb2

from libs.common.kafka import Decoded, ProtoConsumerLoop, ProtoProducer, kafka_security
from libs.common.metrics import STORE_ERRORS
from libs.common.privacy import ForgottenUsers, UserRefs, redact_impressions, redact_user_event
from libs.common.stores import with_retries
from services.ingestion import metrics
from services.ingestion.archiver import DeadLetterProducer, archived_problem
from services.ingestion.config import IngestionSettings
from services.ingestion.validation import PSEUDONYM_RE, RECOMMENDATION_ID_RE

log = logging.getLogger(__name__)


def plain_index(collection: Collection[dict[str, Any]], field: str) -> None:
    """An ascending index on ``field`` without expiry, replacing a TTL index on it (earlier releases)."""
    for name, spec in collection.index_information().items():
        if spec.get("key") == [(field, 1)] and "expireAfterSeconds" in spec:
            collection.drop_index(name)
            log.info("TTL index replaced by the expiry sweep", extra={"collection": collection.name, "index": name})
    collection.create_index(field)


def find_all(
    collection: Collection[dict[str, Any]],
    query: dict[str, Any],
    fields: Sequence[str] | None = None,
    newest: int = 0,
) -> list[dict[str, Any]]:
    """Every document ``query`` matches (only ``fields`` and ``_id`` when given; only the
    ``newest`` by ``ts`` when > 0), the whole read retried as one (a cursor is not resumable)."""
    sort = [("ts", -1)] if newest else None
    return with_retries(lambda: list(collection.find(query, fields, sort=sort, limit=newest)))


# What ``match`` and ``_record`` read of an impression.
SHOWING_FIELDS = ("user_id", "items", "ts", "experiment", "arm", "strategy")
SHOWING_PAGE = 50  # a user's newest impressions read at once by the window look-up
# Users whose outcomes one step of ``Attribution.resolve`` settles: their impressions (a page or
# more each) are what the step holds in memory, whatever the number of outcomes it was given.
RESOLVE_USERS = 50


# Event type -> outcome name (labels, report columns). VIEW and FAVORITE are not outcomes.
OUTCOMES: dict[int, str] = {
    common_pb2.CLICK: "click",
    common_pb2.ADD_TO_CART: "cart",
    common_pb2.PURCHASE: "purchase",
}


def impression_problem(imp: common_pb2.Impression) -> str | None:
    """Why an ``impressions`` record cannot be archived (it goes to the dead-letter topic)."""
    if not RECOMMENDATION_ID_RE.match(imp.recommendation_id):
        return "recommendation_id is not rec_ + 32 hex"
    if not PSEUDONYM_RE.match(imp.user_id):
        return "user_id is not a pseudonym (raw ids are never archived)"
    if not imp.HasField("shown_at"):
        return "shown_at is required"
    return None


def impressions_of(batch: common_pb2.ImpressionBatch) -> list[common_pb2.Impression]:
    """The impressions of an ``impressions`` record. A record from an older gateway holds one
    bare ``Impression``: it parses as a batch with none, its fields kept as unknown ones, and
    re-serializing gives its bytes back (common.proto, ImpressionBatch)."""
    if batch.impressions:
        return list(batch.impressions)
    raw = batch.SerializeToString()
    return [common_pb2.Impression.FromString(raw)] if raw else []


def batch_problem(batch: common_pb2.ImpressionBatch) -> str | None:
    """Why an ``impressions`` record cannot be archived. The record is the unit the consumer
    dead-letters, so one bad impression sends its batch there whole (redacted, replayable): only
    a faulty producer writes one, and its batch mates are kept rather than half-archived."""
    imps = impressions_of(batch)
    if not imps:
        return "empty impression batch"
    for n, imp in enumerate(imps):
        problem = impression_problem(imp)
        if problem:
            return problem if len(imps) == 1 else f"impression {n + 1} of {len(imps)}: {problem}"
    return None


def ts_of(msg: common_pb2.Event | common_pb2.Impression) -> float:
    t = msg.timestamp if isinstance(msg, common_pb2.Event) else msg.shown_at
    return t.seconds + t.nanos / 1e9


def impression_document(imp: common_pb2.Impression) -> dict[str, Any]:
    ts = ts_of(imp)
    return {
        "user_id": imp.user_id,
        "strategy": imp.strategy,
        "experiment": imp.experiment,
        "arm": imp.arm,
        "items": [it.item_id for it in sorted(imp.items, key=lambda it: it.position)],
        "model_version": imp.model_version,
        "ts": ts,
        # A BSON date: what the expiry sweep deletes by.
        "shown_at": dt.datetime.fromtimestamp(ts, dt.UTC),
    }


@dataclass(frozen=True)
class Outcome:
    """An outcome event as parked in ``attribution_pending`` (``_id`` = event id)."""

    event_id: str
    user_id: str
    item_id: str
    outcome: str
    ts: float
    recommendation_id: str

    @classmethod
    def of(cls, e: common_pb2.Event) -> Outcome:
        return cls(e.event_id, e.user_id, e.item_id, OUTCOMES[e.type], ts_of(e), e.recommendation_id)

    @classmethod
    def from_doc(cls, d: dict[str, Any]) -> Outcome:
        return cls(
            str(d["_id"]), d["user_id"], d["item_id"], d["outcome"], float(d["ts"]), d.get("recommendation_id", "")
        )

    def doc(self) -> dict[str, Any]:
        return {
            "user_id": self.user_id,
            "item_id": self.item_id,
            "outcome": self.outcome,
            "ts": self.ts,
            "recommendation_id": self.recommendation_id,
            "parked_at": dt.datetime.now(dt.UTC),
        }


def match(
    o: Outcome, impressions: Iterable[dict[str, Any]], window_s: float, skew_s: float
) -> dict[str, Any] | str | None:
    """The impression ``o`` counts for, a reason string when it can never count, or None (not yet).

    With a recommendation id only that impression qualifies (same user, item shown, inside the
    window); without one, the user's latest impression that showed the item in ``[ts - window, ts]``
    (last touch), else the earliest in ``(ts, ts + skew]``: ``skew_s`` allows event clocks running
    behind the gateway's without letting a later list steal the click from the one acted on.
    """
    if o.recommendation_id:
        for imp in impressions:
            if imp["_id"] != o.recommendation_id:
                continue
            if imp["user_id"] != o.user_id:
                return "other_user"
            if o.item_id not in imp["items"]:
                return "item_not_shown"
            if not imp["ts"] - skew_s <= o.ts <= imp["ts"] + window_s:
                return "outside_window"
            return imp
        return None
    before: dict[str, Any] | None = None  # latest impression at or before the event
    after: dict[str, Any] | None = None  # else the earliest one within the skew after it
    for imp in impressions:
        if imp["user_id"] != o.user_id or o.item_id not in imp["items"]:
            continue
        if o.ts - window_s <= imp["ts"] <= o.ts:
            if before is None or (imp["ts"], imp["_id"]) > (before["ts"], before["_id"]):
                before = imp
        elif o.ts < imp["ts"] <= o.ts + skew_s and (
            after is None or (imp["ts"], imp["_id"]) < (after["ts"], after["_id"])
        ):
            after = imp
    return before or after


def left_open(page: list[dict[str, Any]], outcomes: list[Outcome]) -> list[Outcome]:
    """The outcomes whose window match a newest-first page may not hold. An outcome is closed
    when the page holds an impression at or before it that shows its item and is newer than the
    page's last ts (so its ties are all on the page too): that one, or a later one on the page,
    beats every impression the page left out."""
    last = page[-1]["ts"]
    return [o for o in outcomes if not any(last < d["ts"] <= o.ts and o.item_id in d["items"] for d in page)]


class Attribution:
    """Both handlers over one set of collections; each is safe to replay."""

    def __init__(self, db: Database, settings: IngestionSettings, forgotten: ForgottenUsers | None = None) -> None:
        self.impressions = db[settings.impressions_collection]
        self.attributions = db[settings.attributions_collection]
        self.pending = db[settings.attribution_pending_collection]
        self.window_s = settings.attribution_window_s
        self.skew_s = settings.attribution_clock_skew_s
        self.settle_s = settings.attribution_settle_s
        # A window match is decided this long after the event's time (the module docstring).
        self.decide_after_s = self.skew_s + self.settle_s
        # Parked events with ts up to here were examined by a sweep; a restart looks 10 minutes back.
        self.swept_to = time.time() - self.decide_after_s - 600
        # Where the sweep in progress (or the last one) examines up to; set before it reads, so an
        # impression archived after it is read by that sweep or re-examined by the archive.
        self.sweeping_to = self.swept_to
        # Parked events naming an impression with ts up to here had their early look (``sweep``).
        self.named_swept_to = self.swept_to
        self.ttl_s = settings.impressions_ttl_s
        self.chunk = settings.archiver_max_poll_records
        self.forgotten = forgotten
        self._indexed = False
        self._counters: dict[tuple[str, str, str, str], Any] = {}

    def ensure_indexes(self) -> None:
        """Indexes for the lookups, ForgetUser and the expiry sweep. Retried until done once.

        Expiry is this service's own indexed range delete once a minute (:meth:`expire`), not
        MongoDB TTL indexes: the Mongo-protocol server of the local stack runs a TTL purge before
        every find on a TTL-indexed collection, and its purge is two scans of the whole collection
        (206 ms per find over 39,000 parked events, a third of that server's CPU in a load soak,
        growing with the collection; docs/load.md). On MongoDB the TTL monitor did the same delete
        once a minute. A TTL index left by an earlier release is replaced by a plain one.
        """
        if self._indexed:
            return
        try:
            plain_index(self.impressions, "shown_at")
            plain_index(self.attributions, "attributed_at")
            plain_index(self.pending, "parked_at")
            self.impressions.create_index("user_id")
            self.attributions.create_index("user_id")
            self.pending.create_index("user_id")
            self.pending.create_index("ts")
            self.pending.create_index("recommendation_id")
        except Exception as exc:
            STORE_ERRORS.labels("mongo", "attribution_create_index").inc()
            log.warning("attribution indexes not created yet", extra={"error": type(exc).__name__})
            return
        self._indexed = True

    def expire(self, now: float | None = None) -> dict[str, int]:
        """Delete what is past its keep time: impressions and attributions after ``impressions_ttl_s``,
        parked events after the window and skew (+1 h). How many of each were deleted."""
        at = dt.datetime.fromtimestamp(time.time() if now is None else now, dt.UTC)
        keep_parked = dt.timedelta(seconds=self.window_s + self.skew_s + 3600)
        deleted: dict[str, int] = {}
        for coll, field, before in (
            (self.impressions, "shown_at", at - dt.timedelta(seconds=self.ttl_s)),
            (self.attributions, "attributed_at", at - dt.timedelta(seconds=self.ttl_s)),
            (self.pending, "parked_at", at - keep_parked),
        ):
            n = with_retries(partial(coll.delete_many, {field: {"$lt": before}})).deleted_count
            metrics.ATTRIBUTION_EXPIRED.labels(coll.name).inc(n)
            deleted[coll.name] = n
        return deleted

    def _drop_forgotten(self, users: Iterable[str]) -> set[str]:
        return self.forgotten.forgotten_among(users) if self.forgotten is not None else set()

    # ---- impressions topic ----
    def on_impressions(self, batch: list[Decoded[common_pb2.ImpressionBatch]]) -> None:
        """Archive, then settle the parked events these impressions can change, ``chunk``
        impressions at a time (a poll of batch records holds ~100 times more impressions than
        records, and the memory a chunk takes must not grow with it)."""
        self.ensure_indexes()
        shown = [imp for d in batch for imp in impressions_of(d.message)]
        for begin in range(0, len(shown), self.chunk):
            self._archive(shown[begin : begin + self.chunk])

    def _archive(self, shown: list[common_pb2.Impression]) -> None:
        gone = self._drop_forgotten(m.user_id for m in shown)
        imps = {m.recommendation_id: m for m in shown if m.user_id not in gone}
        if not imps:
            return
        docs = {rid: impression_document(m) for rid, m in imps.items()}
        ops = [UpdateOne({"_id": rid}, {"$set": doc}, upsert=True) for rid, doc in docs.items()]
        try:
            with_retries(lambda: self.impressions.bulk_write(ops, ordered=False))
        except Exception:
            STORE_ERRORS.labels("mongo", "impressions_bulk_write").inc()
            raise
        metrics.IMPRESSIONS_ARCHIVED.inc(len(ops))
        # Only parked events these impressions can settle and that no sweep will examine after
        # this write: an event is examined (again) by the sweep once it is ``decide_after_s`` old,
        # so only those at or before ``sweeping_to`` (read after the write: store, then look) can
        # have missed these impressions. An impression can match an event no more than ``skew_s``
        # before it was shown (by id or by window), so nothing below ``since`` is read either.
        # When this archive keeps up (impressions archived within ``settle_s`` of being shown) the
        # range is empty and nothing is read: the query over the chunk's users x items x the last
        # minute, once 74% of this consumer's time, made it fall minutes behind in a soak
        # (docs/load.md).
        since = min(ts_of(m) for m in imps.values()) - self.skew_s
        upto = self.sweeping_to
        if since > upto:
            return
        ids = list(imps)
        users = list({m.user_id for m in imps.values()})
        items_shown = list({it.item_id for m in imps.values() for it in m.items})
        span = {"$gte": since, "$lte": upto}
        recent = {"user_id": {"$in": users}, "item_id": {"$in": items_shown}, "ts": span}
        # (An event naming one of them older than ``since`` could only be skipped as
        # outside_window; it expires with the unmatched events instead of being counted as such.)
        named = {"recommendation_id": {"$in": ids}, "ts": span}
        parked: dict[str, dict[str, Any]] = {str(d["_id"]): d for d in find_all(self.pending, named)}
        parked.update((str(d["_id"]), d) for d in find_all(self.pending, recent))
        if not parked:
            return
        # The query is a cross product (any of the users, any of the items): keep only the events an
        # impression of this chunk can match itself (its user, an item it showed, in the window or
        # the skew; or named by id). Every other one was examined already and this chunk changes
        # nothing for it, so resolving it again (a look-up per user) only cost: in a soak the
        # impression archive spent half its time there and fell minutes behind (docs/load.md).
        pools: dict[str, list[dict[str, Any]]] = {}
        for rid, doc in docs.items():
            pools.setdefault(doc["user_id"], []).append({"_id": rid, **doc})
        outcomes = (Outcome.from_doc(d) for d in parked.values())
        touched = [o for o in outcomes if match(o, pools.get(o.user_id, []), self.window_s, self.skew_s) is not None]
        if touched:
            self.resolve(touched)

    # ---- user-events topic ----
    def on_events(self, batch: list[Decoded[common_pb2.Event]]) -> None:
        self.ensure_indexes()
        outcomes = {d.message.event_id: Outcome.of(d.message) for d in batch if d.message.type in OUTCOMES}
        if not outcomes:
            return
        gone = self._drop_forgotten(o.user_id for o in outcomes.values())
        todo = [o for o in outcomes.values() if o.user_id not in gone]
        if not todo:
            return
        # Park first (see the module docstring), then look for the impressions.
        ops = [UpdateOne({"_id": o.event_id}, {"$set": o.doc()}, upsert=True) for o in todo]
        with_retries(lambda: self.pending.bulk_write(ops, ordered=False))
        self.resolve(todo)

    def sweep(self, now: float | None = None) -> int:
        """Decide the parked events that came due since the last sweep; how many were looked at.

        Every parked event once it is ``decide_after_s`` old; before that, an event naming its
        impression once it is ``settle_s`` old: a click sent before its list was archived (the
        list reaches the archive a tick or so after it was shown) is attributed seconds later, not
        a minute. Its impression no longer re-examines it on arrival (``_archive``), so this look
        is what keeps named outcomes prompt; the decision at ``decide_after_s`` still covers one
        whose list came later than that."""
        at = time.time() if now is None else now
        cutoff = at - self.decide_after_s
        self.sweeping_to = max(self.sweeping_to, cutoff)
        looked, self.swept_to = self._sweep_range(self.swept_to, cutoff, {}, at)
        named_low = max(self.named_swept_to, cutoff)
        if at - self.settle_s > named_low:
            n, self.named_swept_to = self._sweep_range(
                named_low, at - self.settle_s, {"recommendation_id": {"$gt": ""}}, at
            )
            looked += n
        return looked

    def _sweep_range(self, low: float, high: float, query: dict[str, Any], now: float) -> tuple[int, float]:
        """Resolve the parked events (matching ``query``) with ts in ``(low, high]``, at most a page
        of 5000; how many were read and where the next sweep of this range starts (after a full
        page, from its latest event rather than skip the rest)."""
        page = 5000
        docs: list[dict[str, Any]] = with_retries(
            lambda: list(self.pending.find({**query, "ts": {"$gt": low, "$lte": high}}).limit(page))
        )
        if docs:
            self.resolve([Outcome.from_doc(d) for d in docs], now)
        return len(docs), max(float(d["ts"]) for d in docs) if len(docs) == page else high

    def _impressions_showing(self, outcomes: list[Outcome]) -> list[dict[str, Any]]:
        """Each user's impressions that ``match`` can pick by window for that user's outcomes (one
        named by id is read by id in ``resolve``): those showing one of the outcomes' items, from
        the window's start before the earliest outcome to the skew after the latest.

        One query per user, by equality on the indexed ``user_id``. A single ``user_id $in``
        query was one round trip, but the Mongo-protocol server of the local stack plans ``$in``
        on a secondary index as a scan of the whole collection (equality uses the index): the
        attribution sweep, once a second, then read every impression archived so far, and each
        sweep cost more as the soak went on (docs/load.md). On MongoDB both use the index; the
        per-user queries cost a round trip each, bounded by the users of one sweep or poll.

        Newest first, one page of ``SHOWING_PAGE`` in one round trip, which nearly always holds
        every outcome's latest showing (a shopper shown a list on every visit had 219 impressions
        showing the items of her outcomes after a 10-minute soak, and reading all of them each
        time grew the archiver's memory). Only a page that leaves an outcome open is followed by
        one unsorted read of the rest, of the open outcomes' items alone: when it read every
        outcome item's showings, one click on an item never shown to a heavy shopper read all her
        showings of the others, a read that grew over a soak with her impressions and raised the
        archiver's memory high-water mark with it (docs/load.md). Not a cursor in small batches:
        the local stack's server sorts the whole result again for every batch it returns (865 ms
        for that shopper in batches of 50; sorted in one batch 47 ms; unsorted 24-34 ms), and the
        attribution sweep and the impression archive fell minutes behind on it (docs/load.md).
        """
        wanted: dict[str, list[Outcome]] = {}
        for o in outcomes:
            wanted.setdefault(o.user_id, []).append(o)
        found: list[dict[str, Any]] = []
        for user, mine in wanted.items():
            start = min(o.ts for o in mine) - self.window_s
            query: dict[str, Any] = {
                "user_id": user,
                "items": {"$in": sorted({o.item_id for o in mine})},
                "ts": {"$gte": start, "$lte": max(o.ts for o in mine) + self.skew_s},
            }
            page = find_all(self.impressions, query, SHOWING_FIELDS, newest=SHOWING_PAGE)
            still = left_open(page, mine) if len(page) == SHOWING_PAGE else []
            if still:
                # The rest for the outcomes left open, down to the page's last ts (its ties may
                # not all be on the page). Only their items: most are never shown to the shopper
                # (nothing to read), and the items of the closed ones were shown on every visit.
                older = {
                    "user_id": user,
                    "items": {"$in": sorted({o.item_id for o in still})},
                    "ts": {"$gte": min(o.ts for o in still) - self.window_s, "$lte": page[-1]["ts"]},
                }
                have = {d["_id"] for d in page}
                page += [d for d in find_all(self.impressions, older, SHOWING_FIELDS) if d["_id"] not in have]
            found += page
        return found

    def resolve(self, outcomes: list[Outcome], now: float | None = None) -> None:
        """Attribute what can be attributed now (named events at once, window events once due);
        settled events leave ``attribution_pending``."""
        due_before = (time.time() if now is None else now) - self.decide_after_s
        mine: dict[str, list[Outcome]] = {}
        for o in outcomes:
            if o.recommendation_id or o.ts <= due_before:
                mine.setdefault(o.user_id, []).append(o)
        # In steps of RESOLVE_USERS users: a sweep that comes back from a stall, or a consumer
        # replaying a backlog, resolves thousands of outcomes of hundreds of users at once, and
        # holding all their impressions together (~1.3 kB each, 50 per user) set ingestion's
        # memory high-water mark, which it kept (docs/load.md). An impression and the outcomes it
        # can count for have one user, so the steps decide exactly what one step would.
        users = list(mine)
        for begin in range(0, len(users), RESOLVE_USERS):
            self._resolve_step([o for u in users[begin : begin + RESOLVE_USERS] for o in mine[u]])

    def _resolve_step(self, outcomes: list[Outcome]) -> None:
        ids = list({o.recommendation_id for o in outcomes if o.recommendation_id})
        found = self._impressions_showing(outcomes)
        known = {d["_id"] for d in found}
        missing = [i for i in ids if i not in known]
        if missing:
            # An id may name an impression older than the window start or another user's.
            found += find_all(self.impressions, {"_id": {"$in": missing}})
        by_user: dict[str, list[dict[str, Any]]] = {}
        for d in found:
            by_user.setdefault(d["user_id"], []).append(d)
        by_id = {d["_id"]: d for d in found}
        writes: dict[str, tuple[dict[str, Any], Outcome]] = {}
        settled: list[str] = []
        for o in outcomes:
            pool = [by_id[o.recommendation_id]] if o.recommendation_id in by_id else by_user.get(o.user_id, [])
            hit = match(o, pool, self.window_s, self.skew_s)
            if hit is None:
                continue
            settled.append(o.event_id)
            if isinstance(hit, str):
                metrics.ATTRIBUTION_SKIPPED.labels(hit).inc()
                continue
            key = f"{hit['_id']}|{o.item_id}|{o.outcome}"
            # Within a batch the earliest event of an impression item is the one recorded.
            if key not in writes or o.ts < writes[key][1].ts:
                writes[key] = (hit, o)
        if writes:
            self._record(writes)
        if settled:
            with_retries(lambda: self.pending.delete_many({"_id": {"$in": settled}}))

    def _record(self, writes: dict[str, tuple[dict[str, Any], Outcome]]) -> None:
        keys_ = list(writes)
        ops = []
        now = dt.datetime.now(dt.UTC)
        for key in keys_:
            imp, o = writes[key]
            row = {
                "recommendation_id": imp["_id"],
                "user_id": o.user_id,
                "item_id": o.item_id,
                "position": imp["items"].index(o.item_id),
                "outcome": o.outcome,
                "experiment": imp.get("experiment", ""),
                "arm": imp.get("arm", ""),
                "strategy": imp.get("strategy", ""),
                "event_id": o.event_id,
                "event_ts": o.ts,
                "matched_by": "id" if o.recommendation_id else "window",
                "attributed_at": now,
            }
            ops.append(UpdateOne({"_id": key}, {"$setOnInsert": row}, upsert=True))
        try:
            res = with_retries(lambda: self.attributions.bulk_write(ops, ordered=False))
        except Exception:
            STORE_ERRORS.labels("mongo", "attributions_bulk_write").inc()
            raise
        for n in res.upserted_ids or {}:
            imp, o = writes[keys_[n]]
            label = (imp.get("experiment", ""), imp.get("arm", ""), imp.get("strategy", ""), o.outcome)
            child = self._counters.get(label)
            if child is None:
                child = self._counters[label] = metrics.ATTRIBUTED.labels(*label)
            child.inc()


class ExperimentsRunner:
    """Starts the two consumer loops once the broker answers (like the event archiver); stops them."""

    def __init__(self, settings: IngestionSettings, db: Database, refs: UserRefs | None = None) -> None:
        self.settings = settings
        self.attribution = Attribution(db, settings, ForgottenUsers(db, refs) if refs is not None else None)
        self.loops: list[ProtoConsumerLoop[Any]] = []
        self.producer: ProtoProducer | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._start_loops, name="experiments-start", daemon=True)
        self._sweeper = threading.Thread(target=self._sweep_loop, name="attribution-sweeper", daemon=True)

    def start(self) -> ExperimentsRunner:
        self._thread.start()
        return self

    def _common(self) -> dict[str, Any]:
        s = self.settings
        return {
            "bootstrap": s.kafka_servers,
            "producer": self.producer,
            "service": "ingestion",
            "max_poll_records": s.archiver_max_poll_records,
            "max_poll_interval_ms": s.kafka_max_poll_interval_ms,
            "session_timeout_ms": s.kafka_session_timeout_ms,
            "security": kafka_security(s),
            "fetch_max_wait_ms": s.archive_fetch_max_wait_ms,
            "poll_tick_s": s.archive_poll_tick_ms / 1000,
        }

    def _start_loops(self) -> None:
        s = self.settings
        while not self._stop.is_set():
            try:
                self.producer = self.producer or DeadLetterProducer(
                    s.kafka_servers, client_id="ingestion-attribution", security=kafka_security(s)
                )
                if not self.loops:
                    self.loops.append(
                        ProtoConsumerLoop(
                            group_id=s.impressions_group,
                            topics=[s.impressions_topic],
                            message_type=common_pb2.ImpressionBatch,
                            handle=self.attribution.on_impressions,
                            validate=batch_problem,
                            redact=redact_impressions,
                            **self._common(),
                        ).start()
                    )
                self.loops.append(
                    ProtoConsumerLoop(
                        group_id=s.attribution_group,
                        topics=[s.events_topic],
                        message_type=common_pb2.Event,
                        handle=self.attribution.on_events,
                        validate=archived_problem,
                        redact=redact_user_event,
                        # The event archiver dead-letters bad user-events records; not twice.
                        dead_letter=False,
                        **self._common(),
                    ).start()
                )
                log.info("impression archive and attribution started", extra={"topic": s.impressions_topic})
                self._sweeper.start()
                return
            except KafkaError as exc:
                log.warning("attribution cannot reach the broker yet", extra={"error": str(exc)})
                self._stop.wait(1.0)

    @property
    def running(self) -> bool:
        return len(self.loops) == 2

    def _sweep_loop(self) -> None:
        every = max(0.2, min(1.0, self.settings.attribution_settle_s / 2))
        expire_at = 0.0  # at once on start: a restart after a long stop has the most to delete
        while not self._stop.wait(every):
            try:
                self.attribution.sweep()
                if time.monotonic() >= expire_at:
                    self.attribution.expire()
                    expire_at = time.monotonic() + self.settings.attribution_expire_every_s
            except Exception as exc:
                STORE_ERRORS.labels("mongo", "attribution_sweep").inc()
                log.warning("attribution sweep failed; retried", extra={"error": type(exc).__name__})

    def stop(self) -> None:
        self._stop.set()
        if self._sweeper.is_alive():
            self._sweeper.join(5)
        for loop in self.loops:
            loop.stop()
        if self.producer is not None:
            self.producer.close()
