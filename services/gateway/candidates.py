"""Where candidate items come from, in order of preference.

1. ``recs(user)`` in Redis — the per-user top-N scoring keeps fresh (the fast path);
2. scoring ``TopN`` over gRPC when Redis has none (a user scoring knows whose recs
   expired, per the ``user_known`` marker, or Redis is down); a shopper with neither recs
   nor the marker is one scoring never saw, answered from popularity without the call;
3. popularity (``popular(category)`` in Redis, else the last popularity list
   this process saw) — for unknown users, or when both of the above failed.

The source is reported so the gateway can say which strategy produced an answer
and whether it had to fall back.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Any, cast

import redis
from stylerec.v1 import scoring_pb2

from libs.common import keys
from services.gateway.answers import Provenance
from services.gateway.deadlines import Deadline, DependencyUnavailable
from services.gateway.downstream import Degradation, Downstream

CF = "cf"
POPULAR = "popular"


@dataclass
class CandidateSet:
    source: str  # CF or POPULAR
    items: list[tuple[str, float]] = field(default_factory=list)
    model_version: str = ""
    known_user: bool = False


class CandidateSource:
    """Also :class:`services.gateway.answers.Versioned`: each popularity list (category, length)
    has a version that moves when a read brings different content, so kept answers built from a
    list stay valid while popularity is quiet and are rebuilt as soon as it moves."""

    def __init__(self, downstream: Downstream, near_cache_s: float = 0.0) -> None:
        self.ds = downstream
        self.near_cache_s = near_cache_s
        # (category, n) -> (read at, items, model version, version of the list)
        self._near: dict[tuple[str, int], tuple[float, list[tuple[str, float]], str, int]] = {}
        self._versions: dict[tuple[str, int], tuple[list[tuple[str, float]], int]] = {}
        # Last popularity list read from Redis: the answer of last resort when Redis is down.
        self._last_popular: dict[str, list[tuple[str, float]]] = {}
        self._lock = threading.Lock()

    def for_user(
        self,
        user: str,
        pool: int,
        category: str,
        deadline: Deadline,
        deg: Degradation,
        prefetched: tuple[list[tuple[str, float]], str] | None = None,
        unknown: bool = False,
        built_from: Provenance | None = None,
    ) -> CandidateSet:
        """CF candidates, else popularity. ``prefetched``: recs the caller already read in its own
        pipeline (saves a round trip); None = read them here. ``built_from`` learns which
        popularity list was used, or that scoring answered (not versioned)."""
        recs_failed = False
        try:
            recs, version = prefetched or self.ds.redis_call("recs_get", lambda r: self.read_recs(r, user), deadline)
            if recs:
                return CandidateSet(CF, recs[:pool], version, known_user=True)
        except DependencyUnavailable as exc:
            deg.add(exc)
            recs_failed = True
        if self.ds.scoring is None or unknown:
            # A deployment without scoring replicas: Redis is the only CF source, not a degradation.
            # A shopper scoring never wrote (no recs, no user_known marker): its TopN would answer
            # popularity too, after a round trip through the busiest service (docs/gateway.md).
            return self.popular(pool, category, deadline, deg, built_from)
        if built_from is not None:
            built_from.volatile = True  # scoring's own state: no user-change message covers it
        try:
            resp = self.ds.scoring_call(
                "topn",
                lambda stub, timeout: stub.TopN(
                    scoring_pb2.TopNRequest(user_id=user, k=pool, exclude_seen=True, category=category),
                    timeout=timeout,
                ),
                deadline,
            )
            items = [(s.item_id, float(s.score)) for s in resp.items]
            if resp.source == "personalized" and items:
                return CandidateSet(CF, items, resp.model_version, known_user=True)
            if items and recs_failed:
                # Redis is down but scoring still knows popularity.
                return CandidateSet(POPULAR, items, resp.model_version)
        except DependencyUnavailable as exc:
            deg.add(exc)
        return self.popular(pool, category, deadline, deg, built_from)

    def popular(
        self, n: int, category: str, deadline: Deadline, deg: Degradation, built_from: Provenance | None = None
    ) -> CandidateSet:
        cands, version = self._popular(n, category, deadline, deg)
        if built_from is not None:
            built_from.used(self, (category, n), version)
        return cands

    def version(self, part: Hashable, deadline: Deadline) -> int | None:
        """The version of one popularity list, read again once the near cache's lifetime is over
        (what a new answer would do); None when Redis cannot say now or the list is empty."""
        category, n = cast(tuple[str, int], part)  # the (category, n) this source handed out
        return self._popular(n, category, deadline, Degradation())[1]

    def _popular(self, n: int, category: str, deadline: Deadline, deg: Degradation) -> tuple[CandidateSet, int | None]:
        """The list and its version (None: not versioned, i.e. empty, or the last list seen while
        Redis failed)."""
        # Popularity moves slowly: a list a second or two old is as good and saves a round trip.
        part = (category, n)
        near = self._near.get(part)
        if near is not None and time.monotonic() - near[0] < self.near_cache_s:
            return CandidateSet(POPULAR, near[1], near[2]), near[3]
        try:
            items, version = self.ds.redis_call("popular_get", lambda r: self._read_popular(r, n, category), deadline)
            with self._lock:
                self._last_popular[category] = items
                last = self._versions.get(part)
                v = last[1] if last is not None and last[0] == items else (last[1] + 1 if last else 1)
                self._versions[part] = (items, v)
                if self.near_cache_s > 0 and items:  # an empty list may fill any moment: do not keep it
                    self._near[part] = (time.monotonic(), items, version, v)
            return CandidateSet(POPULAR, items, version), (v if items else None)
        except DependencyUnavailable as exc:
            deg.add(exc)
        with self._lock:
            stale = self._last_popular.get(category) or self._last_popular.get("") or []
        if stale:
            deg.add("popularity: served the last list this gateway saw")
        return CandidateSet(POPULAR, stale[:n], ""), None

    @staticmethod
    def read_recs(r: redis.Redis, user: str) -> tuple[list[tuple[str, float]], str]:
        pipe = r.pipeline(transaction=False)
        queue_recs(pipe, user)
        return parse_recs(pipe.execute())

    @staticmethod
    def _read_popular(r: redis.Redis, n: int, category: str) -> tuple[list[tuple[str, float]], str]:
        pipe = r.pipeline(transaction=False)
        if category:
            pipe.zrevrange(keys.popular(category), 0, n - 1, withscores=True)
        pipe.zrevrange(keys.popular(), 0, n - 1, withscores=True)
        pipe.get(keys.model_version())
        out = pipe.execute()
        version = out[-1].decode() if out[-1] else ""
        rows = out[0] if (category and out[0]) else out[-2]
        return [(i.decode(), float(s)) for i, s in rows], version


def queue_recs(pipe: Any, user: str) -> None:
    """Queue the three reads :func:`parse_recs` expects (so callers can share one pipeline)."""
    pipe.hgetall(keys.recs(user))
    pipe.hget(keys.recs_meta(user), "model_version")
    pipe.get(keys.model_version())


def parse_recs(replies: list[Any]) -> tuple[list[tuple[str, float]], str]:
    recs_raw, version, global_version = replies
    # Best first, ties by item id: sorting (-score, id) tuples natively is the same order as a
    # key function and about half the cost per answer.
    order = sorted([(-float(s), i.decode()) for i, s in recs_raw.items()])
    ranked = [(i, -neg) for neg, i in order]
    v = version or global_version
    return ranked, v.decode() if v else ""
