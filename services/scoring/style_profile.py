"""User style profile: what the user's favourite items *look like*, for the gateway's re-ranking.

vector     = L2-normalised, time-decayed, type-weighted mean of the *catalog-centred* style
             embeddings (libs/common/style_math.centre) of the items the user interacted
             with (embeddings come from the style worker).
confidence = evidence x coherence: ``(1 - 2**(-W / w_half)) * |weighted mean of centred unit vectors|``
             where W is the decayed weight of embedded items. Few interactions, or items of
             clashing styles (vectors cancel), both give a low value; the gateway takes the
             style path only above its threshold. Centring matters: raw embeddings share a
             large common component, so their mean is long for *any* user (coherence ~0.8
             for everyone); centred, only consistently distinctive looks add up.
centroid   = the catalog's style centroid (mean unit embedding of all embedded items), computed
             here from the Redis embeddings every ``style_centroid_refresh_s`` and published
             under ``keys.style_centroid()`` for the gateway. Without one (fewer than
             ``MIN_CENTROID_ITEMS`` embedded items, tests) profiles use the uncentred vectors.
anchor     = the highest-weighted item that has a photo (= has an embedding): the style image
             the gateway asks the style worker to transfer.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import redis
from pymongo.database import Database

from libs.common import keys
from libs.common.embedding_scan import EmbeddingScanGate
from libs.common.metrics import STORE_ERRORS
from libs.common.style_math import catalog_centroid, centre, encode_centroid
from services.scoring import metrics

log = logging.getLogger(__name__)


@dataclass
class StyleProfile:
    vector: np.ndarray  # float32, L2-normalised
    confidence: float
    anchor: str
    items_used: int
    centred: bool = False  # vector lives in the catalog-centred space (the gateway must centre items too)


def compute_profile(
    history: dict[str, float],
    embeddings: dict[str, np.ndarray],
    half_confidence_weight: float,
    centroid: np.ndarray | None = None,
    scale: float = 1.0,
) -> StyleProfile | None:
    """The user's profile in the centred space of ``centroid`` (``history``'s weights times ``scale``).

    ``centroid`` None (no catalog centroid known yet: tiny catalogs, tests) falls back to
    the uncentred unit embeddings; the gateway then also scores uncentred (it reads the
    same published centroid), so profile and items stay in one space.
    """
    # Only the history's items with an embedding count. They are found by a set intersection (in
    # C: a heavy shopper's thousands of photo-less items cost no Python loop on each of their
    # events) and taken in id order, so the sums do not depend on the order items came in.
    common = history.keys() & embeddings.keys()
    used = [(item, w) for item in sorted(common) if (w := history[item] * scale) > 0]
    if not used:
        return None
    W = float(sum(w for _, w in used))
    vecs = centre(np.stack([embeddings[item] for item, _ in used]), centroid).astype(np.float64)
    weights = np.array([w / W for _, w in used], dtype=np.float64)
    acc = weights @ vecs
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
        centred=centroid is not None,
    )


class EmbeddingSource:
    """Item embeddings from Redis (style worker's cache), falling back to MongoDB items.

    Items without a photo never get an embedding; during a bulk backfill every batch would
    ask MongoDB about them again, so a negative answer is remembered for ``miss_ttl_s``
    (an embedding that appears later is picked up after that).

    An embedding Redis returned is kept in process for ``cache_ttl_s``: a profile needs the
    embeddings of the user's whole history, and a heavy shopper folded in on every batch had
    their hundreds of items fetched again each time (docs/scoring.md). A replaced or deleted
    embedding reaches profiles within ``cache_ttl_s``; 0 turns the cache off. An absent one is
    remembered too, but only as long as ``keys.item_embeddings_version()`` stands: the style
    worker increments it with every embedding it writes, the version is read in the same MGET,
    and when it moved the remembered absences are asked again, so a new photo's embedding
    still counts at the user's very next event. Without this, every batch asked Redis for every
    photo-less item of each user's whole history, a read that grew with the history
    (docs/scoring.md, "Under load"). A writer that does not increment the version is seen
    within ``cache_ttl_s``.

    With :meth:`start_backfill` (the service does it) the MongoDB fallback runs on its own thread
    and never delays the caller; without it (tools, tests) it is asked inline.
    """

    def __init__(
        self,
        r: redis.Redis,
        db: Database | None,
        items_collection: str,
        dim: int,
        miss_ttl_s: float = 60.0,
        cache_ttl_s: float = 0.0,
        cache_max: int = 1_000_000,
    ) -> None:
        self.redis = r
        self.db = db
        self.items_collection = items_collection
        self.dim = dim
        self.miss_ttl_s = miss_ttl_s
        self.cache_ttl_s = cache_ttl_s
        self.cache_max = cache_max
        # item -> when MongoDB may be asked again; in expiry order (one TTL for all), see _sweep
        self._missing_until: OrderedDict[str, float] = OrderedDict()
        self._cache: dict[str, tuple[float, np.ndarray]] = {}  # item -> (expires, the embedding Redis had)
        # item -> expiry, for items Redis had no embedding for under ``_version`` (emptied when the
        # version moves); in expiry order, so expired ones leave from the front
        self._absent: OrderedDict[str, float] = OrderedDict()
        self._version: bytes | str | None = None
        self._lock = threading.Lock()  # the caller's thread and the backfill thread share the dicts
        self._pending: set[str] = set()  # misses waiting for the backfill thread
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._backfill: threading.Thread | None = None

    def _decode(self, raw: bytes | str | None) -> np.ndarray | None:
        if not isinstance(raw, bytes) or len(raw) != 4 * self.dim:
            return None
        v = np.frombuffer(raw, dtype="<f4")
        return v if np.all(np.isfinite(v)) else None

    def get(self, items: Iterable[str]) -> dict[str, np.ndarray]:
        """The embeddings of ``items`` that exist. Sets, not a loop per item: a batch asks for every
        item of its users' histories, mostly the same ones again (and in a photo-less catalog all
        absent), and a Python loop over them grew with the histories (docs/scoring.md)."""
        wanted = set(items)
        if not wanted:
            return {}
        out: dict[str, np.ndarray] = {}
        now = time.monotonic()
        with self._lock:
            for item in wanted & self._cache.keys():  # the embedded items only
                expires, cached = self._cache[item]
                if expires > now:
                    out[item] = cached
            _sweep(self._absent, now)
            assumed_absent = (wanted & self._absent.keys()) - out.keys()
            version_then = self._version
        ask = list(wanted - out.keys() - assumed_absent)
        if self.cache_ttl_s > 0 or self._backfill is not None:
            metrics.EMBEDDING_CACHE.labels("hit").inc(len(out))
            metrics.EMBEDDING_CACHE.labels("absent").inc(len(assumed_absent))
            metrics.EMBEDDING_CACHE.labels("miss").inc(len(ask))
        # The version rides along in the same MGET: one round trip, and when it moved (the style
        # worker wrote an embedding since the absences were recorded) those are asked again.
        raws = self.redis.mget([keys.item_embeddings_version(), *(keys.item_embedding(i) for i in ask)])
        version = raws[0]
        found = list(zip(ask, raws[1:], strict=True))
        if version != version_then and assumed_absent:
            again = list(assumed_absent)
            found += zip(again, self.redis.mget([keys.item_embedding(i) for i in again]), strict=True)
            metrics.EMBEDDING_CACHE.labels("recheck").inc(len(again))
        missing: set[str] = set()
        with self._lock:
            if version != self._version:
                self._absent.clear()  # recorded under another version: asked again when wanted
            self._version = version
            if self.cache_ttl_s > 0 and len(self._cache) + len(self._absent) + len(found) > self.cache_max:
                self._cache.clear()
                self._absent.clear()
            stamp = time.monotonic()
            for item, raw in found:
                v = self._decode(raw)
                if v is not None:
                    out[item] = v
                    if self.cache_ttl_s > 0:
                        self._cache[item] = (now + self.cache_ttl_s, v)
                elif self.cache_ttl_s > 0:
                    _renew(self._absent, item, stamp + self.cache_ttl_s)
            _sweep(self._missing_until, now)
            missing = wanted - out.keys() - self._missing_until.keys()
            if missing and self._backfill is not None:
                # Asked once per miss_ttl_s, by the backfill thread: until it answers, the
                # profile is computed without these items (they had no embedding in Redis).
                for item in missing:
                    _renew(self._missing_until, item, stamp + self.miss_ttl_s)
                self._pending.update(missing)
                self._wake.set()
                missing = set()
        if missing and self.db is not None:
            out.update(self._from_mongo(sorted(missing), now))
        return out

    def _from_mongo(self, missing: list[str], now: float) -> dict[str, np.ndarray]:
        found: dict[str, np.ndarray] = {}
        if self.db is None:
            return found
        try:
            cur = self.db[self.items_collection].find({"_id": {"$in": missing}}, {"style_embedding": 1})
            for doc in cur:
                emb = doc.get("style_embedding")
                if isinstance(emb, list) and len(emb) == self.dim:
                    v = np.asarray(emb, dtype=np.float32)
                    if np.all(np.isfinite(v)):
                        found[str(doc["_id"])] = v
        except Exception:
            STORE_ERRORS.labels("mongo", "embedding_fallback").inc()
            log.warning("embedding fallback failed", exc_info=True)
            return found
        with self._lock:
            if len(self._missing_until) > 1_000_000:
                self._missing_until.clear()
            stamp = time.monotonic()
            for item in missing:
                if item not in found:
                    _renew(self._missing_until, item, stamp + self.miss_ttl_s)
            if self._backfill is not None:
                # Kept as long as a negative answer would be: Redis lacked them, MongoDB had them.
                for item, v in found.items():
                    self._cache[item] = (now + self.miss_ttl_s, v)
        return found

    def start_backfill(self) -> EmbeddingSource:
        """Move the MongoDB fallback off the caller's thread (the scoring consumer): a miss is
        queued and answered by one background query per wake-up, however many batches asked.

        Under load the fallback had been ~16% of the consumer's wall time (one ``$in`` query per
        batch that held an item whose negative answer had expired), time in which no event was
        applied (docs/scoring.md, "Under load"). What it finds is kept in process (as long as a
        negative answer) and counts from the user's next fold-in on."""
        if self.db is not None and self._backfill is None:
            self._backfill = threading.Thread(target=self._backfill_loop, name="embedding-backfill", daemon=True)
            self._backfill.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()

    def _backfill_loop(self) -> None:
        while not self._stop.is_set():
            self._wake.wait()
            self._wake.clear()
            with self._lock:
                todo, self._pending = list(self._pending), set()
            for start in range(0, len(todo), 1000):
                if self._stop.is_set():
                    return
                found = self._from_mongo(todo[start : start + 1000], time.monotonic())
                metrics.EMBEDDING_BACKFILL.labels("found").inc(len(found))
                metrics.EMBEDDING_BACKFILL.labels("absent").inc(min(1000, len(todo) - start) - len(found))


def _renew(expiring: OrderedDict[str, float], item: str, expires: float) -> None:
    """Set ``item``'s expiry, moving it to the back: with one TTL and a monotonic clock the dict
    stays in expiry order, which is what lets :func:`_sweep` stop at the first live entry."""
    expiring.pop(item, None)
    expiring[item] = expires


def _sweep(expiring: OrderedDict[str, float], now: float) -> None:
    """Drop the expired entries, oldest first; O(expired), not O(entries)."""
    while expiring:
        _item, expires = next(iter(expiring.items()))
        if expires > now:
            return
        expiring.popitem(last=False)


class CatalogCentroid:
    """The catalog style centroid, computed by scoring and published for the gateway.

    Mean of the unit embeddings of every embedded item (SCAN + MGET of the style worker's
    ``item_embedding`` keys, which carry no TTL, so Redis holds the whole embedded catalog).
    Recomputed when older than ``refresh_s``: it moves only as the catalog grows,
    and a slightly old centroid centres just as well. While none can be computed (fewer
    than MIN_CENTROID_ITEMS embedded items, Redis down) it retries every ``retry_s`` and
    profiles stay uncentred; the published key is then deleted so the gateway agrees. A retry
    scans only if ``keys.item_embeddings_version`` moved since the last scan (else one GET).

    With :meth:`start` (the service does it) the recomputation runs on its own thread and
    :meth:`get` only reads the last value. It used to run inside ``get``, i.e. in the consumer's
    profile write: the SCAN walks Redis's whole keyspace (every user's keys too), and under load
    each retry stalled the consumer for seconds while its backlog piled up (docs/scoring.md,
    "Under load"). Without :meth:`start` (tools, tests) ``get`` refreshes when due, as before.
    """

    def __init__(self, r: redis.Redis, dim: int, refresh_s: float, retry_s: float = 10.0) -> None:
        self.redis = r
        self.dim = dim
        self.refresh_s = refresh_s
        self.retry_s = retry_s
        self.value: np.ndarray | None = None
        self.items = 0
        self._next_at = 0.0
        self._scan_gate = EmbeddingScanGate()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def get(self) -> np.ndarray | None:
        if self._thread is None and time.monotonic() >= self._next_at:
            self._refresh_logged()
        return self.value

    def _refresh_logged(self) -> None:
        try:
            self.refresh()
        except redis.RedisError:
            STORE_ERRORS.labels("redis", "style_centroid").inc()
            log.warning("style centroid refresh failed; keeping the last one", exc_info=True)
            self._next_at = time.monotonic() + self.retry_s

    def start(self) -> CatalogCentroid:
        """One refresh now (profiles written from the first batch on are centred when they can
        be), then the refreshes on the ``style-centroid`` thread."""
        if self._thread is None:
            self._refresh_logged()
            self._thread = threading.Thread(target=self._run, name="style-centroid", daemon=True)
            self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(max(0.05, self._next_at - time.monotonic())):
            self._refresh_logged()

    def stop(self) -> None:
        self._stop.set()

    def refresh(self) -> np.ndarray | None:
        stamp = self.redis.get(keys.item_embeddings_version())
        if self._scan_gate.unchanged(stamp, self.refresh_s):
            # No embedding written or deleted since the last scan: it would find the same rows.
            # A catalog without embeddings (no photos yet) used to be rescanned every retry_s,
            # and that SCAN walks every user's keys: up to 3.8 s of Redis's time a minute in a
            # 4-minute `stylerec bench load` soak, with every other command waiting behind it.
            self._next_at = time.monotonic() + (self.refresh_s if self.value is not None else self.retry_s)
            return self.value
        scanned_at = time.monotonic()
        prefix = keys.item_embedding("")
        names = list(self.redis.scan_iter(match=prefix + "*", count=1000))
        rows: list[np.ndarray] = []
        for start in range(0, len(names), 500):
            chunk = names[start : start + 500]
            for raw in self.redis.mget(chunk):
                if isinstance(raw, bytes) and len(raw) == 4 * self.dim:
                    v = np.frombuffer(raw, dtype="<f4")
                    if np.all(np.isfinite(v)) and np.linalg.norm(v) > 0:
                        rows.append(v)
        centroid, n = catalog_centroid(np.stack(rows) if rows else np.zeros((0, self.dim), np.float32))
        key = keys.style_centroid()
        if centroid is None:
            self.redis.delete(key)
        else:
            pipe = self.redis.pipeline(transaction=True)
            pipe.hset(key, mapping=encode_centroid(centroid, n, time.time()))  # type: ignore[arg-type]
            pipe.expire(key, int(max(3600.0, 10 * self.refresh_s)))
            pipe.execute()
        self.value, self.items = centroid, n
        self._scan_gate.scanned(stamp, scanned_at)
        self._next_at = time.monotonic() + (self.refresh_s if centroid is not None else self.retry_s)
        log.info("style centroid refreshed", extra={"items": n, "published": centroid is not None})
        return centroid


class ProfileWriter:
    def __init__(
        self,
        r: redis.Redis,
        source: EmbeddingSource,
        half_confidence_weight: float,
        ttl_s: int,
        centroid: CatalogCentroid | None = None,
    ) -> None:
        self.redis = r
        self.source = source
        self.half = half_confidence_weight
        self.ttl_s = ttl_s
        self.centroid = centroid

    def update(self, user: str, history: dict[str, float]) -> StyleProfile | None:
        return self.update_many({user: history})[user]

    def lookup(self, items: set[str]) -> tuple[set[str], dict[str, np.ndarray]]:
        """The embeddings a batch needs (``items``: every item of its users' histories), fetched
        before the caller takes its write lock (the lookup may fall back to MongoDB, and nothing
        that slow belongs under the lock the consumer waits on): (items looked up, the embeddings
        found)."""
        return items, self.source.get(items)

    def update_many(
        self,
        histories: dict[str, dict[str, float]],
        prefetched: tuple[set[str], dict[str, np.ndarray]] | None = None,
    ) -> dict[str, StyleProfile | None]:
        """One embedding lookup for all users of a batch (only of items ``prefetched`` lacks: a
        history may have grown since), one MULTI/EXEC for the batch."""
        # One MULTI/EXEC for the batch: the gateway never sees a half-written profile.
        pipe = self.redis.pipeline(transaction=True)
        out = self.queue_many(pipe, histories, prefetched)
        pipe.execute()
        return out

    def queue_many(
        self,
        pipe: redis.client.Pipeline,
        histories: dict[str, dict[str, float]],
        prefetched: tuple[set[str], dict[str, np.ndarray]] | None = None,
        scale: float = 1.0,
    ) -> dict[str, StyleProfile | None]:
        """:meth:`update_many` into the caller's transaction (the consumer's recs write); the
        histories' weights times ``scale`` (InteractionState.stored_histories)."""
        looked, embeddings = prefetched if prefetched is not None else (set(), {})
        rest = set().union(*histories.values()) - looked
        if rest:
            embeddings = {**embeddings, **self.source.get(rest)}
        centroid = self.centroid.get() if self.centroid is not None else None
        out: dict[str, StyleProfile | None] = {}
        for user, history in histories.items():
            profile = compute_profile(history, embeddings, self.half, centroid, scale)
            out[user] = profile
            self._queue(pipe, user, profile)
        return out

    def _queue(self, pipe: redis.client.Pipeline, user: str, profile: StyleProfile | None) -> None:
        key = keys.style_profile(user)
        if profile is None:
            pipe.delete(key)
            return
        pipe.delete(key)
        pipe.hset(
            key,
            mapping={
                "vector": profile.vector.astype("<f4").tobytes(),
                "confidence": f"{profile.confidence:.4f}",
                "anchor": profile.anchor,
                "centred": "1" if profile.centred else "0",
                "updated_at": f"{time.time():.3f}",
            },
        )
        pipe.expire(key, self.ttl_s)
