"""User style profile: what the user's favourite items *look like*, for the gateway's re-ranking.

vector     = L2-normalised, time-decayed, type-weighted mean of the style embeddings of
             the items the user interacted with (embeddings come from the style worker).
confidence = evidence x coherence: ``(1 - 2**(-W / w_half)) * |weighted mean of unit vectors|``
             where W is the decayed weight of embedded items. Few interactions, or items of
             clashing styles (vectors cancel), both give a low value; the gateway takes the
             style path only above its threshold.
anchor     = the highest-weighted item that has a photo (= has an embedding): the style image
             the gateway asks the style worker to transfer.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import redis
from pymongo.database import Database

from libs.common import keys
from libs.common.metrics import STORE_ERRORS

log = logging.getLogger(__name__)


@dataclass
class StyleProfile:
    vector: np.ndarray  # float32, L2-normalised
    confidence: float
    anchor: str
    items_used: int


def compute_profile(
    history: dict[str, float], embeddings: dict[str, np.ndarray], half_confidence_weight: float
) -> StyleProfile | None:
    used = [(item, w) for item, w in history.items() if item in embeddings and w > 0]
    if not used:
        return None
    W = float(sum(w for _, w in used))
    acc = np.zeros_like(next(iter(embeddings.values())), dtype=np.float64)
    for item, w in used:
        e = embeddings[item].astype(np.float64)
        acc += (w / W) * e / (np.linalg.norm(e) + 1e-12)
    coherence = float(np.linalg.norm(acc))
    if coherence < 1e-9:
        return None
    evidence = 1.0 - 2.0 ** (-W / half_confidence_weight)
    anchor = max(used, key=lambda iw: (iw[1], iw[0]))[0]
    return StyleProfile(
        vector=(acc / coherence).astype(np.float32),
        confidence=float(min(1.0, max(0.0, evidence * coherence))),
        anchor=anchor,
        items_used=len(used),
    )


class EmbeddingSource:
    """Item embeddings from Redis (style worker's cache), falling back to MongoDB items."""

    def __init__(self, r: redis.Redis, db: Database | None, items_collection: str, dim: int) -> None:
        self.redis = r
        self.db = db
        self.items_collection = items_collection
        self.dim = dim

    def _decode(self, raw: bytes | str | None) -> np.ndarray | None:
        if not isinstance(raw, bytes) or len(raw) != 4 * self.dim:
            return None
        v = np.frombuffer(raw, dtype="<f4")
        return v if np.all(np.isfinite(v)) else None

    def get(self, items: Iterable[str]) -> dict[str, np.ndarray]:
        wanted = list(dict.fromkeys(items))
        if not wanted:
            return {}
        out: dict[str, np.ndarray] = {}
        raws = self.redis.mget([keys.item_embedding(i) for i in wanted])
        for item, raw in zip(wanted, raws, strict=True):
            v = self._decode(raw)
            if v is not None:
                out[item] = v
        missing = [i for i in wanted if i not in out]
        if missing and self.db is not None:
            try:
                cur = self.db[self.items_collection].find({"_id": {"$in": missing}}, {"style_embedding": 1})
                for doc in cur:
                    emb = doc.get("style_embedding")
                    if isinstance(emb, list) and len(emb) == self.dim:
                        v = np.asarray(emb, dtype=np.float32)
                        if np.all(np.isfinite(v)):
                            out[str(doc["_id"])] = v
            except Exception:
                STORE_ERRORS.labels("mongo", "embedding_fallback").inc()
                log.warning("embedding fallback failed", exc_info=True)
        return out


class ProfileWriter:
    def __init__(self, r: redis.Redis, source: EmbeddingSource, half_confidence_weight: float, ttl_s: int) -> None:
        self.redis = r
        self.source = source
        self.half = half_confidence_weight
        self.ttl_s = ttl_s

    def update(self, user: str, history: dict[str, float]) -> StyleProfile | None:
        profile = compute_profile(history, self.source.get(history), self.half)
        key = keys.style_profile(user)
        if profile is None:
            self.redis.delete(key)
            return None
        pipe = self.redis.pipeline(transaction=True)
        pipe.delete(key)
        pipe.hset(
            key,
            mapping={
                "vector": profile.vector.astype("<f4").tobytes(),
                "confidence": f"{profile.confidence:.4f}",
                "anchor": profile.anchor,
                "updated_at": f"{time.time():.3f}",
            },
        )
        pipe.expire(key, self.ttl_s)
        pipe.execute()
        return profile
