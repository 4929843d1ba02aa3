"""GetSimilarItems: CF neighbours from scoring, style neighbours from item embeddings, or a blend.

Style neighbours need every item's embedding; reading them all from Redis per
request would be O(catalog), so each replica keeps a matrix of them in memory,
reloaded (SCAN + MGET of ``keys.item_embedding``) at most every
``embedding_index_refresh_s``. Similarity is the catalog-centred cosine mapped to 0..1
(libs/common/style_math.py; the plain cosine while scoring has published no centroid), so
the matrix is kept centred on the centroid it was last centred with. At catalog sizes where that no longer fits, a
vector index belongs here instead; the RPC does not change.
"""

from __future__ import annotations

import logging
import threading
import time

import numpy as np
import redis
from stylerec.v1 import gateway_pb2, scoring_pb2

from libs.common import keys
from libs.common.style_math import affinity01, centre
from services.gateway.deadlines import Deadline, DependencyUnavailable
from services.gateway.downstream import Degradation, Downstream
from services.gateway.embeddings import StyleCentroid
from services.gateway.style import decode_embedding, normalize_cf

log = logging.getLogger(__name__)

EMB_PREFIX = keys.item_embedding("")


class EmbeddingIndex:
    def __init__(self, downstream: Downstream, refresh_s: float, centroid: StyleCentroid | None = None) -> None:
        self.ds = downstream
        self.refresh_s = refresh_s
        self.centroid = centroid
        self._ids: list[str] = []
        self._matrix = np.zeros((0, 100), dtype=np.float32)  # unit rows as stored
        self._centred = self._matrix  # rows centred on self._centred_on
        self._centred_on: np.ndarray | None = None
        self._loaded_at = 0.0
        self._lock = threading.Lock()

    def snapshot(self, deadline: Deadline, deg: Degradation) -> tuple[list[str], np.ndarray, np.ndarray | None]:
        """(ids, centred unit rows, the centroid they are centred on — None = uncentred)."""
        if time.monotonic() - self._loaded_at > self.refresh_s:
            try:
                ids, matrix = self.ds.redis_call("embeddings_scan", self._load, deadline)
                with self._lock:
                    self._ids, self._matrix, self._loaded_at = ids, matrix, time.monotonic()
                    self._centred_on = None
                    self._centred = matrix
            except DependencyUnavailable as exc:
                deg.add(exc)
        c = self.centroid.get(deadline, deg) if self.centroid is not None else None
        with self._lock:
            if c is not self._centred_on:
                self._centred, self._centred_on = centre(self._matrix, c), c
            return self._ids, self._centred, self._centred_on

    def nearest(
        self,
        vec: np.ndarray,
        n: int,
        deadline: Deadline,
        deg: Degradation,
        exclude: str = "",
        raw_query: bool = False,
    ) -> list[tuple[str, float]]:
        """The n items closest in style to ``vec``, with their style affinity (0..1 when centred).

        ``vec`` is a user profile (already centred by scoring), or with ``raw_query`` an item's
        stored unit embedding, which is centred here on the same centroid as the matrix.
        """
        ids, matrix, c = self.snapshot(deadline, deg)
        if not ids or n <= 0:
            return []
        sims = matrix @ (centre(vec, c) if raw_query else vec)
        if c is not None:
            sims = affinity01(sims)
        m = min(n + 1, len(ids))
        top = np.argpartition(-sims, m - 1)[:m] if m < len(ids) else np.arange(len(ids))
        top = top[np.argsort(-sims[top], kind="stable")]
        return [(ids[k], float(sims[k])) for k in top if ids[k] != exclude][:n]

    def invalidate(self) -> None:
        self._loaded_at = 0.0

    @staticmethod
    def _load(r: redis.Redis) -> tuple[list[str], np.ndarray]:
        names = [k for k in r.scan_iter(match=EMB_PREFIX + "*", count=1000)]
        ids: list[str] = []
        rows: list[np.ndarray] = []
        for start in range(0, len(names), 500):
            chunk = names[start : start + 500]
            for name, raw in zip(chunk, r.mget(chunk), strict=True):
                vec = decode_embedding(raw)
                if vec is not None:
                    ids.append(name.decode()[len(EMB_PREFIX) :])
                    rows.append(vec)
        matrix = np.stack(rows) if rows else np.zeros((0, 100), dtype=np.float32)
        return ids, matrix


class SimilarItems:
    def __init__(self, downstream: Downstream, index: EmbeddingIndex, lam: float) -> None:
        self.ds = downstream
        self.index = index
        self.lam = lam

    def cf(self, item_id: str, k: int, deadline: Deadline, deg: Degradation) -> list[tuple[str, float]]:
        try:
            resp = self.ds.scoring_call(
                "similar",
                lambda stub, timeout: stub.SimilarItems(
                    scoring_pb2.SimilarItemsRequest(item_id=item_id, k=k), timeout=timeout
                ),
                deadline,
            )
            return [(s.item_id, float(s.score)) for s in resp.items if s.item_id != item_id]
        except DependencyUnavailable as exc:
            deg.add(exc)
            return []

    def style(self, item_id: str, k: int, deadline: Deadline, deg: Degradation) -> list[tuple[str, float]]:
        try:
            raw = self.ds.redis_call("embedding_get", lambda r: r.get(keys.item_embedding(item_id)), deadline)
        except DependencyUnavailable as exc:
            deg.add(exc)
            return []
        vec = decode_embedding(raw)
        if vec is None:
            deg.add(f"style: item {item_id!r} has no style embedding yet")
            return []
        return self.index.nearest(vec, k, deadline, deg, exclude=item_id, raw_query=True)

    def similar(
        self, item_id: str, k: int, mode: int, deadline: Deadline, deg: Degradation
    ) -> list[gateway_pb2.SimilarItem]:
        if mode == gateway_pb2.SIMILARITY_CF:
            return [
                gateway_pb2.SimilarItem(item_id=i, score=s, cf_score=s) for i, s in self.cf(item_id, k, deadline, deg)
            ]
        if mode == gateway_pb2.SIMILARITY_STYLE:
            return [
                gateway_pb2.SimilarItem(item_id=i, score=s, style_score=s)
                for i, s in self.style(item_id, k, deadline, deg)
            ]
        pool = max(k * 3, 30)
        cf = dict(self.cf(item_id, pool, deadline, deg))
        style = dict(self.style(item_id, pool, deadline, deg))
        ids = sorted(set(cf) | set(style))
        if not ids:
            return []
        cf_norm = dict(zip(ids, normalize_cf([cf.get(i, 0.0) for i in ids]), strict=True)) if cf else {}
        # An item outside the style neighbourhood gets the weakest style score seen, not 0:
        # 0 would rank it below every neighbour's look, an outsized penalty for "not in the top".
        style_floor = min(style.values()) if style else 0.0
        rows = []
        for i in ids:
            c = cf_norm.get(i, 0.0)
            s = style.get(i, style_floor)
            lam = self.lam if cf and style else (1.0 if style else 0.0)
            rows.append(gateway_pb2.SimilarItem(item_id=i, score=(1 - lam) * c + lam * s, cf_score=c, style_score=s))
        rows.sort(key=lambda x: (-x.score, x.item_id))
        return rows[:k]
