"""Inference failures: a poison job is isolated and parked, an outage is retried (real stores, faked engine).

The processor runs in-process against the session's real broker, Redis and
Mongo-protocol server; only the engine is wrapped, because the real networks
never fail on the inputs the image pipeline hands them.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator, Sequence
from types import SimpleNamespace
from typing import Any

import gridfs
import numpy as np
import pytest
import redis
from PIL import Image
from pymongo import MongoClient
from stylerec.v1 import style_pb2

from cli.localstack.stack import Stack
from libs.common import keys
from libs.common.kafka import Decoded, ProtoProducer, ensure_topics
from services.style_worker.config import StyleWorkerSettings
from services.style_worker.engine import StyleEngine
from services.style_worker.jobs import StyleJobProcessor
from tests.style_worker.conftest import dead_letters, encoded, photo

POISON_WIDTH = 77

pytestmark = pytest.mark.integration


class PoisonEngine:
    """The real engine, except that it chokes on photos 77 pixels wide, or on everything when 'down'."""

    def __init__(self, real: StyleEngine) -> None:
        self.real = real
        self.limits = real.limits
        self.down = False

    def decode(self, data: bytes) -> Image.Image:
        return self.real.decode(data)

    def embed_many(self, imgs: Sequence[Image.Image]) -> list[np.ndarray]:
        if self.down or any(i.size[0] == POISON_WIDTH for i in imgs):
            raise RuntimeError("onnxruntime: simulated kernel failure")
        return self.real.embed_many(imgs)

    def stylize_many(self, requests: Sequence[Any]) -> list[Image.Image]:
        return self.real.stylize_many(requests)


@pytest.fixture(scope="module")
def rig(infra: Stack, engine: StyleEngine) -> Iterator[SimpleNamespace]:
    token = uuid.uuid4().hex[:8]
    results = f"style-results-poison-{token}"
    ensure_topics([infra.kafka_bootstrap], {results: 1})
    settings = StyleWorkerSettings(results_topic=results, max_job_attempts=3)
    client: MongoClient[Any] = MongoClient(infra.mongo_uri)
    db = client["stylerec"]
    r = redis.Redis.from_url(infra.redis_url)
    producer = ProtoProducer([infra.kafka_bootstrap], client_id=f"poison-{token}")
    poison = PoisonEngine(engine)
    proc = StyleJobProcessor(settings, poison, db, r, producer)  # type: ignore[arg-type]
    yield SimpleNamespace(proc=proc, engine=poison, db=db, fs=gridfs.GridFS(db), redis=r, stack=infra)
    producer.close()
    client.close()


_offset = iter(range(10**9))


def job(rig: SimpleNamespace, item: str, width: int) -> Decoded[style_pb2.StyleJob]:
    ref = str(rig.fs.put(encoded(photo(width, 60)), metadata={"kind": "item-image"}))
    rig.db.items.replace_one({"_id": item}, {"_id": item, "image_ref": ref}, upsert=True)
    msg = style_pb2.StyleJob(job_id=f"j-{item}", kind=style_pb2.EMBED, content_item_id=item)
    record = SimpleNamespace(
        topic="style-jobs", partition=0, offset=next(_offset), key=item.encode(), value=msg.SerializeToString()
    )
    return Decoded(record, msg)  # type: ignore[arg-type]


def test_poison_job_is_parked_and_the_rest_of_the_batch_completes(rig: SimpleNamespace, unique: str) -> None:
    good1, bad, good2 = f"p-good1-{unique}", f"p-bad-{unique}", f"p-good2-{unique}"
    batch = [job(rig, good1, 80), job(rig, bad, POISON_WIDTH), job(rig, good2, 90)]
    rig.proc.handle_jobs(batch)  # does not raise: the batch can be committed
    assert rig.redis.exists(keys.item_embedding(good1)) and rig.redis.exists(keys.item_embedding(good2))
    assert not rig.redis.exists(keys.item_embedding(bad))
    [dl] = dead_letters(SimpleNamespace(stack=rig.stack), bad)  # type: ignore[arg-type]
    assert dl.reason.startswith("inference_error: RuntimeError")


def test_lone_poison_job_is_retried_then_parked(rig: SimpleNamespace, unique: str) -> None:
    bad = f"p-lone-{unique}"
    batch = [job(rig, bad, POISON_WIDTH)]
    for _ in range(2):  # max_job_attempts=3: two redeliveries raise (batch not committed) ...
        with pytest.raises(RuntimeError):
            rig.proc.handle_jobs(batch)
    rig.proc.handle_jobs(batch)  # ... the third parks it
    [dl] = dead_letters(SimpleNamespace(stack=rig.stack), bad)  # type: ignore[arg-type]
    assert dl.reason.startswith("inference_error:") and "after retries" in dl.reason


def test_runtime_outage_is_retried_not_dead_lettered(rig: SimpleNamespace, unique: str) -> None:
    items = [f"p-out{i}-{unique}" for i in range(2)]
    batch = [job(rig, item, 80 + i) for i, item in enumerate(items)]
    rig.engine.down = True
    try:
        with pytest.raises(RuntimeError):
            rig.proc.handle_jobs(batch)
    finally:
        rig.engine.down = False
    rig.proc.handle_jobs(batch)  # the redelivery after recovery succeeds
    assert all(rig.redis.exists(keys.item_embedding(i)) for i in items)
    assert dead_letters(SimpleNamespace(stack=rig.stack), items[0], want=1, timeout_s=2) == []
