"""Real-time recommendations: the current model applied to a user's *current* history.

Every model scores a history row (see models/base.py), so folding a new event in is:
rebuild the row from the interaction state, score it, take the top-N, and rewrite the
user's keys in Redis in one MULTI/EXEC so the gateway never reads a half-written hash.

The model reference is swapped atomically (one attribute assignment under a lock);
every request takes one reference at its start and uses it to the end, so a request
never mixes two versions.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Container, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import redis
import scipy.sparse as sp

from libs.common import keys
from services.scoring import metrics
from services.scoring.interactions import InteractionState
from services.scoring.models.base import top_k_rows
from services.scoring.models.blend import RepeatBlend, RepeatWeights, UserHistory, blend_scores, neutral_stats
from services.scoring.registry import ServingModel
from services.scoring.user_sums import UserScores, UserSums

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
    rebuys: frozenset[str] = frozenset()  # items of the list from the user's own history (policy decay)


class Recommender:
    """Top-N for users from the state and the current model; new items get reserved slots.

    Every answer, one user's (TopN RPC) or a consumer batch's, goes through :meth:`top_n_many`:
    the batch's history rows are scored with one model call (one sparse x dense product for
    EASE), seen items are masked and the top-N taken for all rows at once, and what does not
    depend on the user (the popularity ranking, the model's unknown items) is computed once per
    batch. One user at a time, the product and the per-user popularity sort were most of
    scoring's CPU under load (docs/scoring.md, "Fold-in").

    Heavy shoppers of a model that scores by item sums (binary EASE) skip the product: their
    sums are kept between fold-ins and only their new items are added (``user_sums``,
    services/scoring/user_sums.py); the result is bit-for-bit the product's.
    """

    def __init__(
        self,
        state: InteractionState,
        holder: ModelHolder,
        new_item_slots: int = 2,
        categories: Callable[[], dict[str, str]] | None = None,
        arrivals: Callable[[], list[tuple[str, float]]] | None = None,
        repeat: bool = False,
        user_sums: UserSums | None = None,
    ) -> None:
        """``repeat``: repeat_policy decay: a list asked for without excluding seen items mixes the
        user's rebuy history (the state's per-event-type decayed record) with CF by the weights the
        model learned (services/scoring/models/blend.py)."""
        self.repeat = repeat
        self.user_sums = user_sums
        if user_sums is not None:
            state.forget_hooks.append(user_sums.drop)
        self.state = state
        self.holder = holder
        self.new_item_slots = new_item_slots
        self.categories = categories or (lambda: {})
        self.arrivals = arrivals or (lambda: [])

    @staticmethod
    def history_rows(sm: ServingModel, histories: list[dict[str, float]], scale: float = 1.0) -> sp.csr_matrix:
        """CSR rows over the model's items: ``log1p`` of each known item's decayed weight
        (``scale`` x the weight given: InteractionState.stored_histories)."""
        indptr = [0]
        cols: list[int] = []
        vals: list[float] = []
        index = sm.item_index
        for history in histories:
            for i, w in history.items():
                j = index.get(i)
                if j is not None:
                    cols.append(j)
                    vals.append(w)
            indptr.append(len(cols))
        data = np.log1p(np.asarray(vals, dtype=np.float64) * scale).astype(np.float32)
        # A vanishingly decayed interaction is still an interaction: keep it visible to the model.
        data = np.maximum(data, np.float32(1e-6))
        return sp.csr_matrix(
            (data, np.asarray(cols, dtype=np.int32), np.asarray(indptr, dtype=np.int32)),
            shape=(len(histories), len(sm.item_ids)),
            dtype=np.float32,
        )

    def history_row(self, sm: ServingModel, history: dict[str, float]) -> sp.csr_matrix:
        return self.history_rows(sm, [history])

    def _allowed(self, category: str) -> set[str] | None:
        if not category:
            return None
        cats = self.categories()
        return {i for i, c in cats.items() if c == category}

    def popularity(self, k: int, exclude: set[str], category: str = "") -> list[tuple[str, float]]:
        return self.state.popular(k, exclude, self._allowed(category))

    def top_n(self, user: str, k: int, exclude_seen: bool = True, category: str = "") -> Recs:
        return self.top_n_many([user] if user else [""], k, exclude_seen, category)[user if user else ""]

    def top_n_many(
        self,
        users: Iterable[str],
        k: int,
        exclude_seen: bool = True,
        category: str = "",
        histories: dict[str, dict[str, float]] | None = None,
        scale: float = 1.0,
    ) -> dict[str, Recs]:
        """Each user's top-``k``; identical to asking for each user alone (tests/scoring/test_batched_foldin.py).
        ``histories`` (read from the state when None) have their weights multiplied by ``scale``."""
        start = time.perf_counter()
        sm = self.holder.get()  # one reference for the whole batch: atomic w.r.t. swaps
        wanted = list(dict.fromkeys(users))
        if histories is None:
            histories = self.state.histories(u for u in wanted if u)
        out = self._rank(sm, wanted, k, exclude_seen, category, histories, scale)
        # Per user, the batch's time shared out: the histogram keeps meaning "cost of one user's
        # fold-in" whatever the batch size, which the batch-size histogram shows beside it.
        each = (time.perf_counter() - start) / max(1, len(wanted))
        for recs in out.values():
            metrics.FOLDIN_SECONDS.labels(recs.source).observe(each)
        metrics.FOLDIN_BATCH_USERS.observe(len(wanted))
        return out

    def _rank(
        self,
        sm: ServingModel | None,
        wanted: list[str],
        k: int,
        exclude_seen: bool,
        category: str,
        histories: dict[str, dict[str, float]],
        scale: float = 1.0,
    ) -> dict[str, Recs]:
        allowed = self._allowed(category)
        out: dict[str, Recs] = {}
        scored: list[str] = []
        for u in wanted:
            history = histories.get(u, {})
            if sm is not None and any(i in sm.item_index for i in history):
                scored.append(u)
            else:
                exclude = set(history) if exclude_seen else set()
                items = self.state.popular(k, exclude, allowed)
                out[u] = Recs(items, sm.version if sm else POPULARITY_VERSION, "popularity")
        if sm is None or not scored:
            return out
        sums = sm.model.item_sums() if self.user_sums is not None else None
        kept: list[str] = []
        if sums is not None and self.user_sums is not None:
            kept = [u for u in scored if self.user_sums.wants(histories[u])]
        if kept:
            # Rows of the product first, then the kept users: ``scored`` is the order of the rows.
            held = set(kept)
            scored = [u for u in scored if u not in held] + kept
        whole = scored[: len(scored) - len(kept)]
        rows = self.history_rows(sm, [histories[u] for u in whole], scale)
        parts: list[np.ndarray] = []
        if whole:
            # float32 as the models produce it: the values (and so the ranking) are the ones the
            # float64 copy had, and the copy of a batch x catalog matrix was a tenth of the batch's time.
            parts.append(np.array(sm.model.score(rows), dtype=np.float32, copy=None))
        held_scores: dict[str, UserScores] = {}
        if kept and sums is not None and self.user_sums is not None:
            held_scores = self.user_sums.scores(sm.version, sums, sm.item_index, kept, histories)
            parts.append(np.stack([held_scores[u].scores for u in kept]))
        scores = parts[0] if len(parts) == 1 else np.concatenate(parts)
        repeat = self.repeat and not exclude_seen
        if repeat:
            blend = sm.repeat or RepeatBlend(RepeatWeights(), neutral_stats(len(sm.item_ids)), "defaults")
            hist = UserHistory(*self.state.repeat_histories(scored, sm.item_index))
            scores = blend_scores(scores, hist, blend.stats, blend.weights)
        if exclude_seen:
            # The CSR structure is the seen set of each row (a kept user's entry holds theirs):
            # mask them all in one fancy-index assignment.
            r_idx = [np.repeat(np.arange(len(whole)), np.diff(rows.indptr))]
            c_idx = [rows.indices]
            for r, u in enumerate(kept, start=len(whole)):
                seen = held_scores[u].seen
                r_idx.append(np.full(len(seen), r))
                c_idx.append(seen)
            scores[np.concatenate(r_idx), np.concatenate(c_idx)] = -np.inf
        if allowed is not None:
            mask = np.full(scores.shape[1], -np.inf, dtype=np.float32)
            cols = [j for j in (sm.item_index.get(i) for i in allowed) if j is not None]
            mask[cols] = 0.0
            scores += mask
        top = top_k_rows(scores, k)
        top_scores = np.take_along_axis(scores, top, axis=1)
        finite = np.isfinite(top_scores)
        fresh = self._fresh_candidates(sm, k, allowed)
        ids = sm.item_ids
        for r, u in enumerate(scored):
            keep = finite[r]
            items = [(ids[j], v) for j, v in zip(top[r][keep].tolist(), top_scores[r][keep].tolist(), strict=True)]
            listed = self._with_new_items(items, k, histories[u] if exclude_seen else (), fresh)
            rebuys = frozenset(i for i, _ in listed if i in histories[u]) if repeat else frozenset()
            out[u] = Recs(listed, sm.version, "personalized", rebuys)
        return out

    def _fresh_candidates(self, sm: ServingModel, k: int, allowed: set[str] | None) -> list[str]:
        """Items the model has never seen (added after training), in the order they take the
        reserved slots: first those already interacted with, by decayed popularity, then the
        newest catalog arrivals created after the model was trained. The same for every user of a
        batch; each user then skips the ones they have seen."""
        slots = min(self.new_item_slots, k // 4)
        if slots <= 0:
            return []
        index = sm.item_index
        fresh = [i for i, _ in self.state.ranked_among(lambda i: i not in index and (allowed is None or i in allowed))]
        known = set(fresh)
        for item, created in self.arrivals():
            if created <= sm.trained_at:
                break
            if item in index or item in known or (allowed is not None and item not in allowed):
                continue
            fresh.append(item)
            known.add(item)
        return fresh

    def _with_new_items(
        self, items: list[tuple[str, float]], k: int, exclude: Container[str], fresh: list[str]
    ) -> list[tuple[str, float]]:
        """Up to ``new_item_slots`` unseen items of ``fresh`` take the last slots, scored just below
        the lowest model score. At most a quarter of the list: a short list (k < 4) is the model's
        alone, so unproven items never push out every personalized answer."""
        slots = min(self.new_item_slots, k // 4)
        if slots <= 0:
            return items[:k]
        picked: list[str] = []
        for item in fresh:
            if len(picked) >= slots:
                break
            if item not in exclude:
                picked.append(item)
        if not picked:
            return items[:k]
        kept = items[: k - len(picked)]
        floor = kept[-1][1] if kept else 0.0
        step = max(abs(floor) * 1e-3, 1e-6)
        return kept + [(item, floor - step * (n + 1)) for n, item in enumerate(picked)]

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


# One user's recs, meta, known marker and seen set, in one script call: the ~7 commands each had
# cost redis-py a Python call and a packing of their own, which made the Redis writes about half
# of a batch's client-side time (docs/scoring.md, "Under load"). KEYS: recs, recs_meta,
# user_known, user_seen. ARGV: ttl, known ttl, n, n x (item, score), m, m x (field, value),
# seen mode, history size, the seen members to add (mode "add": the batch's new items) or all of
# them (mode "whole"). Mode "add" then checks the set has exactly the history's size: only scoring
# writes the set, always from the history, and a history only grows (ForgetUser deletes the
# keys), so "subset of the history, of the history's size" means "equal to it". Returns 1, or 0
# when the set had expired or drifted: the caller rewrites it whole.
WRITE_USER_LUA = """
local function sadd_from(key, first)
  while first <= #ARGV do
    local last = math.min(first + 4999, #ARGV)
    redis.call('SADD', key, unpack(ARGV, first, last))
    first = last + 1
  end
end
local ttl = ARGV[1]
local n = tonumber(ARGV[3])
local i = 4
redis.call('DEL', KEYS[1])
if n > 0 then
  redis.call('HSET', KEYS[1], unpack(ARGV, i, i + 2 * n - 1))
  redis.call('EXPIRE', KEYS[1], ttl)
end
i = i + 2 * n
local m = tonumber(ARGV[i])
redis.call('HSET', KEYS[2], unpack(ARGV, i + 1, i + 2 * m))
redis.call('EXPIRE', KEYS[2], ttl)
i = i + 2 * m + 1
redis.call('SET', KEYS[3], '1', 'EX', ARGV[2])
local mode, size = ARGV[i], tonumber(ARGV[i + 1])
if mode == 'whole' then
  redis.call('DEL', KEYS[4])
  if #ARGV >= i + 2 then
    sadd_from(KEYS[4], i + 2)
    redis.call('EXPIRE', KEYS[4], ttl)
  end
  return 1
end
sadd_from(KEYS[4], i + 2)
if redis.call('SCARD', KEYS[4]) == size then
  redis.call('EXPIRE', KEYS[4], ttl)
  return 1
end
return 0
"""
SEEN_ADD_MAX = 256  # a user with more new items than this in one batch gets the whole-set rewrite


class RecsWriter:
    """Writes a user's top-N, meta and seen set to Redis (keys per docs/contracts.md)."""

    def __init__(
        self,
        r: redis.Redis,
        engine: Recommender,
        top_n: int,
        ttl_s: int,
        exclude_seen: bool,
        known_ttl_s: int,
    ) -> None:
        self.redis = r
        self.engine = engine
        self.top_n = top_n
        self.ttl_s = ttl_s
        self.exclude_seen = exclude_seen
        self.known_ttl_s = max(known_ttl_s, ttl_s)

    def write_users(
        self,
        users: Iterable[str],
        chunk: int = 500,
        histories: dict[str, dict[str, float]] | None = None,
        scale: float = 1.0,
        added: dict[str, set[str]] | None = None,
        also: Callable[[redis.client.Pipeline, dict[str, dict[str, float]], float], None] | None = None,
    ) -> int:
        """Per ``chunk`` users: one batched fold-in and one MULTI/EXEC (the gateway never reads a
        half-written user, and a batch costs one Redis round trip instead of one per user).
        ``histories``: the users' current histories when the caller already read them (weights
        times ``scale``: InteractionState.stored_histories).
        ``added``: when the caller knows what each user's history gained since this process last
        wrote it (the consumer's batch), the seen set takes just those items instead of being
        deleted and rewritten whole: a heavy shopper's set holds hundreds of items, and rewriting
        it on each of their events made a fold-in's cost grow with the history (docs/load.md).
        ``also``: queues more writes of the same users (their style profiles, from the same
        histories and scale) into the same MULTI/EXEC, so a consumer batch costs one round trip,
        not one per kind of key.

        The seen-set script goes as EVAL, not as a registered script: redis-py asks ``SCRIPT
        EXISTS`` in a round trip of its own before every pipeline that holds a registered script,
        and Redis caches the compiled script by its hash either way."""
        wanted = list(dict.fromkeys(users))
        for begin in range(0, len(wanted), chunk):
            part = wanted[begin : begin + chunk]
            if histories is not None:
                hist = {u: histories.get(u, {}) for u in part}
            else:
                hist, scale = self.engine.state.stored_histories(part)
            recs = self.engine.top_n_many(part, self.top_n, exclude_seen=self.exclude_seen, histories=hist, scale=scale)
            seen = {u: hist[u].keys() for u in part}
            now = f"{time.time():.3f}"
            pipe = self.redis.pipeline(transaction=True)
            checks: dict[int, str] = {}  # index of a seen-set add in the transaction's results -> user
            for user in part:
                r = recs[user]
                args: list[Any] = [self.ttl_s, self.known_ttl_s, len(r.items)]
                for item, score in r.items:
                    args += (item, f"{score:.6g}")
                meta: list[Any] = ["model_version", r.version, "updated_at", now]
                if self.engine.repeat:
                    # Which listed items are the user's own again (the gateway marks them "rebuy").
                    meta += ("rebuy", json.dumps(sorted(r.rebuys)))
                args += (len(meta) // 2, *meta)
                new = added.get(user, set()) if added is not None else None
                if new is not None and seen[user] and len(new) <= SEEN_ADD_MAX:
                    checks[len(pipe.command_stack)] = user
                    args += ("add", len(seen[user]), *sorted(new))
                else:
                    args += ("whole", len(seen[user]), *seen[user])
                user_keys = (keys.recs(user), keys.recs_meta(user), keys.user_known(user), keys.user_seen(user))
                pipe.execute_command("EVAL", WRITE_USER_LUA, len(user_keys), *user_keys, *args)
            if also is not None:
                also(pipe, hist, scale)
            # Last in the transaction: gateways drop the answers they kept for these users
            # (services/gateway/answers.py) once everything above is visible.
            pipe.publish(keys.user_changes_channel(), " ".join(part))
            results = pipe.execute()
            redo = [u for i, u in checks.items() if results[i] != 1]
            if redo:
                pipe = self.redis.pipeline(transaction=True)
                for user in redo:
                    self._write_seen(pipe, user, seen[user])
                pipe.execute()
            metrics.SEEN_WRITES.labels("added").inc(len(checks) - len(redo))
            metrics.SEEN_WRITES.labels("whole").inc(len(part) - len(checks) + len(redo))
        return len(wanted)

    def _write_seen(self, pipe: redis.client.Pipeline, user: str, seen: Iterable[str]) -> None:
        pipe.delete(keys.user_seen(user))
        members = list(seen)
        if members:
            pipe.sadd(keys.user_seen(user), *members)
            pipe.expire(keys.user_seen(user), self.ttl_s)
