"""Item embeddings for style profiles on a real Redis: the in-process cache answers repeated
lookups of embeddings it found, picks up a replaced one after its TTL, and never caches an
absent one (a new photo's embedding counts at once)."""

from __future__ import annotations

import time

import numpy as np
import redis
from prometheus_client import REGISTRY

from libs.common import keys
from services.scoring.style_profile import EmbeddingSource

DIM = 8


def put(r: redis.Redis, item: str, value: float) -> None:
    r.set(keys.item_embedding(item), np.full(DIM, value, dtype="<f4").tobytes())


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

    put(r, a, 2.0)  # replaced: unseen while cached; b gets one: seen at once (absence is not cached)
    put(r, b, 3.0)
    got = source.get([a, b])
    assert float(got[a][0]) == 1.0 and float(got[b][0]) == 3.0
    assert (counted("hit") - hits, counted("miss") - misses) == (1, 3)

    time.sleep(0.6)
    got = source.get([a, b])
    assert float(got[a][0]) == 2.0 and float(got[b][0]) == 3.0
    assert counted("miss") - misses == 5


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
