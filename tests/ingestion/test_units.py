"""Unit tests of the ingestion domain modules; collaborators (producer, Redis) are faked here only."""

from __future__ import annotations

import io
import math
import struct
import subprocess
import sys
import time
import zlib
from collections.abc import Sequence
from typing import Any

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from pydantic import ValidationError
from stylerec.v1 import common_pb2, ingestion_pb2

from libs.common.pseudonym import Pseudonymizer
from services.ingestion.archiver import archived_problem, event_document
from services.ingestion.config import IngestionSettings
from services.ingestion.dedup import Claim
from services.ingestion.events import EventIntake, RequestRejected, deterministic_event_id
from services.ingestion.images import ImageError, _check_url, check_image
from services.ingestion.publisher import BatchResult, PendingBatch
from services.ingestion.validation import PSEUDONYM_RE, EventLimits, ItemLimits, validate_event, validate_item
from tests.ingestion.conftest import make_event, with_overrides

NOW = time.time()


# ---------- event validation ----------
def _ev(**kw: Any) -> common_pb2.Event:
    return with_overrides(make_event("u1", "i1", ts=NOW), **kw)


@pytest.mark.parametrize(
    ("event", "reason"),
    [
        (_ev(user_id=""), "user_id is required"),
        (_ev(item_id=""), "item_id is required"),
        (_ev(user_id="x" * 129), "user_id longer than 128"),
        (_ev(item_id="a b"), "item_id has characters outside"),
        (_ev(event_id="é"), "event_id has characters outside"),
        (_ev(type=0), "not one of VIEW"),
        (_ev(type=99), "not one of VIEW"),
        (_ev(no_ts=True), "timestamp is required"),
        (_ev(ts=NOW + 3600), "in the future"),
        (_ev(ts=NOW - 30 * 365 * 86400), "older than"),
        (_ev(value=-1.0), "value must be"),
        (_ev(value=math.nan), "value must be"),
        (_ev(value=math.inf), "value must be"),
        (_ev(value=2e9), "value must be"),
        (_ev(page="p" * 300), "context.page longer than"),
        (_ev(device="a\nb"), "context.device has control characters"),
    ],
)
def test_validate_event_reasons(event: common_pb2.Event, reason: str) -> None:
    problem = validate_event(event, EventLimits(), now=NOW)
    assert problem is not None and reason in problem


def test_validate_event_accepts_good_and_bad_nanos() -> None:
    assert validate_event(_ev(value=3.0, session_id="s1", device="ios", page="/p"), now=NOW) is None
    e = _ev()
    e.timestamp.nanos = -5
    assert "nanos" in (validate_event(e, now=NOW) or "")


def test_deterministic_id_is_stable_and_independent_of_raw_id() -> None:
    e = _ev()
    a = deterministic_event_id(e, "u_" + "a" * 32)
    assert a == deterministic_event_id(e, "u_" + "a" * 32)
    assert a != deterministic_event_id(e, "u_" + "b" * 32)
    assert a.startswith("e_") and "u1" not in a


# ---------- items ----------
LIM = ItemLimits(max_image_bytes=1000, max_attributes=2)


def _item(**kw: Any) -> common_pb2.Item:
    item = common_pb2.Item(item_id="sku-1", title="Dress", category="dresses", brand="Acme", price=10)
    for k, v in kw.items():
        if k == "attributes":
            item.attributes.update(v)
        elif k == "image_data":
            item.image.data = v
        elif k == "image_url":
            item.image.url = v
        else:
            setattr(item, k, v)
    return item


@pytest.mark.parametrize(
    ("item", "reason"),
    [
        (_item(item_id=""), "item_id is required"),
        (_item(title="  "), "title is required"),
        (_item(title="x" * 600), "title longer than"),
        (_item(brand="a\x00b"), "brand has control characters"),
        (_item(price=-1), "price must be"),
        (_item(price=math.nan), "price must be"),
        (_item(attributes={"a": "1", "b": "2", "c": "3"}), "more than 2"),
        (_item(attributes={"color": "x" * 300}), "attributes[color]"),
        (_item(image_ref="abc"), "image_ref is set by the catalog"),
        (_item(image_data=b"x" * 2000), "larger than 1000 bytes"),
        (_item(image_url="ftp://example.com/a.jpg"), "http:// or https://"),
        (_item(image_url="file:///etc/passwd"), "http:// or https://"),
    ],
)
def test_validate_item_reasons(item: common_pb2.Item, reason: str) -> None:
    problem = validate_item(item, LIM)
    assert problem is not None and reason in problem


def _png(w: int, h: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (200, 10, 10)).save(buf, "PNG")
    return buf.getvalue()


def _png_claiming(w: int, h: int) -> bytes:
    """A PNG whose header claims w x h pixels (valid CRC) but carries no pixel data: a bomb's header."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def test_check_image_accepts_png_and_rejects_bad_bytes() -> None:
    ok = check_image(_png(32, 16), max_bytes=10_000, max_pixels=10_000)
    assert (ok.content_type, ok.width, ok.height) == ("image/png", 32, 16)
    with pytest.raises(ImageError, match="not a readable"):
        check_image(b"this is not an image", max_bytes=10_000, max_pixels=10_000)
    with pytest.raises(ImageError, match="larger than"):
        check_image(_png(64, 64), max_bytes=100, max_pixels=10_000)
    with pytest.raises(ImageError, match=r"exceeds|decompression bomb"):
        check_image(_png_claiming(50_000, 50_000), max_bytes=10_000, max_pixels=10_000)
    data = _png(32, 32)
    with pytest.raises(ImageError):
        check_image(data[: len(data) // 2], max_bytes=10_000, max_pixels=10_000)


def test_url_checks_block_private_addresses_unless_allowed() -> None:
    with pytest.raises(ImageError, match="private or loopback"):
        _check_url("http://127.0.0.1:8080/a.png", allow_private=False)
    with pytest.raises(ImageError, match="credentials"):
        _check_url("http://user:pw@127.0.0.1/a.png", allow_private=True)
    with pytest.raises(ImageError, match="http"):
        _check_url("gopher://127.0.0.1/a.png", allow_private=True)
    _check_url("http://127.0.0.1:8080/a.png", allow_private=True)


# ---------- settings ----------
def test_settings_refuse_batch_larger_than_inflight_budget() -> None:
    with pytest.raises(ValidationError, match="max_inflight_events"):
        IngestionSettings(max_batch_events=100, max_inflight_events=10)


def test_prod_mode_refuses_to_start_without_secret() -> None:
    env = {"STYLEREC_MODE": "prod", "STYLEREC_PSEUDONYM_SECRET": "", "PATH": "/usr/bin:/bin"}
    res = subprocess.run(
        [sys.executable, "-m", "services.ingestion", "--role", "api"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 2
    assert "STYLEREC_PSEUDONYM_SECRET must be set" in res.stderr


def test_archiver_document_and_checks() -> None:
    e = make_event("u_" + "0" * 32, "i1", event_id="e1", value=2.0)
    e.context.device = "ios"
    doc = event_document(e)
    assert doc["user_id"] == "u_" + "0" * 32 and doc["type"] == common_pb2.VIEW and doc["context"]["device"] == "ios"
    assert archived_problem(e) is None
    assert "pseudonym" in (archived_problem(make_event("raw-user", "i1", event_id="e1")) or "")
    assert "event_id" in (archived_problem(make_event("u_" + "0" * 32, "i1")) or "")


# ---------- property test of the intake pipeline (fake broker and fake Redis) ----------
class FakePublisher:
    """Records what would be published; acknowledges everything."""

    def __init__(self) -> None:
        self.sent: list[tuple[bytes, bytes]] = []
        self.inflight = 0

    def admit(self, n: int) -> None:
        self.inflight += n

    def release(self, n: int) -> None:
        self.inflight -= n

    def send(self, topic: str, records: Sequence[tuple[bytes, bytes]], admitted: int) -> PendingBatch:
        self.sent.extend(records)
        return PendingBatch(admitted=admitted, futures=[None] * len(records))

    def wait(self, batch: PendingBatch, topic: str, on_late: Any = None) -> BatchResult:
        self.release(batch.admitted)
        n = len(batch.futures)
        return BatchResult(ok=[True] * n, unknown=[False] * n, error=None)


class FakeDedup:
    def __init__(self) -> None:
        self.state: dict[str, str] = {}

    def claim(self, ids: Sequence[str]) -> list[Claim]:
        out = []
        for eid in ids:
            prev = self.state.get(eid)
            if prev is None:
                self.state[eid] = "p"
                out.append(Claim.NEW)
            else:
                out.append(Claim.IN_PROGRESS if prev == "p" else Claim.DUPLICATE)
        return out

    def settle(self, published: Sequence[str], failed: Sequence[str]) -> None:
        for eid in published:
            self.state[eid] = "1"
        for eid in failed:
            self.state.pop(eid, None)


texts = st.one_of(
    st.text(max_size=40),
    st.text(alphabet="abcXYZ019_.:@/+=-", min_size=1, max_size=20),
    st.sampled_from(["", "u1", "x" * 200, "a b", "\x00", "ü"]),
)
events_strategy = st.builds(
    lambda uid, iid, eid, etype, secs, nanos, value, page: _raw_event(uid, iid, eid, etype, secs, nanos, value, page),
    texts,
    texts,
    texts,
    st.integers(min_value=-3, max_value=9),
    st.one_of(st.none(), st.integers(min_value=-(2**40), max_value=2**40), st.just(int(NOW))),
    st.integers(min_value=0, max_value=999_999_999),
    st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.floats(min_value=0, max_value=100)),
    st.text(max_size=300),
)


def _raw_event(
    uid: str, iid: str, eid: str, etype: int, secs: int | None, nanos: int, value: float, page: str
) -> common_pb2.Event:
    e = common_pb2.Event(user_id=uid, item_id=iid, event_id=eid, type=etype, value=value)  # type: ignore[arg-type]
    if secs is not None:
        e.timestamp.seconds = secs
        e.timestamp.nanos = nanos
    e.context.page = page
    return e


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(events_strategy, max_size=8))
def test_property_random_events_never_crash_and_never_publish_invalid(events: list[common_pb2.Event]) -> None:
    cfg = IngestionSettings(max_batch_events=10, max_inflight_events=100)
    pub, dedup = FakePublisher(), FakeDedup()
    intake = EventIntake(cfg, pub, dedup, Pseudonymizer("k"))  # type: ignore[arg-type]
    raw_ids = {e.user_id for e in events}
    request = ingestion_pb2.IngestEventsRequest(events=events)
    try:
        resp = intake.finish(intake.prepare(request, "IngestEvents"))
    except RequestRejected as exc:
        assert exc.code == grpc.StatusCode.INVALID_ARGUMENT
        assert not pub.sent
        return
    assert resp.accepted + resp.duplicates + len(resp.rejected) == len(events)
    assert resp.accepted == len(pub.sent)
    assert pub.inflight == 0
    for key, value in pub.sent:
        out = common_pb2.Event.FromString(value)
        assert validate_event(out, now=time.time(), pseudonymized=True) is None
        assert PSEUDONYM_RE.match(out.user_id) and key == out.user_id.encode()
        assert out.user_id not in raw_ids


# ---------- publisher admission and circuit (fake KafkaProducer) ----------
class _DoneFuture:
    is_done = True

    def get(self, timeout: float | None = None) -> None:
        return None


class _FakeKafka:
    def __init__(self, **config: Any) -> None:
        self.config = config
        self.fail_with: Exception | None = None

    def send(self, topic: str, value: bytes, key: bytes) -> Any:
        if self.fail_with is not None:
            raise self.fail_with
        return _DoneFuture()

    def flush(self, timeout: float | None = None) -> None:
        pass

    def close(self, timeout: float | None = None) -> None:
        pass


def test_publisher_admission_budget_and_broker_circuit() -> None:
    from kafka.errors import KafkaTimeoutError

    from services.ingestion.publisher import BrokerUnavailable, EventPublisher, Overloaded

    cfg = IngestionSettings(
        max_batch_events=10, max_inflight_events=10, admission_wait_s=0.01, broker_cooldown_s=30, publish_timeout_s=1
    )
    pub = EventPublisher(cfg, factory=_FakeKafka)
    with pytest.raises(BrokerUnavailable, match="not connected"):
        pub.admit(1)
    pub.start()
    assert pub.wait_ready(5)
    assert pub._producer.config["acks"] == "all" and pub._producer.config["enable_idempotence"] is False
    pub.admit(8)
    with pytest.raises(Overloaded) as over:
        pub.admit(3)
    assert over.value.retry_after_s > 0
    batch = pub.send("t", [(b"k", b"v")] * 8, admitted=8)
    assert pub.wait(batch, "t").error is None and pub.inflight == 0
    pub._producer.fail_with = KafkaTimeoutError("no metadata")
    pub.admit(2)
    failed = pub.send("t", [(b"k", b"v")] * 2, admitted=2)
    result = pub.wait(failed, "t")
    assert result.error and "unreachable" in result.error and result.ok == [False, False]
    with pytest.raises(BrokerUnavailable, match="failing"):
        pub.admit(1)  # the circuit is open: fail fast instead of waiting on a dead broker
    assert pub.inflight == 0


# ---------- attribution matching ----------
def test_attribution_match_rules() -> None:
    from services.ingestion.attribution import Outcome, match

    u, v = "u_" + "1" * 32, "u_" + "2" * 32
    imps = [
        {"_id": "rec_a", "user_id": u, "items": ["x", "y"], "ts": 1000.0},
        {"_id": "rec_b", "user_id": u, "items": ["y"], "ts": 1500.0},
        {"_id": "rec_c", "user_id": v, "items": ["x"], "ts": 1900.0},
    ]
    window = 600.0

    def o(item: str, ts: float, rid: str = "", user: str = u) -> Outcome:
        return Outcome("e", user, item, "click", ts, rid)

    assert match(o("y", 1550), imps, window, 60)["_id"] == "rec_b"  # type: ignore[index]  # last touch
    assert match(o("x", 1550), imps, window, 60)["_id"] == "rec_a"  # type: ignore[index]
    assert match(o("x", 1700), imps, window, 60) is None  # rec_a is 700 s back: outside the window
    assert match(o("x", 990), imps, window, 60)["_id"] == "rec_a"  # type: ignore[index]  # clock skew allowed
    assert match(o("x", 900), imps, window, 60) is None  # before the skew allowance: not yet
    assert match(o("x", 1010, "rec_a"), imps, window, 60)["_id"] == "rec_a"  # type: ignore[index]
    assert match(o("x", 1010, "rec_c"), imps, window, 60) == "other_user"
    assert match(o("z", 1010, "rec_a"), imps, window, 60) == "item_not_shown"
    assert match(o("x", 5000, "rec_a"), imps, window, 60) == "outside_window"
    assert match(o("x", 1010, "rec_zzz"), imps, window, 60) is None  # its impression may still come
    # A list shown just after the click (within the skew allowance) does not steal it from the one acted on.
    later = [*imps, {"_id": "rec_d", "user_id": u, "items": ["y"], "ts": 1560.0}]
    assert match(o("y", 1550), later, window, 60)["_id"] == "rec_b"  # type: ignore[index]


def test_recommendation_id_validation() -> None:
    from services.ingestion.validation import validate_event

    e = make_event("shopper", "i1", common_pb2.CLICK)
    assert validate_event(e) is None
    e.recommendation_id = "rec_" + "ab" * 16
    assert validate_event(e) is None
    e.recommendation_id = "rec_" + "AB" * 16
    assert (validate_event(e) or "").startswith("recommendation_id must be")
