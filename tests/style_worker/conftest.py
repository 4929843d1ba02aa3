"""Fixtures of the style-worker tests: the real networks on CPU, generated images, a real worker process.

The worker under test gets its own topics (``style-jobs-<token>`` …) and
consumer groups, so it never competes with a stack-level style worker for the
jobs of these tests; the dead-letter topic is the real shared one, read by key.
"""

from __future__ import annotations

import io
import struct
import time
import uuid
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import gridfs
import numpy as np
import pytest
import redis
from bson import ObjectId
from kafka import KafkaConsumer, TopicPartition
from PIL import Image
from pymongo import MongoClient
from stylerec.v1 import common_pb2

from cli.localstack.stack import Stack
from libs.common.kafka import ProtoProducer, dead_letter_topic, ensure_topics
from services.style_worker.config import StyleWorkerSettings
from services.style_worker.engine import StyleEngine

# ---------------------------------------------------------------- images


def photo(w: int = 160, h: int = 120, seed: int = 0) -> Image.Image:
    """A product-like test photo: smooth gradient plus a few solid shapes (generated, synthetic)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    arr = np.stack([xx / w, yy / h, 0.5 + 0.5 * np.sin(xx / 9.0 + seed)], axis=-1)
    for _ in range(3):
        y0, x0 = int(rng.integers(0, h // 2)), int(rng.integers(0, w // 2))
        arr[y0 : y0 + h // 3, x0 : x0 + w // 3] = rng.random(3)
    return Image.fromarray((arr * 255).astype(np.uint8), "RGB")


def texture(size: int = 128, seed: int = 1) -> Image.Image:
    """A strongly patterned 'style' image (generated, synthetic)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    f = rng.uniform(3, 12, 3)
    arr = np.stack([0.5 + 0.5 * np.sin(2 * np.pi * fi * (xx + yy * (i + 1))) for i, fi in enumerate(f)], axis=-1)
    return Image.fromarray((arr * 255).astype(np.uint8), "RGB")


def encoded(img: Image.Image, fmt: str = "PNG", **kw: Any) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def png_with_header_size(width: int, height: int) -> bytes:
    """A tiny valid-looking PNG whose IHDR claims ``width`` x ``height`` (a decompression-bomb header)."""
    data = bytearray(encoded(Image.new("L", (8, 8), 0)))
    # IHDR chunk: 8-byte signature, 4-byte length, b"IHDR", then width/height.
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(data[12:29])) & 0xFFFFFFFF
    data[29:33] = struct.pack(">I", crc)
    return bytes(data)


@pytest.fixture(scope="session")
def engine() -> Iterator[StyleEngine]:
    """The real networks on the CPU with the worker's default settings (providers probed)."""
    eng = StyleEngine.from_settings(StyleWorkerSettings(max_batch_delay_ms=5))
    yield eng
    eng.close()


# ---------------------------------------------------------------- a real worker process


@dataclass
class Worker:
    stack: Stack
    name: str
    token: str
    env: dict[str, str]
    db: Any
    fs: gridfs.GridFS
    redis: redis.Redis
    producer: ProtoProducer

    @property
    def jobs_topic(self) -> str:
        return f"style-jobs-{self.token}"

    @property
    def updates_topic(self) -> str:
        return f"item-updates-{self.token}"

    @property
    def results_topic(self) -> str:
        return f"style-results-{self.token}"

    @property
    def addr(self) -> str:
        return self.stack.addr_of(self.name)

    def start(self, extra: dict[str, str] | None = None) -> None:
        self.stack.start_service("style-worker", self.name, {**self.env, **(extra or {})})
        self.stack.wait_serving([self.name], timeout_s=90)

    def seed_item(self, item_id: str, image: bytes | None) -> str:
        """Catalog stand-in: the photo into GridFS, the item into Mongo (as ingestion does)."""
        ref = ""
        if image is not None:
            ref = str(self.fs.put(image, filename=f"items/{item_id}", metadata={"kind": "item-image"}))
        doc = {"_id": item_id, "title": item_id, "image_ref": ref, "created_at": time.time()}
        self.db.items.replace_one({"_id": item_id}, doc, upsert=True)
        return ref

    def stylized_files(self, content: str, style: str) -> list[dict[str, Any]]:
        return list(
            self.db.fs.files.find(
                {"metadata.kind": "stylized", "metadata.content_item_id": content, "metadata.style_item_id": style}
            )
        )


def read_topic(bootstrap: str, topic: str, match: Callable[[Any], bool], want: int, timeout_s: float = 60) -> list[Any]:
    """Records of ``topic`` (all partitions, from the start) for which ``match`` holds, until ``want`` or timeout."""
    consumer = KafkaConsumer(bootstrap_servers=[bootstrap], enable_auto_commit=False, consumer_timeout_ms=500)
    try:
        parts = consumer.partitions_for_topic(topic) or set()
        deadline = time.monotonic() + 10
        while not parts and time.monotonic() < deadline:
            time.sleep(0.2)
            parts = consumer.partitions_for_topic(topic) or set()
        tps = [TopicPartition(topic, p) for p in parts]
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        found: list[Any] = []
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and len(found) < want:
            for batch in consumer.poll(timeout_ms=300).values():
                found.extend(r for r in batch if match(r))
        return found
    finally:
        consumer.close()


def dead_letters(worker: Worker, key: str, want: int = 1, timeout_s: float = 60) -> list[common_pb2.DeadLetter]:
    topic = dead_letter_topic("style-worker")
    recs = read_topic(worker.stack.kafka_bootstrap, topic, lambda r: r.key == key.encode(), want, timeout_s)
    out = []
    for r in recs:
        dl = common_pb2.DeadLetter()
        dl.ParseFromString(r.value)
        out.append(dl)
    return out


def wait_for(predicate: Callable[[], Any], timeout_s: float = 60, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(0.1)


@pytest.fixture(scope="module")
def worker(infra: Stack) -> Iterator[Worker]:
    """A style-worker process on its own topics/groups, with small image limits for the guard tests."""
    token = uuid.uuid4().hex[:8]
    topics = {f"style-jobs-{token}": 2, f"item-updates-{token}": 1, f"style-results-{token}": 1}
    ensure_topics([infra.kafka_bootstrap], topics)
    env = {
        "STYLEREC_JOBS_TOPIC": f"style-jobs-{token}",
        "STYLEREC_ITEM_UPDATES_TOPIC": f"item-updates-{token}",
        "STYLEREC_RESULTS_TOPIC": f"style-results-{token}",
        "STYLEREC_JOBS_GROUP": f"style-worker-{token}",
        "STYLEREC_ITEM_UPDATES_GROUP": f"style-worker-items-{token}",
        "STYLEREC_MAX_IMAGE_BYTES": "300000",
        "STYLEREC_MAX_IMAGE_PIXELS": "4000000",
        "STYLEREC_MIN_IMAGE_SIDE": "32",
        "STYLEREC_MAX_BATCH_SIZE": "4",
        "STYLEREC_MAX_BATCH_DELAY_MS": "20",
        "STYLEREC_STYLIZED_TTL_S": "3600",
        "STYLEREC_MAX_OUTPUT_SIDE": "256",
        "STYLEREC_KAFKA_SESSION_TIMEOUT_MS": "6000",
        "STYLEREC_HEALTH_INTERVAL_S": "0.5",
    }
    client: MongoClient[Any] = MongoClient(infra.mongo_uri)
    db = client["stylerec"]
    r = redis.Redis.from_url(infra.redis_url)
    producer = ProtoProducer([infra.kafka_bootstrap], client_id=f"style-test-{token}")
    w = Worker(infra, f"style-worker-{token}", token, env, db, gridfs.GridFS(db), r, producer)
    w.start()
    try:
        yield w
    finally:
        infra.stop_component(w.name)
        producer.close()
        client.close()


def object_id(ref: str) -> ObjectId:
    return ObjectId(ref)
