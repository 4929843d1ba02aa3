"""Item style embeddings for re-ranking, with a short-lived in-process cache in front of Redis.

The style path scores ~150 candidates per request; fetching 150 x 400 bytes
from Redis every time was the largest single cost of an answer. Embeddings
change only when an item's photo changes, so each replica keeps the decoded
vectors for ``ttl_s`` seconds (absent ones too, so un-embedded items do not
cause a fetch per request); a newly embedded item is picked up within that time.
"""

from __future__ import annotations

import time

import numpy as np

from libs.common import keys
from services.gateway.deadlines import Deadline
from services.gateway.downstream import Downstream
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


def affinities(profile: np.ndarray, vectors: list[np.ndarray | None]) -> list[float | None]:
    """Cosine of the (unit) profile with each (unit) vector, in one matrix product."""
    present = [n for n, v in enumerate(vectors) if v is not None]
    out: list[float | None] = [None] * len(vectors)
    if present:
        cos = np.stack([vectors[n] for n in present]) @ profile  # type: ignore[misc]
        for n, c in zip(present, cos.tolist(), strict=True):
            out[n] = float(c)
    return out
