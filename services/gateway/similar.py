"""GetSimilarItems: CF neighbours from scoring, style neighbours from item embeddings, or a blend.

Style neighbours need every item's embedding; reading them all from Redis per
request would be O(catalog), so each replica keeps a matrix of them in memory,
reloaded (SCAN + MGET of ``keys.item_embedding``) at most every
``embedding_index_refresh_s``, and only when ``keys.item_embeddings_version`` (which every
embedding writer increments) has moved or ``embedding_index_full_scan_s`` has passed. The SCAN
walks the whole keyspace, which grows with the shop's users and events, not with the catalog
(1.1 to 1.5 ms of Redis's time per SCAN call late in a 4-minute `stylerec bench load` soak, every
other command waiting behind each; scoring's catalog centroid was gated the same way for it).

Similarity is the catalog-centred cosine mapped to 0..1
(libs/common/style_math.py; the plain cosine while scoring has published no centroid), so
the matrix is kept centred on the centroid it was last centred with. At catalog sizes where that no longer fits, a
vector index belongs here instead; the RPC does not change.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Hashable

import numpy as np
import redis
from stylerec.v1 import gateway_pb2, scoring_pb2

from libs.common import keys
from libs.common.embedding_scan import EmbeddingScanGate
from libs.common.style_math import affinity01, centre
from services.gateway.deadlines import Deadline, DependencyUnavailable
from services.gateway.downstream import Degradation, Downstream
from services.gateway.embeddings import StyleCentroid
from services.gateway.style import decode_embedding, normalize_cf

log = logging.getLogger(__name__)

EMB_PREFIX = keys.item_embedding("")


class EmbeddingIndex:
    """Also :class:`services.gateway.answers.Versioned`: its version moves when a reload brings
    other rows or the centroid changes, so a kept style answer is rebuilt exactly when a new
    build would see another index."""

    def __init__(
        self,
        downstream: Downstream,
        refresh_s: float,
        centroid: StyleCentroid | None = None,
        full_scan_s: float = 600.0,
    ) -> None:
        self.ds = downstream
        self.refresh_s = refresh_s
        self.full_scan_s = full_scan_s
        self.centroid = centroid
        self._scan_gate = EmbeddingScanGate()
        self._ids: list[str] = []
        self._pos: dict[str, int] = {}  # item id -> row, built once per reload (not per request)
        self._matrix = np.zeros((0, 100), dtype=np.float32)  # unit rows as stored
        self._centred = self._matrix  # rows centred on self._centred_on
        self._centred_on: np.ndarray | None = None
        self._plain: np.ndarray | None = None  # unit(rows), for profiles scoring wrote uncentred
        # Neighbour pools per (profile bytes, centred, n), valid for one centred matrix object.
        self._neighbours: dict[tuple[bytes, bool, int], list[str]] = {}
        self._neighbours_of: np.ndarray | None = None
        self._loaded_at = 0.0
        self._version = 0
        self._versioned_centroid: np.ndarray | None = None  # the centroid the version last saw
        self._lock = threading.Lock()

    @property
    def current_version(self) -> int:
        """The version as of now, without a refresh (taken before a build uses the index: a reload
        during the build then reads as a change, never the other way round)."""
        return self._version

    def version(self, part: Hashable, deadline: Deadline) -> int | None:
        """The index's version after the refresh a new answer would do (``part`` is unused: one
        index); None when Redis could not be asked now."""
        deg = Degradation()
        self._state(deadline, deg)
        return None if deg.degraded else self._version

    def snapshot(self, deadline: Deadline, deg: Degradation) -> tuple[list[str], np.ndarray, np.ndarray | None]:
        """(ids, centred unit rows, the centroid they are centred on — None = uncentred)."""
        ids, _, _, centred, c = self._state(deadline, deg)
        return ids, centred, c

    def _reload(self, deadline: Deadline) -> None:
        """Rescan when the embeddings version moved (or the full-scan age passed); else keep the matrix."""
        stamp = self.ds.redis_call("embeddings_version", lambda r: r.get(keys.item_embeddings_version()), deadline)
        if self._scan_gate.unchanged(stamp, self.full_scan_s):
            with self._lock:
                self._loaded_at = time.monotonic()
            return
        scanned_at = time.monotonic()
        ids, matrix = self.ds.redis_call("embeddings_scan", self._load, deadline)
        self._scan_gate.scanned(stamp, scanned_at)
        with self._lock:
            if ids != self._ids or not np.array_equal(matrix, self._matrix):
                self._version += 1
            self._ids, self._matrix, self._loaded_at = ids, matrix, time.monotonic()
            self._pos = {i: n for n, i in enumerate(ids)}
            self._plain = None
            self._centred_on = None
            self._centred = matrix

    def _state(
        self, deadline: Deadline, deg: Degradation
    ) -> tuple[list[str], dict[str, int], np.ndarray, np.ndarray, np.ndarray | None]:
        """(ids, id -> row, plain unit rows, centred rows, centroid), all from one reload."""
        if time.monotonic() - self._loaded_at > self.refresh_s:
            try:
                self._reload(deadline)
            except DependencyUnavailable as exc:
                deg.add(exc)
        c = self.centroid.get(deadline, deg) if self.centroid is not None else None
        with self._lock:
            if c is not self._versioned_centroid:
                old = self._versioned_centroid
                if old is None or c is None or not np.array_equal(c, old):
                    self._version += 1
                self._versioned_centroid = c
            if c is not self._centred_on:
                self._centred, self._centred_on = centre(self._matrix, c), c
            if self._plain is None:
                # The plain-cosine space of style_math.affinities(centroid=None): unit(unit rows).
                self._plain = centre(self._matrix, None)
            return self._ids, self._pos, self._plain, self._centred, self._centred_on

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

    def for_profile(
        self, profile: np.ndarray, centred_profile: bool, n_neighbours: int, deadline: Deadline, deg: Degradation
    ) -> ProfileScores:
        """The style path's two uses of the catalog, without a pass over it per request.

        WHY: the re-rank needs the profile's affinity with ~180 candidates and the neighbour pool
        its closest looks in the whole catalog. The candidates' rows are gathered from this
        in-memory matrix (no per-item cache lookups and stacking, the largest Python cost of a
        style answer in the py-spy profile, docs/gateway.md), and the neighbour pool depends only
        on the profile and the matrix, so it is computed once per (profile, reload) and reused
        until either changes, instead of a catalog-wide product and partition on every request.

        The neighbours rank exactly as :meth:`nearest` does; the affinities are
        :func:`libs.common.style_math.affinities` of the stored unit rows (centred and mapped
        to 0..1 for a centred profile with a centroid, the plain cosine otherwise).
        """
        ids, pos, plain_rows, centred_rows, c = self._state(deadline, deg)
        mapped = centred_profile and c is not None
        aff_rows = centred_rows if mapped else plain_rows
        neighbours: list[str] = []
        if ids and n_neighbours > 0:
            key = (profile.tobytes(), centred_profile, n_neighbours)
            with self._lock:
                memo = self._neighbours if self._neighbours_of is centred_rows else None
                cached = memo.get(key) if memo is not None else None
            if cached is None:
                cached = [
                    i for i, _ in self.nearest(profile, n_neighbours, deadline, deg, raw_query=not centred_profile)
                ]
                with self._lock:
                    if self._neighbours_of is not centred_rows:
                        self._neighbours, self._neighbours_of = {}, centred_rows
                    if len(self._neighbours) >= 50_000:
                        self._neighbours.clear()
                    self._neighbours[key] = cached
            neighbours = cached
        return ProfileScores(
            neighbours, pos, aff_rows, profile, mapped, c if mapped or (centred_profile and not ids) else None
        )

    def invalidate(self) -> None:
        self._loaded_at = 0.0
        self._scan_gate.forget()

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


class ProfileScores:
    """One profile's view of the index: its closest looks and its affinity with any indexed item."""

    def __init__(
        self,
        neighbours: list[str],
        pos: dict[str, int],
        rows: np.ndarray,
        profile: np.ndarray,
        mapped: bool,
        centroid: np.ndarray | None,
    ) -> None:
        self.neighbours = neighbours
        self._pos = pos
        self._rows = rows
        self._profile = np.asarray(profile, dtype=np.float32)
        self._mapped = mapped
        # The centroid the affinities are computed with: items the index lacks must be scored
        # with the same one (None = plain cosine).
        self.centroid = centroid

    def _scores(self, rows: list[int]) -> list[float]:
        cos = self._rows[rows] @ self._profile
        return list((affinity01(cos) if self._mapped else cos.astype(np.float32)).tolist())

    def affinities(self, item_ids: list[str]) -> tuple[list[float | None], list[int]]:
        """(affinity per item, None where the index has no row; positions of those items)."""
        pos = self._pos
        rows = [pos.get(i, -1) for i in item_ids]
        if -1 not in rows:  # the common case: every candidate is indexed
            return (list(self._scores(rows)) if rows else []), []
        out: list[float | None] = [None] * len(item_ids)
        lacking = [n for n, row in enumerate(rows) if row < 0]
        present_at = [n for n, row in enumerate(rows) if row >= 0]
        if present_at:
            for n, a in zip(present_at, self._scores([rows[n] for n in present_at]), strict=True):
                out[n] = float(a)
        return out, lacking


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
