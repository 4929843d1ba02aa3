"""Shared by the privacy and forget tests: a private stack, one end-to-end shop scenario, and a
scan of every store the stack writes (Kafka topics, MongoDB collections incl. GridFS, Redis keys
and values, log files) for given strings.

Each test module runs its own stack (own broker, Redis, Mongo-protocol server, four services,
own log directory), so a scan sees exactly what that module's run produced and nothing another
test stored.
"""

from __future__ import annotations

import io
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import grpc
import numpy as np
import redis
from bson import json_util
from gridfs import GridFSBucket
from kafka import KafkaAdminClient, KafkaConsumer, TopicPartition
from PIL import Image
from pymongo import MongoClient
from pymongo.database import Database
from stylerec.v1 import (
    admin_pb2_grpc,
    common_pb2,
    gateway_pb2,
    gateway_pb2_grpc,
    ingestion_pb2,
    ingestion_pb2_grpc,
    scoring_pb2,
    scoring_pb2_grpc,
)

from cli.localstack.stack import SERVICES, Stack
from libs.common.pseudonym import Pseudonymizer

T = TypeVar("T")
SECRET = "security-test-pseudonym-secret"
pseudo = Pseudonymizer(SECRET)
# Faster feeds than the defaults, so the scenario's waits stay short on a 2-core box.
STACK_ENV = {
    "STYLEREC_PSEUDONYM_SECRET": SECRET,
    "STYLEREC_ARCHIVE_SYNC_S": "1",
    "STYLEREC_POPULAR_EVERY_S": "0",
    "STYLEREC_HEALTH_INTERVAL_S": "0.5",
    "STYLEREC_KAFKA_SESSION_TIMEOUT_MS": "6000",
    "STYLEREC_KAFKA_MAX_POLL_INTERVAL_MS": "10000",
}


def poll(what: str, fn: Callable[[], T], ok: Callable[[T], bool], timeout_s: float, every_s: float = 0.5) -> T:
    end = time.monotonic() + timeout_s
    while True:
        value = fn()
        if ok(value):
            return value
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}; last: {value}")
        time.sleep(every_s)


def start_private_stack(directory: Path) -> Stack:
    stack = Stack(dir=directory)
    stack.env_overrides = dict(STACK_ENV)
    try:
        stack.start_infra()
        stack.start_services(SERVICES, timeout_s=180)
    except BaseException:
        stack.down()
        raise
    return stack


@dataclass
class Clients:
    stack: Stack
    channels: list[grpc.Channel] = field(default_factory=list)

    def _ch(self, name: str) -> grpc.Channel:
        ch = grpc.insecure_channel(self.stack.addr_of(name))
        self.channels.append(ch)
        return ch

    def __post_init__(self) -> None:
        self.ingestion = ingestion_pb2_grpc.IngestionServiceStub(self._ch("ingestion"))
        self.admin = admin_pb2_grpc.AdminServiceStub(self._ch("ingestion"))
        self.gateway = gateway_pb2_grpc.GatewayServiceStub(self._ch("gateway"))
        self.scoring = scoring_pb2_grpc.ScoringServiceStub(self._ch("scoring"))
        self.mongo: MongoClient[dict[str, Any]] = MongoClient(self.stack.mongo_uri, serverSelectionTimeoutMS=5000)
        self.db: Database[dict[str, Any]] = self.mongo["stylerec"]
        self.redis = redis.Redis.from_url(self.stack.redis_url)

    def close(self) -> None:
        for ch in self.channels:
            ch.close()
        self.mongo.close()
        self.redis.close()


def picture(color: tuple[int, int, int], size: int = 96) -> bytes:
    yy, xx = np.mgrid[0:size, 0:size]
    arr = np.zeros((size, size, 3), np.uint8)
    arr[:] = color
    arr[(np.sin(xx / 5.0) + np.cos(yy / 7.0)) > 0.5] = (250, 250, 240)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=85)
    return buf.getvalue()


def event(user: str, item: str, etype: int, ts: float, event_id: str = "", session: str = "") -> common_pb2.Event:
    e = common_pb2.Event(user_id=user, item_id=item, type=etype, event_id=event_id)  # type: ignore[arg-type]
    e.timestamp.FromNanoseconds(int(ts * 1e9))
    if session:
        e.context.session_id = session
    return e


@dataclass
class Scenario:
    lover: str  # raw ids
    gifter: str
    visitors: list[str]
    prints: list[str]
    photos: list[str]
    photo_category: str
    lover_events: int
    total_events: int
    stylized_item: str = ""
    model_users: int = 0

    @property
    def raw_ids(self) -> list[str]:
        return [self.lover, self.gifter, *self.visitors]


def run_scenario(c: Clients, unique: str) -> Scenario:
    """Items with photos, events through ingestion, archive, training, personalized recommendations
    through the gateway and one stylized image streamed: every path a user id travels."""
    prints = [f"print-a-{unique}", f"print-b-{unique}"]
    photos = [f"photo-a-{unique}", f"photo-b-{unique}"]
    mug = f"mug-{unique}"
    photo_cat = f"photo-{unique}"
    colors = [(20, 40, 160), (200, 90, 20), (120, 70, 30), (30, 160, 40)]
    items = [
        common_pb2.Item(
            item_id=i,
            title=f"Item {i}",
            category="art-print" if i in prints else photo_cat,
            price=20.0,
            image=common_pb2.Image(data=picture(col), content_type="image/jpeg"),
        )
        for i, col in zip(prints + photos, colors, strict=True)
    ]
    items.append(common_pb2.Item(item_id=mug, title="Mug", category="gift", price=3.5))
    up = c.ingestion.UpsertItems(ingestion_pb2.UpsertItemsRequest(items=items), timeout=60)
    assert up.upserted == len(items), up.rejected

    def embedded() -> int:
        # Checked here, not by {"$ne": None}: nx-27017 matches documents *without* the field with it
        # (MongoDB does not), so that poll passed before any photo was embedded and the lover's
        # profile was then computed without the prints' embeddings.
        docs = c.db["items"].find({"_id": {"$in": prints + photos}}, {"style_embedding_ref": 1})
        return sum(1 for d in docs if d.get("style_embedding_ref"))

    poll("the style worker to embed the photos", embedded, lambda n: n == len(prints + photos), 180, 1.0)

    lover, gifter = f"shopper-{unique}@example.com", f"gifter-{unique}@example.com"
    visitors = [f"visitor-{n}-{unique}@example.com" for n in range(4)]
    now = time.time()
    lover_events = [
        # An event id and a session id quoting the raw id: ingestion must not store them as given.
        event(lover, prints[0], common_pb2.FAVORITE, now - 50, event_id=f"order-{lover}-1", session=f"s-{lover}"),
        event(lover, prints[0], common_pb2.ADD_TO_CART, now - 40),
        event(lover, prints[0], common_pb2.PURCHASE, now - 30),
        event(lover, prints[1], common_pb2.PURCHASE, now - 20),
        event(lover, mug, common_pb2.PURCHASE, now - 15),
    ]
    others = [
        event(gifter, mug, common_pb2.PURCHASE, now - 12),
        *[event(v, photos[n % 2], common_pb2.PURCHASE, now - 10 + n) for n, v in enumerate(visitors)],
        *[event(v, mug, common_pb2.VIEW, now - 5 + n) for n, v in enumerate(visitors)],
    ]
    resp = c.ingestion.IngestEvents(ingestion_pb2.IngestEventsRequest(events=lover_events + others), timeout=30)
    assert resp.accepted == len(lover_events) + len(others), resp.rejected
    total = len(lover_events) + len(others)
    poll("the archive to hold every event", lambda: c.db["events"].count_documents({}), lambda n: n == total, 60)

    trained = c.scoring.Train(scoring_pb2.TrainRequest(wait=True), timeout=120)
    assert trained.status == "published"
    info = c.scoring.ModelInfo(scoring_pb2.ModelInfoRequest(), timeout=10)

    def ask() -> gateway_pb2.GetRecommendationsResponse:
        return c.gateway.GetRecommendations(
            gateway_pb2.GetRecommendationsRequest(
                user_id=lover, k=4, want_stylized=True, filters=gateway_pb2.Filters(category=photo_cat)
            ),
            timeout=10,
        )

    poll(
        "a STYLE_PERSONALIZED answer for the lover",
        ask,
        lambda r: r.strategy == gateway_pb2.STYLE_PERSONALIZED and len(r.items) > 0,
        90,
    )
    ready = poll(
        "the stylized photos",
        ask,
        lambda r: len(r.items) > 0 and all(it.stylized_status == gateway_pb2.STYLIZED_READY for it in r.items),
        240,
        1.0,
    )
    target = ready.items[0].item_id
    chunks = list(
        c.gateway.GetStylizedImage(gateway_pb2.GetStylizedImageRequest(user_id=lover, item_id=target), timeout=15)
    )
    data = b"".join(ch.data for ch in chunks)
    Image.open(io.BytesIO(data)).verify()
    # The gifter and visitors ask too (CF / POPULAR paths).
    for raw in [gifter, *visitors]:
        c.gateway.GetRecommendations(gateway_pb2.GetRecommendationsRequest(user_id=raw, k=4), timeout=10)
    return Scenario(
        lover=lover,
        gifter=gifter,
        visitors=visitors,
        prints=prints,
        photos=photos,
        photo_category=photo_cat,
        lover_events=len(lover_events),
        total_events=total,
        stylized_item=target,
        model_users=int(info.users),
    )


# ---------------------------------------------------------------- the scan
@dataclass
class Finding:
    where: str
    needle: str
    excerpt: str

    def __str__(self) -> str:
        return f"{self.where}: {self.needle!r} in {self.excerpt[:200]!r}"


def _search(where: str, blob: bytes, needles: list[bytes], out: list[Finding]) -> None:
    for n in needles:
        at = blob.find(n)
        if at != -1:
            out.append(Finding(where, n.decode(), blob[max(0, at - 80) : at + 80].decode(errors="replace")))


def kafka_records(bootstrap: str, idle_s: float = 2.0) -> Iterator[tuple[str, bytes, bytes]]:
    """(topic, key, value) of every record of every topic, from the beginning.

    Reads until nothing new arrives for ``idle_s`` (the embedded broker's end offsets are not
    exact enough to stop on)."""
    admin = KafkaAdminClient(bootstrap_servers=[bootstrap])
    try:
        topics = sorted(admin.list_topics())
    finally:
        admin.close()
    consumer = KafkaConsumer(bootstrap_servers=[bootstrap], enable_auto_commit=False)
    try:
        parts = [TopicPartition(t, p) for t in topics for p in sorted(consumer.partitions_for_topic(t) or [])]
        consumer.assign(parts)
        consumer.seek_to_beginning(*parts)
        quiet_since = time.monotonic()
        while time.monotonic() - quiet_since < idle_s:
            polled = consumer.poll(timeout_ms=300)
            for tp, records in polled.items():
                for r in records:
                    yield tp.topic, r.key or b"", r.value or b""
            if polled:
                quiet_since = time.monotonic()
    finally:
        consumer.close()


def scan_kafka(bootstrap: str, needles: list[str]) -> tuple[list[Finding], dict[str, int]]:
    found: list[Finding] = []
    counts: dict[str, int] = {}
    bneedles = [n.encode() for n in needles]
    for topic, key, value in kafka_records(bootstrap):
        counts[topic] = counts.get(topic, 0) + 1
        _search(f"kafka {topic} key", key, bneedles, found)
        _search(f"kafka {topic} value", value, bneedles, found)
    return found, counts


def scan_mongo(db: Database[dict[str, Any]], needles: list[str]) -> tuple[list[Finding], dict[str, int]]:
    """Every document of every collection as BSON-JSON, and every GridFS file: metadata and content.

    GridFS goes through the bucket API: the embedded Mongo-protocol server lists a bucket as
    ``fs_files``/``fs_chunks`` and cannot answer a plain find on those names, while real MongoDB
    lists ``fs.files``/``fs.chunks``; ``<bucket>.files`` queries and downloads work on both.
    """
    found: list[Finding] = []
    counts: dict[str, int] = {}
    bneedles = [n.encode() for n in needles]
    buckets: set[str] = set()
    for name in sorted(db.list_collection_names()):
        for suffix in ("_files", ".files", "_chunks", ".chunks"):
            if name.endswith(suffix):
                buckets.add(name[: -len(suffix)])
                break
        else:
            n = 0
            for doc in db[name].find({}):
                n += 1
                _search(f"mongo {name} {doc.get('_id')}", json_util.dumps(doc).encode(), bneedles, found)
            counts[name] = n
    for prefix in sorted(buckets):
        bucket = GridFSBucket(db, bucket_name=prefix)
        files = list(db[f"{prefix}.files"].find({}))
        counts[f"{prefix}.files"] = len(files)
        content = 0
        for doc in files:
            where = f"mongo gridfs {prefix} {doc['_id']}"
            _search(where + " metadata", json_util.dumps(doc).encode(), bneedles, found)
            with bucket.open_download_stream(doc["_id"]) as stream:
                data = stream.read()
            content += len(data)
            _search(where + " content", data, bneedles, found)
        counts[f"{prefix}.content_bytes"] = content
    return found, counts


def scan_redis(r: redis.Redis, needles: list[str]) -> tuple[list[Finding], int]:
    """Every key name and value, whatever the type."""
    found: list[Finding] = []
    bneedles = [n.encode() for n in needles]
    n = 0
    for db_index in range(16):
        rd = r.connection_pool.connection_kwargs.copy()
        client: Any = redis.Redis(host=rd.get("host", "127.0.0.1"), port=rd.get("port", 6379), db=db_index)
        try:
            for key in client.scan_iter(count=500):
                n += 1
                kind = client.type(key).decode()
                parts: list[bytes] = [key]
                if kind == "string":
                    parts.append(client.get(key) or b"")
                elif kind == "hash":
                    for k, v in client.hgetall(key).items():
                        parts += [k, v]
                elif kind == "set":
                    parts += list(client.smembers(key))
                elif kind == "zset":
                    parts += [m for m, _ in client.zrange(key, 0, -1, withscores=True)]
                elif kind == "list":
                    parts += list(client.lrange(key, 0, -1))
                elif kind == "stream":
                    for _id, fields in client.xrange(key):
                        for k, v in fields.items():
                            parts += [k, v]
                _search(f"redis db{db_index} {key!r}", b"\x00".join(parts), bneedles, found)
        finally:
            client.close()
    return found, n


def scan_logs(directory: Path, needles: list[str], names: list[str] | None = None) -> tuple[list[Finding], int]:
    found: list[Finding] = []
    bneedles = [n.encode() for n in needles]
    lines = 0
    for path in sorted(directory.glob("*.log")):
        if names is not None and path.stem not in names:
            continue
        for n, line in enumerate(path.read_bytes().splitlines(), 1):
            lines += 1
            _search(f"log {path.name}:{n}", line, bneedles, found)
    return found, lines
