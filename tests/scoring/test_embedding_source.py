"""Item embeddings for style profiles on a real Redis: the in-process cache answers repeated
lookups of embeddings it found, picks up a replaced one after its TTL, and never caches an
absent one (a new photo's embedding counts at once); the MongoDB fallback runs off the caller's
thread once the backfill is started."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import redis
from prometheus_client import REGISTRY
from pymongo import MongoClient

from cli.localstack.stack import Stack
from libs.common import keys
from services.scoring.style_profile import EmbeddingSource

DIM = 8


def put(r: redis.Redis, item: str, value: float, bump: bool = True) -> None:
    """Write an embedding as the style worker does: with the embeddings version bumped."""
    r.set(keys.item_embedding(item), np.full(DIM, value, dtype="<f4").tobytes())
    if bump:
        r.incr(keys.item_embeddings_version())


def counted(result: str) -> float:
    return REGISTRY.get_sample_value("stylerec_scoring_embedding_cache_total", {"result": result}) or 0.0


def test_cache_answers_repeats_and_expires(session_redis: redis.Redis, unique: str) -> None:
    r = session_redis
    a, b = f"emb-a-{unique}", f"emb-b-{unique}"
    put(r, a, 1.0)
    source = EmbeddingSource(r, None, "items", DIM, cache_ttl_s=0.5)
    hits, misses = counted("hit"), counted("miss")
    got = source.get([a, b])
    assert set(got) == {a} and float(got[a][0]) == 1.0
    assert (counted("hit") - hits, counted("miss") - misses) == (0, 2)

    put(r, a, 2.0)  # replaced: unseen while cached; b gets one: seen at once (the version moved)
    put(r, b, 3.0)
    got = source.get([a, b])
    assert float(got[a][0]) == 1.0 and float(got[b][0]) == 3.0
    assert (counted("hit") - hits, counted("miss") - misses) == (1, 2)

    time.sleep(0.6)
    got = source.get([a, b])
    assert float(got[a][0]) == 2.0 and float(got[b][0]) == 3.0
    assert counted("miss") - misses == 4


def test_absence_is_remembered_while_the_embeddings_version_stands(session_redis: redis.Redis, unique: str) -> None:
    """A photo-less item is asked once, not on every batch; the style worker's version bump makes
    it asked again at once; a write that does not bump is still seen within the cache TTL."""
    r = session_redis
    a, b = f"emb-absent-a-{unique}", f"emb-absent-b-{unique}"
    source = EmbeddingSource(r, None, "items", DIM, cache_ttl_s=0.5)
    absent, misses = counted("absent"), counted("miss")
    assert source.get([a, b]) == {}
    assert source.get([a, b]) == {} and counted("absent") - absent == 2  # not asked again
    assert counted("miss") - misses == 2
    put(r, a, 7.0)  # bumps the version: the remembered absences are rechecked in this very call
    got = source.get([a, b])
    assert set(got) == {a} and float(got[a][0]) == 7.0
    put(r, b, 8.0, bump=False)  # a writer that does not bump: seen once the absence expires
    assert b not in source.get([b])
    time.sleep(0.6)
    assert float(source.get([b])[b][0]) == 8.0


def test_cache_off_reads_redis_every_time(session_redis: redis.Redis, unique: str) -> None:
    r = session_redis
    a = f"emb-off-{unique}"
    put(r, a, 1.0)
    source = EmbeddingSource(r, None, "items", DIM, cache_ttl_s=0.0)
    assert float(source.get([a])[a][0]) == 1.0
    put(r, a, 5.0)
    assert float(source.get([a])[a][0]) == 5.0


def test_cache_is_bounded(session_redis: redis.Redis, unique: str) -> None:
    r = session_redis
    items = [f"emb-bound-{unique}-{n}" for n in range(30)]
    source = EmbeddingSource(r, None, "items", DIM, cache_ttl_s=60.0, cache_max=20)
    for n, item in enumerate(items):
        put(r, item, float(n))
    source.get(items[:15])
    source.get(items[15:])  # 15 + 15 > 20: cleared first, then holds only the newest lookups
    assert len(source._cache) == 15


def test_mongo_fallback_runs_off_the_callers_thread(session_redis: redis.Redis, infra: Stack, unique: str) -> None:
    """With the backfill started, an item Redis lacks is not fetched from MongoDB inside ``get``
    (the scoring consumer's thread): the first lookup answers without it, the backfill thread
    finds it, and later lookups include it; an item MongoDB lacks too is not asked again until
    its negative answer expires."""
    mongo: MongoClient[dict[str, Any]] = MongoClient(infra.mongo_uri)
    coll = f"items_backfill_{unique}"
    kept, absent = f"emb-mongo-{unique}", f"emb-none-{unique}"
    mongo["stylerec"][coll].insert_one({"_id": kept, "style_embedding": [0.25] * DIM})
    source = EmbeddingSource(session_redis, mongo["stylerec"], coll, DIM, miss_ttl_s=60.0, cache_ttl_s=10.0)
    found_before = REGISTRY.get_sample_value("stylerec_scoring_embedding_backfill_total", {"result": "found"}) or 0.0
    try:
        source.start_backfill()
        assert source.get([kept, absent]) == {}  # nothing from MongoDB on this thread
        deadline = time.monotonic() + 10
        got: dict[str, np.ndarray] = {}
        while time.monotonic() < deadline and kept not in got:
            time.sleep(0.05)
            got = source.get([kept, absent])
        assert set(got) == {kept} and float(got[kept][0]) == 0.25
        found = REGISTRY.get_sample_value("stylerec_scoring_embedding_backfill_total", {"result": "found"}) or 0.0
        assert found - found_before == 1
        assert not source._pending  # the absent one is not queued again before miss_ttl_s
    finally:
        source.stop()
        mongo["stylerec"].drop_collection(coll)
        mongo.close()


def test_inline_mongo_fallback_without_the_backfill(session_redis: redis.Redis, infra: Stack, unique: str) -> None:
    mongo: MongoClient[dict[str, Any]] = MongoClient(infra.mongo_uri)
    coll = f"items_inline_{unique}"
    item = f"emb-inline-{unique}"
    mongo["stylerec"][coll].insert_one({"_id": item, "style_embedding": [0.5] * DIM})
    try:
        got = EmbeddingSource(session_redis, mongo["stylerec"], coll, DIM).get([item])
        assert float(got[item][0]) == 0.5
    finally:
        mongo["stylerec"].drop_collection(coll)
        mongo.close()
