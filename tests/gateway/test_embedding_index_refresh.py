"""The gateway's embedding index rescans Redis only when the embeddings version moved (or its
full-scan age passed): a SCAN walks the whole keyspace, which grows with users and events
(services/gateway/similar.py). Against a real Redis; the Downstream is a thin recorder of which
Redis operations the index asked for."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import numpy as np
import pytest
import redis

from cli.localstack.stack import Stack
from libs.common import keys
from services.gateway.deadlines import Deadline
from services.gateway.downstream import Degradation
from services.gateway.similar import EmbeddingIndex
from services.gateway.style import encode_embedding

T = TypeVar("T")


class RecordingDownstream:
    def __init__(self, r: redis.Redis) -> None:
        self.redis = r
        self.ops: list[str] = []

    def redis_call(self, operation: str, fn: Callable[[redis.Redis], T], deadline: Deadline) -> T:
        self.ops.append(operation)
        return fn(self.redis)


@pytest.fixture()
def r(infra: Stack) -> Iterator[redis.Redis]:
    # A database of its own: the session's other tests write embeddings to db 0.
    client = redis.Redis.from_url(infra.redis_url, db=9)
    client.flushdb()
    yield client
    client.flushdb()
    client.close()


def put(r: redis.Redis, item: str, seed: int, bump: bool = True) -> None:
    r.set(keys.item_embedding(item), encode_embedding(np.random.default_rng(seed).normal(size=100) + 2.0))
    if bump:
        r.incr(keys.item_embeddings_version())


def ids_of(index: EmbeddingIndex) -> list[str]:
    ids, _, _ = index.snapshot(Deadline(5.0), Degradation())
    return sorted(ids)


def test_rescans_only_when_the_version_moves(r: redis.Redis) -> None:
    put(r, "a", 1)
    ds = RecordingDownstream(r)
    index = EmbeddingIndex(ds, refresh_s=0.01, full_scan_s=3600)  # type: ignore[arg-type]
    assert ids_of(index) == ["a"]
    assert ds.ops.count("embeddings_scan") == 1
    version = index.current_version

    for _ in range(5):  # refreshes due, nothing written: the version is read, no SCAN
        time.sleep(0.02)
        assert ids_of(index) == ["a"]
    assert ds.ops.count("embeddings_scan") == 1
    assert ds.ops.count("embeddings_version") == 6  # the first load read it too
    assert index.current_version == version  # kept answers stay valid

    put(r, "b", 2)  # a writer that increments the version
    time.sleep(0.02)
    assert ids_of(index) == ["a", "b"]
    assert ds.ops.count("embeddings_scan") == 2
    assert index.current_version > version


def test_a_write_without_the_version_is_seen_after_the_full_scan_age(r: redis.Redis) -> None:
    put(r, "a", 1)
    ds = RecordingDownstream(r)
    index: Any = EmbeddingIndex(ds, refresh_s=0.01, full_scan_s=0.3)  # type: ignore[arg-type]
    assert ids_of(index) == ["a"]
    put(r, "c", 3, bump=False)
    time.sleep(0.02)
    assert ids_of(index) == ["a"], "no rescan before the full-scan age"
    time.sleep(0.35)
    assert ids_of(index) == ["a", "c"]
    assert ds.ops.count("embeddings_scan") == 2
