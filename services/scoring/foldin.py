"""Real-time recommendations: the current model applied to a user's *current* history.

Every model scores a history row (see models/base.py), so folding a new event in is:
rebuild the row from the interaction state, score it, take the top-N, and rewrite the
user's keys in Redis in one MULTI/EXEC so the gateway never reads a half-written hash.

The model reference is swapped atomically (one attribute assignment under a lock);
every request takes one reference at its start and uses it to the end, so a request
never mixes two versions.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import redis
import scipy.sparse as sp

from libs.common import keys
from services.scoring import metrics
from services.scoring.interactions import InteractionState
from services.scoring.models.base import top_k_indices
from services.scoring.registry import ServingModel

POPULARITY_VERSION = "popularity-v1"


class ModelHolder:
    """The current model of this replica; ``swap`` is atomic, readers call ``get`` once."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._current: ServingModel | None = None
        self.swaps = 0

    def get(self) -> ServingModel | None:
        return self._current

    def swap(self, sm: ServingModel) -> bool:
        """Install ``sm`` unless the same or a newer version is already serving."""
        with self._lock:
            cur = self._current
            if cur is not None and (cur.version == sm.version or cur.trained_at > sm.trained_at):
                return False
            self._current = sm
            self.swaps += 1
        metrics.MODEL_SWAPS.inc()
        metrics.MODEL_TRAINED_AT.set(sm.trained_at)
        metrics.MODEL_ITEMS.set(len(sm.item_ids))
        return True

    def age_s(self) -> float:
        """Seconds since the serving model was trained (infinite when there is none)."""
        cur = self._current
        return time.time() - cur.trained_at if cur else float("inf")

    @property
    def version(self) -> str:
        cur = self._current
        return cur.version if cur else POPULARITY_VERSION


@dataclass
class Recs:
    items: list[tuple[str, float]]
    version: str
    source: str  # "personalized" | "popularity"


class Recommender:
    """Top-N for a user from the state and the current model; new items get reserved slots."""

    def __init__(
        self,
        state: InteractionState,
        holder: ModelHolder,
        new_item_slots: int = 2,
        categories: Callable[[], dict[str, str]] | None = None,
        arrivals: Callable[[], list[tuple[str, float]]] | None = None,
    ) -> None:
        self.state = state
        self.holder = holder
        self.new_item_slots = new_item_slots
        self.categories = categories or (lambda: {})
        self.arrivals = arrivals or (lambda: [])

    def history_row(self, sm: ServingModel, history: dict[str, float]) -> sp.csr_matrix:
        cols = [sm.item_index[i] for i in history if i in sm.item_index]
        vals = [history[i] for i in history if i in sm.item_index]
        data = np.log1p(np.asarray(vals, dtype=np.float64)).astype(np.float32)
        # A vanishingly decayed interaction is still an interaction: keep it visible to the model.
        data = np.maximum(data, np.float32(1e-6))
        return sp.csr_matrix((data, ([0] * len(cols), cols)), shape=(1, len(sm.item_ids)), dtype=np.float32)

    def _allowed(self, category: str) -> set[str] | None:
        if not category:
            return None
        cats = self.categories()
        return {i for i, c in cats.items() if c == category}

    def popularity(self, k: int, exclude: set[str], category: str = "") -> list[tuple[str, float]]:
        return self.state.popular(k, exclude, self._allowed(category))

    def top_n(self, user: str, k: int, exclude_seen: bool = True, category: str = "") -> Recs:
        sm = self.holder.get()  # one reference for the whole request: atomic w.r.t. swaps
        history = self.state.history(user) if user else {}
        seen = set(history)
        exclude = seen if exclude_seen else set()
        allowed = self._allowed(category)
        if sm is None or not any(i in sm.item_index for i in history):
            items = self.state.popular(k, exclude, allowed)
            return Recs(items, sm.version if sm else POPULARITY_VERSION, "popularity")
        scores = sm.model.score(self.history_row(sm, history))[0].astype(np.float64)
        if exclude:
            for i in exclude:
                j = sm.item_index.get(i)
                if j is not None:
                    scores[j] = -np.inf
        if allowed is not None:
            mask = np.full(scores.shape[0], -np.inf)
            for i in allowed:
                j = sm.item_index.get(i)
                if j is not None:
                    mask[j] = 0.0
            scores = scores + mask
        idx = top_k_indices(scores, k)
        items = [(sm.item_ids[j], float(scores[j])) for j in idx if np.isfinite(scores[j])]
        items = self._with_new_items(sm, items, k, exclude, allowed)
        return Recs(items, sm.version, "personalized")

    def _with_new_items(
        self,
        sm: ServingModel,
        items: list[tuple[str, float]],
        k: int,
        exclude: set[str],
        allowed: set[str] | None,
    ) -> list[tuple[str, float]]:
        """Items the model has never seen (added after training) take the last few slots:
        first those already interacted with, by decayed popularity, then the newest catalog
        arrivals created after the model was trained; scored just below the lowest model score.
        At most a quarter of the list: a short list (k < 4) is the model's alone, so unproven items
        never push out every personalized answer."""
        slots = min(self.new_item_slots, k // 4)
        if slots <= 0:
            return items[:k]
        skip = exclude | set(sm.item_index)
        fresh = self.state.popular(slots, skip, allowed)
        if len(fresh) < slots:
            taken = {i for i, _ in fresh}
            for item, created in self.arrivals():
                if len(fresh) >= slots or created <= sm.trained_at:
                    break
                if item in skip or item in taken or (allowed is not None and item not in allowed):
                    continue
                fresh.append((item, 0.0))
        if not fresh:
            return items[:k]
        kept = items[: k - len(fresh)]
        floor = kept[-1][1] if kept else 0.0
        step = max(abs(floor) * 1e-3, 1e-6)
        return kept + [(item, floor - step * (n + 1)) for n, (item, _) in enumerate(fresh)]

    def score_items(self, user: str, item_ids: Iterable[str]) -> tuple[list[tuple[str, float]], str]:
        sm = self.holder.get()
        wanted = list(item_ids)
        history = self.state.history(user)
        if sm is None or not any(i in sm.item_index for i in history):
            pop = dict(self.state.popular(10**9))
            return [(i, pop.get(i, 0.0)) for i in wanted], (sm.version if sm else POPULARITY_VERSION)
        scores = sm.model.score(self.history_row(sm, history))[0]
        out = [(i, float(scores[sm.item_index[i]]) if i in sm.item_index else 0.0) for i in wanted]
        return out, sm.version


class RecsWriter:
    """Writes a user's top-N, meta and seen set to Redis (keys per docs/contracts.md)."""

    def __init__(self, r: redis.Redis, engine: Recommender, top_n: int, ttl_s: int, exclude_seen: bool) -> None:
        self.redis = r
        self.engine = engine
        self.top_n = top_n
        self.ttl_s = ttl_s
        self.exclude_seen = exclude_seen

    def write_users(self, users: Iterable[str]) -> int:
        n = 0
        pipe = self.redis.pipeline(transaction=True)
        now = f"{time.time():.3f}"
        for user in users:
            start = time.perf_counter()
            recs = self.engine.top_n(user, self.top_n, exclude_seen=self.exclude_seen)
            metrics.FOLDIN_SECONDS.labels(recs.source).observe(time.perf_counter() - start)
            seen = self.engine.state.seen(user)
            pipe.delete(keys.recs(user))
            if recs.items:
                pipe.hset(keys.recs(user), mapping={i: f"{s:.6g}" for i, s in recs.items})
                pipe.expire(keys.recs(user), self.ttl_s)
            pipe.hset(keys.recs_meta(user), mapping={"model_version": recs.version, "updated_at": now})
            pipe.expire(keys.recs_meta(user), self.ttl_s)
            pipe.delete(keys.user_seen(user))
            if seen:
                pipe.sadd(keys.user_seen(user), *seen)
                pipe.expire(keys.user_seen(user), self.ttl_s)
            n += 1
            if n % 200 == 0:
                pipe.execute()
        pipe.execute()
        return n
