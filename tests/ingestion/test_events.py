"""Events API against a real ingestion process, broker, Redis and Mongo-protocol server."""

from __future__ import annotations

import json
import math
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pymongo.database import Database
from stylerec.v1 import common_pb2, ingestion_pb2

from cli.main import main as cli_main
from libs.common.errors import violations_of
from services.ingestion.validation import PSEUDONYM_RE, validate_event
from tests.ingestion.conftest import Ingestion, make_event, read_records, wait_until, with_overrides

pytestmark = pytest.mark.integration
NOW = time.time()


def _ev(unique: str, i: int, **kw: Any) -> common_pb2.Event:
    return with_overrides(make_event(f"shopper-{unique}", f"item-{i}", event_id=f"{unique}-{i}"), **kw)


# (overrides of a good event, expected reason) — each sent next to a good event, so the batch survives.
BAD_EVENTS: list[tuple[dict[str, Any], str]] = [
    ({"user_id": ""}, "user_id is required"),
    ({"item_id": ""}, "item_id is required"),
    ({"user_id": "u" * 200}, "user_id longer than 128"),
    ({"item_id": "sku 1"}, "item_id has characters outside"),
    ({"event_id": "id with space"}, "event_id has characters outside"),
    ({"event_id": "e" * 300}, "event_id longer than"),
    ({"type": 0}, "not one of VIEW"),
    ({"type": 77}, "not one of VIEW"),
    ({"no_ts": True}, "timestamp is required"),
    ({"ts": NOW + 86400}, "in the future"),
    ({"ts": 0.0}, "older than"),
    ({"value": -3.0}, "value must be"),
    ({"value": math.nan}, "value must be"),
    ({"value": 1e12}, "value must be"),
    ({"page": "p" * 1000}, "context.page longer than"),
    ({"session_id": "s\x07"}, "context.session_id has control characters"),
]


@pytest.mark.parametrize(("override", "reason"), BAD_EVENTS, ids=[r for _, r in BAD_EVENTS])
@pytest.mark.parametrize("rpc", ["unary", "stream"])
def test_bad_event_is_reported_with_index_and_reason(
    ing: Ingestion, unique: str, rpc: str, override: dict[str, Any], reason: str
) -> None:
    good, bad = _ev(unique, 0), _ev(unique, 1, **override)
    request = ingestion_pb2.IngestEventsRequest(events=[good, bad])
    with ing.channel() as ch:
        stub = ing.stub(ch)
        if rpc == "unary":
            resp = stub.IngestEvents(request, timeout=10)
        else:
            (resp,) = list(stub.StreamEvents(iter([request]), timeout=10))
    assert resp.accepted == 1
    assert [r.index for r in resp.rejected] == [1]
    assert reason in resp.rejected[0].reason


@pytest.mark.parametrize("rpc", ["unary", "stream"])
def test_whole_request_violations(ing: Ingestion, unique: str, rpc: str) -> None:
    too_many = ingestion_pb2.IngestEventsRequest(events=[_ev(unique, i) for i in range(501)])
    too_big = ingestion_pb2.IngestEventsRequest(
        events=[_ev(unique, i, page="p" * 250, device="d" * 250, session_id="s" * 250) for i in range(400)]
    )
    all_bad = ingestion_pb2.IngestEventsRequest(events=[_ev(unique, 0, user_id=""), _ev(unique, 1, type=0)])
    cases = [
        (too_many, grpc.StatusCode.INVALID_ARGUMENT, "exceeds the maximum of 500"),
        (too_big, grpc.StatusCode.RESOURCE_EXHAUSTED, "bytes exceeds the maximum"),
        (all_bad, grpc.StatusCode.INVALID_ARGUMENT, "all 2 events rejected"),
    ]
    with ing.channel() as ch:
        stub = ing.stub(ch)
        for request, code, text in cases:
            with pytest.raises(grpc.RpcError) as err:
                if rpc == "unary":
                    stub.IngestEvents(request, timeout=10)
                else:
                    list(stub.StreamEvents(iter([request]), timeout=10))
            assert err.value.code() == code, err.value.details()
            assert text in err.value.details()
            assert violations_of(err.value), "BadRequest details expected"
    violations = []
    with ing.channel() as ch, pytest.raises(grpc.RpcError) as err:
        ing.stub(ch).IngestEvents(all_bad, timeout=10)
    violations = violations_of(err.value)
    assert [f for f, _ in violations] == ["events[0]", "events[1]"]


def test_stream_acks_every_chunk_in_order_and_aborts_on_bad_chunk(ing: Ingestion, unique: str) -> None:
    chunks = [
        ingestion_pb2.IngestEventsRequest(events=[_ev(unique, c * 10 + i) for i in range(10)], sequence=100 + c)
        for c in range(5)
    ]
    with ing.channel() as ch:
        acks = list(ing.stub(ch).StreamEvents(iter(chunks), timeout=20))
    assert [a.sequence for a in acks] == [100, 101, 102, 103, 104]
    assert all(a.accepted == 10 for a in acks)
    # A chunk over the limit ends the stream with INVALID_ARGUMENT; chunks before it were acknowledged.
    good = ingestion_pb2.IngestEventsRequest(events=[_ev(unique, 1000 + i) for i in range(3)])
    bad = ingestion_pb2.IngestEventsRequest(events=[_ev(unique, 2000 + i) for i in range(501)])
    seen: list[int] = []
    with ing.channel() as ch, pytest.raises(grpc.RpcError) as err:
        for ack in ing.stub(ch).StreamEvents(iter([good, bad, good]), timeout=20):
            seen.append(ack.accepted)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert seen == [3]


def test_duplicates_within_and_across_requests_and_rpcs(ing: Ingestion, unique: str) -> None:
    a, b, c = _ev(unique, 1), _ev(unique, 2), _ev(unique, 3)
    with ing.channel() as ch:
        stub = ing.stub(ch)
        first = stub.IngestEvents(ingestion_pb2.IngestEventsRequest(events=[a, b, a]), timeout=10)
        assert (first.accepted, first.duplicates, list(first.duplicate_indexes)) == (2, 1, [2])
        second = stub.IngestEvents(ingestion_pb2.IngestEventsRequest(events=[b, c]), timeout=10)
        assert (second.accepted, second.duplicates, list(second.duplicate_indexes)) == (1, 1, [0])
        (third,) = list(stub.StreamEvents(iter([ingestion_pb2.IngestEventsRequest(events=[a, b, c])]), timeout=10))
        assert (third.accepted, third.duplicates) == (0, 3)
        # Events without ids get a deterministic one: the same raw event twice is one event.
        anon = make_event(f"anon-{unique}", "item-x", ts=NOW - 5)
        r1 = stub.IngestEvents(ingestion_pb2.IngestEventsRequest(events=[anon]), timeout=10)
        r2 = stub.IngestEvents(ingestion_pb2.IngestEventsRequest(events=[anon]), timeout=10)
        assert (r1.accepted, r2.accepted, r2.duplicates) == (1, 0, 1)
    published = [common_pb2.Event.FromString(r.value) for r in read_records(ing.stack.kafka_bootstrap, ing.topic)]
    # Each event reached the broker exactly once, whatever the number of attempts.
    assert sorted(e.event_id for e in published if e.event_id.startswith(unique)) == [
        a.event_id,
        b.event_id,
        c.event_id,
    ]
    assert len([e for e in published if e.item_id == "item-x"]) == 1


def test_raw_user_ids_never_reach_kafka_or_mongo(ing: Ingestion, mongo_db: Database[Any], unique: str) -> None:
    raw = [f"raw-person-{unique}-{u}" for u in range(3)]
    events = [make_event(raw[i % 3], f"item-{i}", event_id=f"{unique}-raw-{i}") for i in range(30)]
    with ing.channel() as ch:
        resp = ing.stub(ch).IngestEvents(ingestion_pb2.IngestEventsRequest(events=events), timeout=10)
    assert resp.accepted == 30
    records = read_records(ing.stack.kafka_bootstrap, ing.topic)
    mine = [r for r in records if f"{unique}-raw-".encode() in r.value]
    assert len(mine) == 30
    for r in mine:
        assert not any(x.encode() in r.value or x.encode() in (r.key or b"") for x in raw)
        assert PSEUDONYM_RE.match(r.key.decode())
    coll = mongo_db[ing.collection]
    ids = [e.event_id for e in events]
    assert wait_until(lambda: coll.count_documents({"_id": {"$in": ids}}) == 30, 30)
    for doc in coll.find({"_id": {"$in": ids}}):
        assert PSEUDONYM_RE.match(doc["user_id"])
        assert not any(x in json.dumps(doc, default=str) for x in raw)


def test_metrics_are_exported(ing: Ingestion, unique: str) -> None:
    with ing.channel() as ch:
        ing.stub(ch).IngestEvents(ingestion_pb2.IngestEventsRequest(events=[_ev(unique, 0)]), timeout=10)
    body = ""

    def scraped() -> bool:
        nonlocal body
        body = urllib.request.urlopen(ing.metrics_url, timeout=5).read().decode()
        return f'stylerec_kafka_consumer_lag_messages{{group="{ing.group}"' in body

    assert wait_until(scraped, 20, 0.5), "archiver lag not exported"
    for name in (
        'stylerec_ingestion_events_total{outcome="accepted",type="VIEW"}',
        'stylerec_ingestion_batch_size_bucket{le="1.0",rpc="IngestEvents"}',
        "stylerec_ingestion_produce_seconds_bucket",
        "stylerec_ingestion_dedup_hits_total",
        "stylerec_ingestion_archived_events_total",
        "stylerec_ingestion_inflight_events",
    ):
        assert name in body, name


# ---------- CLI: `stylerec ingest events` ----------
def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"user_id": "u1", "item_id": "i1", "type": "LIKE", "timestamp": 1}\n', "unknown type"),
        ('{"user_id": "u1", "type": "VIEW", "timestamp": 1}\n', "missing item_id"),
        ("user_id,item_id,type\nu1,i1,VIEW\n", "CSV header lacks timestamp"),
        ('{"user_id": "u1", "item_id": "i1", "type": "VIEW", "timestamp": "yesterday"}\n', "neither unix"),
    ],
)
def test_cli_ingest_events_bad_files_exit_2(
    ing: Ingestion, tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str, message: str
) -> None:
    path = _write(tmp_path / "events.jsonl", content)
    assert cli_main(["ingest", "events", str(path), "--addr", ing.addr]) == 2
    assert message in capsys.readouterr().err


def test_cli_ingest_events_file_with_a_refused_and_an_unreadable_row_exits_1(
    ing: Ingestion, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A file with one readable row is usable (exit 1, not 2): the row is sent, and both rejects are listed by line."""
    path = _write(
        tmp_path / "events.jsonl", '{"user_id": "u1", "item_id": "i1", "type": "VIEW", "timestamp": 1}\n{not json\n'
    )
    assert cli_main(["ingest", "events", str(path), "--addr", ing.addr]) == 1
    out = capsys.readouterr().out
    assert "rejected 2 (1 unreadable, 1 refused by the server)" in out
    assert f"{path}:1: timestamp is older than" in out
    assert f"{path}:2: not valid JSON" in out


def test_cli_ingest_events_reports_per_event_rejections(
    ing: Ingestion, tmp_path: Path, capsys: pytest.CaptureFixture[str], unique: str
) -> None:
    now = int(time.time())
    rows = [
        {"user_id": f"c-{unique}", "item_id": "i1", "type": "VIEW", "timestamp": now, "event_id": f"{unique}-c1"},
        {"user_id": "bad id", "item_id": "i2", "type": "CLICK", "timestamp": now},
        {"user_id": f"c-{unique}", "item_id": "i3", "type": "PURCHASE", "timestamp": now + 86400 * 3},
    ]
    path = _write(tmp_path / "events.jsonl", "\n".join(json.dumps(r) for r in rows) + "\n")
    # Some rows refused by the server: exit 1, each reject named by its line and the server's reason.
    assert cli_main(["ingest", "events", str(path), "--addr", ing.addr, "--json"]) == 1
    out = json.loads(capsys.readouterr().out)
    assert (out["accepted"], out["duplicates"], out["rejected"]) == (1, 0, 2)
    assert [(r["line"], r["source"]) for r in out["first_rejects"]] == [(2, "server"), (3, "server")]
    assert "user_id" in out["first_rejects"][0]["reason"] and "future" in out["first_rejects"][1]["reason"]
    assert cli_main(["ingest", "events", str(path), "--addr", ing.addr, "--json"]) == 1
    again = json.loads(capsys.readouterr().out)
    assert (again["accepted"], again["duplicates"], again["rejected"]) == (0, 1, 2)


# ---------- property test against the real service ----------
ids = st.one_of(st.text(alphabet="abcXYZ019_.:@-", min_size=1, max_size=12), st.text(max_size=12))
random_event = st.builds(
    lambda uid, iid, eid, etype, dt, value, page: (uid, iid, eid, etype, dt, value, page),
    ids,
    ids,
    st.one_of(st.just(""), ids),
    st.integers(min_value=-2, max_value=8),
    st.one_of(st.none(), st.floats(min_value=-1e10, max_value=1e10)),
    st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.floats(min_value=0, max_value=1000)),
    st.text(max_size=300),
)


def _from_fields(fields: tuple[Any, ...]) -> common_pb2.Event:
    uid, iid, eid, etype, dt, value, page = fields
    e = common_pb2.Event(user_id=uid, item_id=iid, event_id=eid, type=etype, value=value)
    if dt is not None:
        e.timestamp.FromNanoseconds(int((time.time() + dt) * 1e9))
    e.context.page = page
    return e


def test_property_random_fields_never_crash_the_service(ing: Ingestion) -> None:
    statuses: list[str] = []
    with ing.channel() as ch:
        stub = ing.stub(ch)

        @settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
        @given(st.lists(random_event, max_size=6), st.booleans())
        def check(fields: list[tuple[Any, ...]], streamed: bool) -> None:
            request = ingestion_pb2.IngestEventsRequest(events=[_from_fields(f) for f in fields])
            try:
                if streamed:
                    list(stub.StreamEvents(iter([request]), timeout=10))
                else:
                    stub.IngestEvents(request, timeout=10)
                statuses.append("OK")
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.INVALID_ARGUMENT, (exc.code(), exc.details())
                statuses.append(exc.code().name)

        check()
    assert "OK" in statuses
    # Everything the service ever published on its topic is a valid, pseudonymized event.
    for record in read_records(ing.stack.kafka_bootstrap, ing.topic):
        event = common_pb2.Event.FromString(record.value)
        assert validate_event(event, now=time.time(), pseudonymized=True) is None, event
        assert record.key == event.user_id.encode()


def test_dedup_store_states_on_real_redis(ing: Ingestion, unique: str) -> None:
    from libs.common.stores import make_redis
    from services.ingestion.dedup import Claim, DedupStore

    store = DedupStore(make_redis(ing.stack.redis_url), window_s=60, pending_s=2)
    a, b = f"{unique}-a", f"{unique}-b"
    assert store.claim([a, b]) == [Claim.NEW, Claim.NEW]
    assert store.claim([a]) == [Claim.IN_PROGRESS]  # a concurrent request must retry, not be told "duplicate"
    store.settle([a], [b])
    assert store.claim([a, b]) == [Claim.DUPLICATE, Claim.NEW]
    # A claim whose owner died expires, and the event can be published again.
    assert wait_until(lambda: store.claim([b]) == [Claim.NEW], 10, 0.5)


def test_cancelled_stream_releases_its_in_flight_budget(ing: Ingestion, unique: str) -> None:
    release = threading.Event()

    def chunks() -> Iterator[ingestion_pb2.IngestEventsRequest]:
        for c in range(8):
            yield ingestion_pb2.IngestEventsRequest(events=[_ev(unique, c * 100 + i) for i in range(100)])
        release.wait(10)  # keep the stream open until the client cancels

    # Cancel right after the first ack, while later chunks are being published or wait for acks:
    # their admission must be returned even though nobody reads their answers.
    with ing.channel() as ch:
        call = ing.stub(ch).StreamEvents(chunks(), timeout=20)
        first = next(call)
        call.cancel()
        release.set()
    assert first.accepted == 100

    def idle() -> bool:
        body = urllib.request.urlopen(ing.metrics_url, timeout=5).read().decode()
        return "stylerec_ingestion_inflight_events 0.0" in body

    assert wait_until(idle, 10, 0.3)
