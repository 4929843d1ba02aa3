"""Catalog-centred style similarity: the one place that defines it (scoring, gateway, experiment).

WHY: the 100-d ``arbitrary_predict`` embeddings of any two images share a large common
component (raw cosines 0.6-1.0), so a plain cosine barely separates looks and a user
profile's coherence is high for everyone. Subtracting the catalog's style centroid (the
mean of all items' unit embeddings) keeps only what makes a look *distinctive*; cosines
of centred vectors spread over -1..1 and the coherence of a user's centred looks says
how consistently distinctive their taste is.

Every consumer must centre with this module so profiles (written by scoring) and item
vectors (scored by the gateway) live in the same space.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

EMBEDDING_DIM = 100
# Below this many embedded items a centroid is mostly the few items themselves: centring
# would erase their looks rather than the shared component, so no centroid is published.
# The shared component dominates (the 56-look experiment catalog's centroid has norm 0.94), so
# 10 random looks already give a centroid within cosine 0.98 of the whole catalog's.
MIN_CENTROID_ITEMS = 10


def unit(v: np.ndarray) -> np.ndarray:
    """L2-normalise along the last axis; zero rows stay zero (cosine 0 = neutral)."""
    a = np.asarray(v, dtype=np.float32)
    norms = np.linalg.norm(a, axis=-1, keepdims=True)
    return np.where(norms > 1e-12, a / np.where(norms > 1e-12, norms, 1.0), 0.0).astype(np.float32)


def centre(v: np.ndarray, centroid: np.ndarray | None) -> np.ndarray:
    """``unit(unit(v) - centroid)`` for a vector or a matrix of row vectors.

    ``centroid`` None (no catalog centroid known: tiny catalogs, tests) gives ``unit(v)``,
    i.e. the plain, uncentred cosine space.
    """
    u = unit(v)
    if centroid is None:
        return u
    return unit(u - np.asarray(centroid, dtype=np.float32))


def catalog_centroid(vectors: np.ndarray) -> tuple[np.ndarray | None, int]:
    """(mean of the unit rows, row count); None when fewer than MIN_CENTROID_ITEMS rows."""
    m = np.asarray(vectors, dtype=np.float32)
    n = int(m.shape[0]) if m.ndim == 2 else 0
    if n < MIN_CENTROID_ITEMS:
        return None, n
    return unit(m).mean(axis=0).astype(np.float32), n


def affinity01(cos: np.ndarray) -> np.ndarray:
    """Centred cosines (-1..1) → 0..1, the scale of min-max CF in ``final = (1-λ)·CF + λ·affinity``."""
    return (0.5 * (1.0 + np.asarray(cos, dtype=np.float32))).astype(np.float32)


def encode_centroid(centroid: np.ndarray, items: int, updated_at: float) -> dict[str, bytes | str]:
    """Redis hash of ``keys.style_centroid()``: vector (100 x float32 LE), items, updated_at."""
    return {
        "vector": np.asarray(centroid, dtype="<f4").reshape(-1).tobytes(),
        "items": str(int(items)),
        "updated_at": f"{updated_at:.3f}",
    }


def decode_centroid(h: Mapping[Any, Any], dim: int = EMBEDDING_DIM) -> tuple[np.ndarray | None, int]:
    """(centroid, items) from the Redis hash; (None, 0) when absent or malformed."""
    raw = h.get(b"vector")
    if not isinstance(raw, bytes) or len(raw) != 4 * dim:
        return None, 0
    v = np.frombuffer(raw, dtype="<f4").astype(np.float32)
    if not np.all(np.isfinite(v)):
        return None, 0
    try:
        items = int(h.get(b"items", b"0"))
    except ValueError:
        items = 0
    return v, items


def affinities(profile: np.ndarray, vectors: np.ndarray, centroid: np.ndarray | None) -> np.ndarray:
    """Style affinity of a (unit) profile with each row of ``vectors``, as the blend uses it.

    With a centroid: the profile is a centred vector (scoring's ``compute_profile``) and the
    answer is the centred cosine mapped to 0..1 (:func:`affinity01`), so ``λ`` weighs two
    0..1 quantities. Without one: the plain cosine, exactly the uncentred behaviour.
    """
    p = np.asarray(profile, dtype=np.float32)
    m = np.asarray(vectors, dtype=np.float32).reshape(-1, p.shape[-1])
    if m.shape[0] == 0:
        return np.zeros(0, dtype=np.float32)
    cos = centre(m, centroid) @ p
    return affinity01(cos) if centroid is not None else cos.astype(np.float32)
