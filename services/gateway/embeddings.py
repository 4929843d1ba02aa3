"""Item style embeddings for re-ranking, with a short-lived in-process cache in front of Redis.

The style path scores ~150 candidates per request; fetching 150 x 400 bytes
from Redis every time was the largest single cost of an answer. Embeddings
change only when an item's photo changes, so each replica keeps the decoded
vectors for ``ttl_s`` seconds (absent ones too, so un-embedded items do not
cause a fetch per request); a newly embedded item is picked up within that time.
"""

from __future__ import annotations

import threading
import time

import numpy as np

from libs.common import keys, style_math
from services.gateway.deadlines import Deadline, DependencyUnavailable
from services.gateway.downstream import Degradation, Downstream
from services.gateway.style import decode_embedding


class ItemEmbeddings:
    def __init__(self, downstream: Downstream, ttl_s: float, max_items: int = 200_000) -> None:
        self.ds = downstream
        self.ttl_s = ttl_s
        self.max_items = max_items
        self._cache: dict[str, tuple[float, np.ndarray | None]] = {}

    def get_many(self, item_ids: list[str], deadline: Deadline) -> list[np.ndarray | None]:
        """Unit vectors (None = no embedding yet); raises DependencyUnavailable if Redis is needed and down."""
        now = time.monotonic()
        out: list[np.ndarray | None] = [None] * len(item_ids)
        missing: list[int] = []
        for n, item_id in enumerate(item_ids):
            hit = self._cache.get(item_id)
            if hit is not None and now - hit[0] <= self.ttl_s:
                out[n] = hit[1]
            else:
                missing.append(n)
        if missing:
            names = [keys.item_embedding(item_ids[n]) for n in missing]
            raws = self.ds.redis_call("embeddings_get", lambda r: r.mget(names), deadline)
            if len(self._cache) + len(missing) > self.max_items:
                self._cache.clear()
            for n, raw in zip(missing, raws, strict=True):
                vec = decode_embedding(raw)
                out[n] = vec
                if self.ttl_s > 0:
                    self._cache[item_ids[n]] = (now, vec)
        return out


class StyleCentroid:
    """The catalog style centroid published by scoring (``keys.style_centroid()``), near-cached.

    It moves only as the catalog grows, so each replica re-reads it every ``ttl_s`` seconds;
    a failed read keeps the last value (and reports the degradation), since an old centroid
    is nearly as good as a fresh one. None = none published (tiny catalog): uncentred cosines.
    """

    def __init__(self, downstream: Downstream, ttl_s: float) -> None:
        self.ds = downstream
        self.ttl_s = ttl_s
        self._value: np.ndarray | None = None
        self._items = 0
        self._read_at = -float("inf")
        self._lock = threading.Lock()

    def get(self, deadline: Deadline, deg: Degradation) -> np.ndarray | None:
        with self._lock:
            fresh = time.monotonic() - self._read_at <= self.ttl_s
            if fresh:
                return self._value
        try:
            h = self.ds.redis_call("style_centroid_get", lambda r: r.hgetall(keys.style_centroid()), deadline)
            value, items = style_math.decode_centroid(h or {})
            with self._lock:
                self._value, self._items, self._read_at = value, items, time.monotonic()
        except DependencyUnavailable as exc:
            deg.add(exc)
        with self._lock:
            return self._value


def affinities(
    profile: np.ndarray, vectors: list[np.ndarray | None], centroid: np.ndarray | None = None
) -> list[float | None]:
    """Style affinity of the profile with each vector (None = no embedding), in one matrix product.

    The math is ``libs.common.style_math.affinities``: centred cosine mapped to 0..1 when a
    centroid is known, the plain cosine otherwise.
    """
    present = [n for n, v in enumerate(vectors) if v is not None]
    out: list[float | None] = [None] * len(vectors)
    if present:
        aff = style_math.affinities(profile, np.stack([vectors[n] for n in present]), centroid)  # type: ignore[misc]
        for n, a in zip(present, aff.tolist(), strict=True):
            out[n] = float(a)
    return out
