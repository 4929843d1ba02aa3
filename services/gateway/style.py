"""Style re-ranking: the concept paper's blend of collaborative filtering and visual style.

``final = (1 - λ) · normalized CF score + λ · style affinity``, where the style affinity is
the cosine of the user's profile with the item's embedding, both centred on the catalog's
style centroid, mapped to 0..1 (``libs.common.style_math.affinities``; without a published
centroid it is the plain cosine, as before).

The functions here are pure so that the offline λ experiment
(``stylerec experiment style-lambda``) scores exactly the way the live gateway
does; the gateway only adds the Redis reads around them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from libs.common.style_math import affinities as centred_affinities

EMBEDDING_DIM = 100


@dataclass(frozen=True)
class StyleProfile:
    vector: np.ndarray  # 100 float32, L2-normalized
    confidence: float
    anchor: str
    # Scoring computed the vector on catalog-centred embeddings (hash field ``centred``="1");
    # an older or uncentred profile must be scored against uncentred items.
    centred: bool = False

    @classmethod
    def from_redis(cls, h: Mapping[bytes, bytes]) -> StyleProfile | None:
        """Parse the ``style_profile(user)`` hash; None when absent or malformed."""
        raw = h.get(b"vector")
        if not raw or len(raw) != EMBEDDING_DIM * 4:
            return None
        vec = decode_embedding(raw)
        if vec is None:
            return None
        try:
            confidence = float(h.get(b"confidence", b"0").decode() or 0.0)
        except ValueError:
            confidence = 0.0
        anchor = h.get(b"anchor", b"").decode()
        return cls(vec, min(1.0, max(0.0, confidence)), anchor, h.get(b"centred", b"0") == b"1")

    def is_confident(self, threshold: float) -> bool:
        return self.confidence >= threshold and bool(self.anchor)


def decode_embedding(raw: bytes | str | None) -> np.ndarray | None:
    """100 x float32 little-endian → unit vector; None for a missing, wrong-sized or zero vector."""
    if not isinstance(raw, bytes) or len(raw) != EMBEDDING_DIM * 4:
        return None
    vec = np.frombuffer(raw, dtype="<f4").astype(np.float32)
    norm = float(np.linalg.norm(vec))
    if not np.isfinite(norm) or norm == 0.0:
        return None
    return vec / norm


def encode_embedding(vec: Sequence[float] | np.ndarray) -> bytes:
    arr = np.asarray(vec, dtype="<f4").reshape(-1)
    if arr.shape[0] != EMBEDDING_DIM:
        raise ValueError(f"expected {EMBEDDING_DIM} floats, got {arr.shape[0]}")
    norm = float(np.linalg.norm(arr))
    return (arr / norm if norm else arr).astype("<f4").tobytes()


def normalize_cf(scores: Sequence[float]) -> list[float]:
    """Min-max to [0, 1] over the candidate pool, so raw scores of any model blend the same way.

    A pool whose scores are all equal (one candidate, or popularity ties) maps to 1.0:
    CF then says nothing about order and style decides.
    """
    if not scores:
        return []
    lo, hi = min(scores), max(scores)
    if hi - lo <= 1e-12:
        return [1.0] * len(scores)
    return [(s - lo) / (hi - lo) for s in scores]


def impute(known: Sequence[float | None]) -> tuple[list[float], int]:
    """Missing affinities → the mean of the known ones.

    Items without an embedding yet (photo not embedded, or no photo) are neither a
    match nor a mismatch; 0 would bury every item the style worker has not reached.
    Returns the affinities and how many were imputed.
    """
    present = [a for a in known if a is not None]
    neutral = float(np.mean(present)) if present else 0.0
    return [a if a is not None else neutral for a in known], len(known) - len(present)


def blend(cf_norm: Sequence[float], affinity: Sequence[float], lam: float) -> list[float]:
    return [(1.0 - lam) * c + lam * a for c, a in zip(cf_norm, affinity, strict=True)]


def rerank(
    candidates: Sequence[tuple[str, float]],
    profile: np.ndarray,
    embeddings: Mapping[str, np.ndarray | None],
    lam: float,
    centroid: np.ndarray | None = None,
) -> list[tuple[str, float, float, float]]:
    """(item, cf_norm, style_affinity, final) sorted by final score, ties by item id.

    ``centroid``: the catalog style centroid the profile was computed with (None = uncentred).
    """
    ids = [i for i, _ in candidates]
    present = [n for n, i in enumerate(ids) if embeddings.get(i) is not None]
    known: list[float | None] = [None] * len(ids)
    if present:
        aff = centred_affinities(profile, np.stack([embeddings[ids[n]] for n in present]), centroid)  # type: ignore[misc]
        for n, a in zip(present, aff.tolist(), strict=True):
            known[n] = float(a)
    return rerank_scored(candidates, known, lam)


def rerank_scored(
    candidates: Sequence[tuple[str, float]], known_affinity: Sequence[float | None], lam: float
) -> list[tuple[str, float, float, float]]:
    """:func:`rerank` with the cosines already computed (None = item has no embedding)."""
    ids = [i for i, _ in candidates]
    cf = normalize_cf([s for _, s in candidates])
    aff, _ = impute(known_affinity)
    final = blend(cf, aff, lam)
    # Sorted by (-final, id) natively (no key function): the same order, a third of the cost.
    order = sorted(zip([-x for x in final], ids, cf, aff, strict=True))
    return [(i, c, a, -neg) for neg, i, c, a in order]
