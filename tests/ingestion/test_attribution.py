"""Attribution on the real stack: a dedicated ingestion process (its own topics, groups and
collections) archives impressions published the way the gateway publishes them and attributes
the events sent through IngestEvents, under duplicates, replays and out-of-order arrival."""

from __future__ import annotations

import datetime as dt
import os
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from kafka import KafkaProducer
from prometheus_client.parser import text_string_to_metric_families
from pymongo.database import Database
from stylerec.v1 import common_pb2, ingestion_pb2

from cli.localstack.stack import Stack
from libs.common.kafka import ensure_topics
from libs.common.pseudonym import Pseudonymizer
from services.ingestion.attribution import RESOLVE_USERS, Attribution, Outcome, match
from services.ingestion.config import IngestionSettings
from tests.ingestion.conftest import LIMITS_ENV, make_event, start_ingestion, wait_until

pytestmark = pytest.mark.integration

pseudo = Pseudonymizer(LIMITS_ENV["STYLEREC_PSEUDONYM_SECRET"])


@dataclass
class Exp:
    stack: Stack
    name: str
    events_topic: str
    impressions_topic: str
    coll: str
    producer: KafkaProducer

    def channel(self) -> grpc.Channel:
        return grpc.insecure_channel(self.stack.addr_of(self.name))

    def metric(self, name: str, **labels: str) -> float:
        port = self.stack.components[self.name].metrics_port
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
            text = resp.read().decode()
        return sum(
            s.value
            for f in text_string_to_metric_families(text)
            for s in f.samples
            if s.name == name and labels.items() <= s.labels.items()
        )


@pytest.fixture(scope="module")
def exp(infra: Stack) -> Iterator[Exp]:
    token = uuid.uuid4().hex[:8]
    events, imps = f"att-ev-{token}", f"att-imp-{token}"
    ensure_topics([infra.kafka_bootstrap], {events: 2, imps: 2})
    name = f"ingestion-att-{token}"
    start_ingestion(
        infra,
        name,
        {
            "STYLEREC_EVENTS_TOPIC": events,
            "STYLEREC_EVENTS_COLLECTION": f"events_att_{token}",
            "STYLEREC_ARCHIVER_GROUP": f"archiver-att-{token}",
            "STYLEREC_IMPRESSIONS_TOPIC": imps,
            "STYLEREC_IMPRESSIONS_GROUP": f"imp-att-{token}",
            "STYLEREC_ATTRIBUTION_GROUP": f"att-{token}",
            "STYLEREC_IMPRESSIONS_COLLECTION": f"imp_{token}",
            "STYLEREC_ATTRIBUTIONS_COLLECTION": f"att_{token}",
            "STYLEREC_ATTRIBUTION_PENDING_COLLECTION": f"pend_{token}",
            "STYLEREC_ATTRIBUTION_WINDOW_S": "600",
            "STYLEREC_ATTRIBUTION_SETTLE_S": "4",
            # Window matches are decided skew + settle (9 s) after the event's time.
            "STYLEREC_ATTRIBUTION_CLOCK_SKEW_S": "5",
        },
    )
    producer = KafkaProducer(bootstrap_servers=[infra.kafka_bootstrap])
    yield Exp(infra, name, events, imps, token, producer)
    producer.close()
    infra.stop_component(name)


def rec_id() -> str:
    return "rec_" + os.urandom(16).hex()


def publish_impression(
    exp: Exp, user: str, items: list[str], shown_at: float, rid: str = "", arm: str = "style", legacy: bool = False
) -> str:
    """An impression as the gateway publishes it: in an ImpressionBatch keyed by its pseudonym
    (``legacy``: bare, as gateways before the batches did)."""
    rid = rid or rec_id()
    imp = common_pb2.Impression(
        recommendation_id=rid, user_id=user, strategy="STYLE_PERSONALIZED", experiment="exp-t", arm=arm
    )
    for n, item in enumerate(items):
        imp.items.add(item_id=item, position=n)
    imp.shown_at.FromNanoseconds(int(shown_at * 1e9))
    value = imp.SerializeToString() if legacy else common_pb2.ImpressionBatch(impressions=[imp]).SerializeToString()
    exp.producer.send(exp.impressions_topic, key=user.encode(), value=value).get(10)
    return rid


def ingest(exp: Exp, events: list[common_pb2.Event]) -> ingestion_pb2.IngestEventsResponse:
    from stylerec.v1 import ingestion_pb2_grpc

    with exp.channel() as ch:
        return ingestion_pb2_grpc.IngestionServiceStub(ch).IngestEvents(
            ingestion_pb2.IngestEventsRequest(events=events), timeout=30
        )


def attributions(db: Database[Any], exp: Exp, **query: Any) -> list[dict[str, Any]]:
    return list(db[f"att_{exp.coll}"].find(query))


def test_outcomes_count_once_per_impression_item_under_duplicates_and_replay(
    exp: Exp, mongo_db: Database[Any], unique: str
) -> None:
    raw = f"shopper-{unique}"
    user = pseudo(raw)
    now = time.time()
    items = [f"i-{unique}-{n}" for n in range(4)]
    rid = publish_impression(exp, user, items, now - 60)
    assert wait_until(lambda: mongo_db[f"imp_{exp.coll}"].count_documents({"_id": rid}) == 1, 30)
    before = exp.metric("stylerec_ingestion_attributed_total", arm="style", outcome="click")

    def ev(item: str, etype: int, eid: str, ts: float) -> common_pb2.Event:
        e = make_event(raw, item, etype, event_id=eid, ts=ts)
        e.recommendation_id = rid
        return e

    batch = [
        ev(items[0], common_pb2.CLICK, f"c1-{unique}", now - 50),
        ev(items[0], common_pb2.CLICK, f"c2-{unique}", now - 40),  # second click on the same item
        ev(items[0], common_pb2.PURCHASE, f"p1-{unique}", now - 30),
        ev(items[1], common_pb2.ADD_TO_CART, f"k1-{unique}", now - 20),
        ev(items[2], common_pb2.VIEW, f"v1-{unique}", now - 20),  # a view is not an outcome
    ]
    assert ingest(exp, batch).accepted == len(batch)
    assert ingest(exp, batch).duplicates == len(batch)  # the edge deduplicates the retry
    # A replay past the edge (a consumer rewinding, a producer retry): the same records again on the topic.
    for e in batch:
        e.user_id = user
        exp.producer.send(exp.events_topic, key=user.encode(), value=e.SerializeToString()).get(10)

    want = {(items[0], "click"), (items[0], "purchase"), (items[1], "cart")}
    assert wait_until(
        lambda: {(a["item_id"], a["outcome"]) for a in attributions(mongo_db, exp, recommendation_id=rid)} == want, 30
    )
    time.sleep(2)  # let the replayed records be consumed too
    rows = attributions(mongo_db, exp, recommendation_id=rid)
    assert len(rows) == 3
    click = next(r for r in rows if r["outcome"] == "click")
    assert click["event_id"] == f"c1-{unique}" and click["position"] == 0 and click["matched_by"] == "id"
    assert click["arm"] == "style" and click["experiment"] == "exp-t" and click["user_id"] == user
    assert exp.metric("stylerec_ingestion_attributed_total", arm="style", outcome="click") - before == 1
    assert mongo_db[f"pend_{exp.coll}"].count_documents({"user_id": user}) == 0


def test_event_before_its_impression_is_attributed_when_the_impression_arrives(
    exp: Exp, mongo_db: Database[Any], unique: str
) -> None:
    raw = f"early-{unique}"
    user = pseudo(raw)
    now = time.time()
    item, other = f"j-{unique}-0", f"j-{unique}-9"
    # The click (no recommendation id) is consumed before any impression exists: parked. Matching
    # it by window waits the clock skew + attribution_settle_s (9 s here) after its time, so the
    # impressions that arrive meanwhile, in whatever batches, all take part in the last-touch choice.
    early = make_event(raw, item, common_pb2.CLICK, event_id=f"e-{unique}", ts=now)
    never = make_event(raw, other, common_pb2.CLICK, event_id=f"n-{unique}", ts=now)
    assert ingest(exp, [early, never]).accepted == 2
    pend = mongo_db[f"pend_{exp.coll}"]
    assert wait_until(lambda: pend.count_documents({"user_id": user}) == 2, 30)
    assert attributions(mongo_db, exp, user_id=user) == []
    # Two impressions showed the item before the click; last touch wins. One is outside the window.
    publish_impression(exp, user, [item], now - 3000, arm="cf")
    old = publish_impression(exp, user, [item, f"j-{unique}-1"], now - 300, arm="cf")
    latest = publish_impression(exp, user, [f"j-{unique}-2", item], now - 30, arm="cf")
    assert wait_until(lambda: len(attributions(mongo_db, exp, user_id=user)) == 1, 30)
    (row,) = attributions(mongo_db, exp, user_id=user)
    assert row["recommendation_id"] == latest != old
    assert row["position"] == 1 and row["matched_by"] == "window" and row["arm"] == "cf"
    # The click on an item no impression showed stays parked (until its TTL); the matched one left.
    assert [d["_id"] for d in pend.find({"user_id": user})] == [f"n-{unique}"]


def test_a_recommendation_id_cannot_attribute_another_users_or_an_unshown_item(
    exp: Exp, mongo_db: Database[Any], unique: str
) -> None:
    owner, thief = f"own-{unique}", f"thief-{unique}"
    now = time.time()
    items = [f"m-{unique}-0", f"m-{unique}-1"]
    rid = publish_impression(exp, pseudo(owner), items, now - 30)
    assert wait_until(lambda: mongo_db[f"imp_{exp.coll}"].count_documents({"_id": rid}) == 1, 30)
    foreign = make_event(thief, items[0], common_pb2.CLICK, event_id=f"f-{unique}", ts=now - 10)
    unshown = make_event(owner, f"m-{unique}-7", common_pb2.CLICK, event_id=f"u-{unique}", ts=now - 10)
    for e in (foreign, unshown):
        e.recommendation_id = rid
    before = {
        r: exp.metric("stylerec_ingestion_attribution_skipped_total", reason=r)
        for r in ("other_user", "item_not_shown")
    }
    assert ingest(exp, [foreign, unshown]).accepted == 2
    assert wait_until(
        lambda: all(
            exp.metric("stylerec_ingestion_attribution_skipped_total", reason=r) - before[r] == 1 for r in before
        ),
        30,
    )
    assert attributions(mongo_db, exp, recommendation_id=rid) == []


def test_a_malformed_recommendation_id_is_rejected_with_the_reason(exp: Exp, unique: str) -> None:
    e = make_event(f"bad-{unique}", "item-1", common_pb2.CLICK)
    e.recommendation_id = "rec_not-hex"
    resp = ingest(exp, [e, make_event(f"ok-{unique}", "item-1", common_pb2.CLICK)])
    assert resp.accepted == 1 and len(resp.rejected) == 1
    assert resp.rejected[0].reason.startswith("recommendation_id must be")


def test_an_older_gateways_bare_impression_is_archived_and_attributed(
    exp: Exp, mongo_db: Database[Any], unique: str
) -> None:
    """A rolling upgrade: gateways not yet upgraded still publish one Impression per record."""
    raw = f"legacy-{unique}"
    user = pseudo(raw)
    item = f"l-{unique}-0"
    rid = publish_impression(exp, user, [item, f"l-{unique}-1"], time.time() - 5, legacy=True)
    assert ingest(exp, [make_event(raw, item, common_pb2.CLICK, event_id=f"l-{unique}", ts=time.time())]).accepted
    assert wait_until(lambda: len(attributions(mongo_db, exp, user_id=user)) == 1, 30)
    doc = mongo_db[f"imp_{exp.coll}"].find_one({"_id": rid})
    assert doc and doc["user_id"] == user and doc["items"] == [item, f"l-{unique}-1"]
    assert attributions(mongo_db, exp, user_id=user)[0]["recommendation_id"] == rid


def test_unusable_impressions_are_dead_lettered_with_the_reason(exp: Exp) -> None:
    from libs.common.kafka import dead_letter_topic
    from tests.ingestion.conftest import read_records

    raw = common_pb2.Impression(recommendation_id=rec_id(), user_id="raw-shop-id-42")
    raw.shown_at.GetCurrentTime()
    good = common_pb2.Impression(recommendation_id=rec_id(), user_id="u_" + "c" * 32)
    good.shown_at.GetCurrentTime()
    mixed = common_pb2.ImpressionBatch(impressions=[good, raw])
    exp.producer.send(exp.impressions_topic, key=b"k1", value=b"\xff\x00 not a protobuf").get(10)
    # An older gateway's bare Impression is still read (and refused for its raw id) ...
    exp.producer.send(exp.impressions_topic, key=b"k2", value=raw.SerializeToString()).get(10)
    # ... and a batch with one bad impression is dead-lettered whole, every raw id redacted.
    exp.producer.send(exp.impressions_topic, key=b"k3", value=mixed.SerializeToString()).get(10)

    def ours() -> list[common_pb2.DeadLetter]:
        dls = [
            common_pb2.DeadLetter.FromString(r.value)
            for r in read_records(exp.stack.kafka_bootstrap, dead_letter_topic("ingestion"), idle_s=1.0)
        ]
        return [d for d in dls if d.source_topic == exp.impressions_topic]

    assert wait_until(lambda: len(ours()) == 3, 30)
    dls = sorted(ours(), key=lambda d: d.reason)
    assert dls[0].reason.startswith("invalid: impression 2 of 2: user_id is not a pseudonym")
    assert dls[0].reason.endswith("(user_id redacted in 1 of 2)")
    redacted = common_pb2.ImpressionBatch.FromString(dls[0].value).impressions
    assert [i.user_id for i in redacted] == [good.user_id, "<redacted>"]
    assert dls[1].reason.startswith("invalid: user_id is not a pseudonym") and "redacted" in dls[1].reason
    assert common_pb2.Impression.FromString(dls[1].value).user_id == "<redacted>"
    assert dls[2].reason.startswith("undecodable") and dls[2].value == b""  # withheld
    # The raw id is not repeated on the dead-letter topic.
    assert all(b"raw-shop-id-42" not in d.SerializeToString() for d in dls)


def own_collections(unique: str) -> IngestionSettings:
    """Attribution settings over collections of this test alone: a 1-day window, 60 s skew, 7-day keep."""
    return IngestionSettings(
        impressions_collection=f"imp_{unique}",
        attributions_collection=f"att_{unique}",
        attribution_pending_collection=f"pend_{unique}",
        impressions_ttl_s=7 * 86400,
        attribution_window_s=86400,
        attribution_clock_skew_s=60,
    )


def test_expiry_sweep_deletes_only_what_is_past_its_keep_time_and_replaces_ttl_indexes(
    mongo_db: Database[Any], unique: str
) -> None:
    """Expiry is the archiver's own range delete: the local stack's Mongo-protocol server purges a
    TTL-indexed collection (two whole-collection scans) before every find, so no TTL index is left."""
    settings = own_collections(unique)
    pending = mongo_db[settings.attribution_pending_collection]
    pending.create_index("parked_at", expireAfterSeconds=3600)  # as an earlier release left it
    attribution = Attribution(mongo_db, settings)
    attribution.ensure_indexes()
    for name in (settings.impressions_collection, settings.attributions_collection, pending.name):
        specs = mongo_db[name].index_information().values()
        assert not [s for s in specs if "expireAfterSeconds" in s], (name, list(specs))

    now = time.time()
    at = dt.datetime.fromtimestamp(now, dt.UTC)

    def days_ago(d: float) -> dt.datetime:
        return at - dt.timedelta(days=d)

    mongo_db[settings.impressions_collection].insert_many(
        [{"_id": "old", "shown_at": days_ago(8)}, {"_id": "kept", "shown_at": days_ago(6)}]
    )
    mongo_db[settings.attributions_collection].insert_many(
        [{"_id": "old", "attributed_at": days_ago(7.5)}, {"_id": "kept", "attributed_at": days_ago(1)}]
    )
    # Parked events are kept for the window + skew + 1 h (25 h 1 min here).
    pending.insert_many(
        [{"_id": "old", "parked_at": days_ago(1.1)}, {"_id": "kept", "parked_at": at - dt.timedelta(hours=24)}]
    )
    assert attribution.expire(now) == {
        settings.impressions_collection: 1,
        settings.attributions_collection: 1,
        pending.name: 1,
    }
    for name in (settings.impressions_collection, settings.attributions_collection, pending.name):
        assert [d["_id"] for d in mongo_db[name].find({})] == ["kept"], name
    assert attribution.expire(now) == dict.fromkeys(
        (settings.impressions_collection, settings.attributions_collection, pending.name), 0
    )


def test_window_lookup_picks_a_heavy_users_latest_showing_and_reads_only_the_window(
    mongo_db: Database[Any], unique: str
) -> None:
    """A shopper shown a list on every visit piles up impressions of the same items; the look-up
    must pick exactly what a read of all of them would, reading one page of the newest when that
    holds the match, and nothing shown after the skew."""
    settings = own_collections(unique)
    attribution = Attribution(mongo_db, settings)
    attribution.ensure_indexes()
    user, t0 = f"u-{unique}", 1_800_000_000.0
    docs = [{"_id": f"rec_{n:04d}", "user_id": user, "items": ["a", "b", "c"], "ts": t0 + 10 * n} for n in range(300)]
    docs += [
        # Same ts: "z" > "y" wins, whichever of the two the server returns first.
        {"_id": "rec_tie_y", "user_id": user, "items": ["d"], "ts": t0 + 2000},
        {"_id": "rec_tie_z", "user_id": user, "items": ["d"], "ts": t0 + 2000},
        {"_id": "rec_late", "user_id": user, "items": ["e"], "ts": t0 + 2030},  # only after the event, in the skew
        {"_id": "rec_other", "user_id": "someone-else", "items": ["a"], "ts": t0 + 2995},
        {"_id": "rec_g", "user_id": user, "items": ["g"], "ts": t0 + 5},  # behind 290 newer "a" lists
    ]
    mongo_db[settings.impressions_collection].insert_many(docs)
    everything = list(mongo_db[settings.impressions_collection].find({"user_id": user}))

    def outcome(item: str, ts: float) -> Outcome:
        return Outcome(f"ev-{item}-{ts}", user, item, "click", ts, "")

    cases = [outcome("a", t0 + 2995), outcome("b", t0 + 1505), outcome("d", t0 + 2001), outcome("e", t0 + 2010)]
    cases.append(outcome("f", t0 + 2500))  # never shown: no match, the read goes to the window's start
    cases.append(outcome("g", t0 + 2995))  # with "a" in one query, its match is not on the first page

    def picked(o: Outcome, impressions: list[dict[str, Any]]) -> Any:
        hit = match(o, impressions, settings.attribution_window_s, settings.attribution_clock_skew_s)
        return hit["_id"] if isinstance(hit, dict) else hit

    for o in cases:
        assert picked(o, attribution._impressions_showing([o])) == picked(o, everything), o
    assert [picked(o, everything) for o in cases] == ["rec_0299", "rec_0150", "rec_tie_z", "rec_late", None, "rec_g"]
    # All six at once (one user, one query): the same picks; "f" and "g" leave the page open.
    together = attribution._impressions_showing(cases)
    assert [picked(o, together) for o in cases] == [picked(o, everything) for o in cases]
    # "b" at +1505: one page of the 50 newest up to the skew after it (+1565), which holds its
    # match; none of the 143 shown later, nor another user's.
    read = attribution._impressions_showing([cases[1]])
    assert sorted(d["_id"] for d in read) == [f"rec_{n:04d}" for n in range(107, 157)]
    # "a" (closed by the page) with "f" (never shown, so left open): the rest is read for "f"
    # alone, which finds nothing, rather than every one of the 250 older "a" lists as well.
    a_and_f = [cases[0], cases[4]]
    read = attribution._impressions_showing(a_and_f)
    assert sorted(d["_id"] for d in read) == [f"rec_{n:04d}" for n in range(250, 300)]
    assert [picked(o, read) for o in a_and_f] == ["rec_0299", None]


def impression(rid: str, user: str, items: list[str], ts: float) -> common_pb2.Impression:
    imp = common_pb2.Impression(recommendation_id=rid, user_id=user, strategy="CF")
    for n, item in enumerate(items):
        imp.items.add(item_id=item, position=n)
    imp.shown_at.FromNanoseconds(int(ts * 1e9))
    return imp


def parked(event_id: str, user: str, item: str, ts: float, rid: str = "") -> dict[str, Any]:
    return Outcome(event_id, user, item, "click", ts, rid).doc() | {"_id": event_id}


def spy_resolve(attribution: Attribution) -> list[list[str]]:
    """The event ids of each ``resolve`` call from now on (the calls still run)."""
    resolved: list[list[str]] = []
    real_resolve = attribution.resolve

    def spy(outcomes: list[Outcome], now: float | None = None) -> None:
        resolved.append(sorted(o.event_id for o in outcomes))
        real_resolve(outcomes, now)

    attribution.resolve = spy  # type: ignore[method-assign]
    return resolved


def test_an_impression_chunk_re_examines_only_the_parked_events_it_can_match(
    mongo_db: Database[Any], unique: str
) -> None:
    """A lagging impression archive (impressions archived after the sweep decided the events they
    could match) re-examines parked events, but only those an impression of the chunk can match
    itself: the query's users x items cross product and events of other ids cost a look-up each
    for nothing."""
    settings = own_collections(unique)
    attribution = Attribution(mongo_db, settings)
    attribution.ensure_indexes()
    then = attribution.sweeping_to - 1000  # swept (or left behind by a restart) long ago
    u, v = f"u-{unique}", f"v-{unique}"
    rid_u, rid_v = rec_id(), rec_id()
    mongo_db[settings.attribution_pending_collection].insert_many(
        [
            parked("shown-before", u, "x", then - 20),  # u was shown x 10 s before: the match
            parked("not-shown", u, "y", then - 20),  # y was shown to v, not to u
            parked("cross", v, "x", then - 20),  # x was shown to u, not to v
            parked("named", v, "y", then - 20, rid_v),  # names v's impression of this chunk
            parked("other-id", u, "x", then - 20, rec_id()),  # names an impression not in the chunk
        ]
    )
    resolved = spy_resolve(attribution)
    attribution._archive([impression(rid_u, u, ["x"], then - 30), impression(rid_v, v, ["y"], then - 30)])
    assert resolved == [["named", "shown-before"]]
    rows = {d["event_id"]: d["recommendation_id"] for d in mongo_db[settings.attributions_collection].find({})}
    assert rows == {"shown-before": rid_u, "named": rid_v}
    left = sorted(d["_id"] for d in mongo_db[settings.attribution_pending_collection].find({}))
    assert left == ["cross", "not-shown", "other-id"]


def test_an_archive_that_keeps_up_leaves_the_parked_events_to_the_sweep(mongo_db: Database[Any], unique: str) -> None:
    """Impressions archived within the settle time of being shown re-examine nothing: an event
    naming one is looked at by the sweep settle after its time, every other event it can match is
    decided skew + settle after its time, and the sweep finds them archived by then. It decides
    last touch over everything archived by then, whichever order it came in."""
    settings = own_collections(unique)
    attribution = Attribution(mongo_db, settings)
    attribution.ensure_indexes()
    now = time.time()
    attribution.sweep(now)  # the sweeper's last pass, as in the running archiver
    u = f"u-{unique}"
    rid_old, rid_latest, rid_skew = rec_id(), rec_id(), rec_id()
    mongo_db[settings.attribution_pending_collection].insert_many(
        [
            parked("window", u, "x", now - 5),
            parked("named", u, "y", now - 5, rid_old),
            parked("skewed", u, "z", now - 5),  # its clock runs behind: z is shown 30 s "after" it
        ]
    )
    resolved = spy_resolve(attribution)
    # Archived in two chunks, newest first; the one shown 30 s after the events within the skew.
    attribution._archive([impression(rid_latest, u, ["x"], now - 8), impression(rid_skew, u, ["z"], now + 25)])
    attribution._archive([impression(rid_old, u, ["x", "y"], now - 9)])
    assert resolved == []  # nothing read, nothing re-examined
    assert mongo_db[settings.attributions_collection].count_documents({}) == 0
    # The event naming its list has an early look settle (10 s) after its time.
    attribution.sweep(now + settings.attribution_settle_s)
    assert resolved == [["named"]]
    assert [d["event_id"] for d in mongo_db[settings.attributions_collection].find({})] == ["named"]
    # The others are not due before skew (60 s) + settle (10 s) after their time.
    attribution.sweep(now + settings.attribution_clock_skew_s)
    assert resolved == [["named"]]
    attribution.sweep(now + attribution.decide_after_s)
    assert resolved[-1] == ["skewed", "window"]
    rows = {d["event_id"]: d["recommendation_id"] for d in mongo_db[settings.attributions_collection].find({})}
    assert rows == {"window": rid_latest, "named": rid_old, "skewed": rid_skew}
    assert mongo_db[settings.attribution_pending_collection].count_documents({}) == 0


def test_resolve_holds_the_impressions_of_a_bounded_number_of_users_at_once(
    mongo_db: Database[Any], unique: str
) -> None:
    """A sweep back from a stall resolves the outcomes of hundreds of users: it reads and holds
    their impressions RESOLVE_USERS users at a time, and decides exactly what one read would."""
    settings = own_collections(unique)
    attribution = Attribution(mongo_db, settings)
    attribution.ensure_indexes()
    t = 1_800_000_000.0
    users = [f"u{n:03d}-{unique}" for n in range(2 * RESOLVE_USERS + 20)]
    mongo_db[settings.impressions_collection].insert_many(
        [{"_id": f"rec_{u}", "user_id": u, "items": ["x", "y"], "ts": t} for u in users]
    )
    outcomes = [Outcome(f"ev-{u}", u, "y", "click", t + 1, "") for u in users]
    outcomes.append(Outcome(f"ev-never-{unique}", users[0], "z", "click", t + 1, ""))  # never shown
    mongo_db[settings.attribution_pending_collection].insert_many([o.doc() | {"_id": o.event_id} for o in outcomes])
    held: list[int] = []
    real_read = attribution._impressions_showing

    def spy(step: list[Outcome]) -> list[dict[str, Any]]:
        held.append(len({o.user_id for o in step}))
        return real_read(step)

    attribution._impressions_showing = spy  # type: ignore[method-assign]
    attribution.resolve(outcomes, now=t + 3600)
    assert held == [RESOLVE_USERS, RESOLVE_USERS, 20]
    rows = {d["event_id"]: d["recommendation_id"] for d in mongo_db[settings.attributions_collection].find({})}
    assert rows == {f"ev-{u}": f"rec_{u}" for u in users}
    left = [d["_id"] for d in mongo_db[settings.attribution_pending_collection].find({})]
    assert left == [f"ev-never-{unique}"]
