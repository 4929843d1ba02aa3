"""Whole GetRecommendations answers kept per (user, request) until that user's state changes.

WHY: a storefront asks for the same shopper's shelf on every page view, and between two of that
shopper's events nothing the answer depends on changes. Building it again cost a Redis round trip
plus ~0.3 ms of ranking and protobuf work per call, several times what a no-op call costs
(docs/gateway.md). Kept here, a repeat view costs a dictionary lookup.

Exactness comes from invalidation, not from the lifetime:

* scoring PUBLISHes the users of every write on ``keys.user_changes_channel()`` inside the same
  MULTI/EXEC as their recs, seen set and style profile (services/scoring/foldin.py), and again
  when ForgetUser deletes a user's keys (services/scoring/forget.py); :class:`UserChangeListener`
  drops those users' answers;
* item-updates (price, photo, deletion) drop every answer (services/gateway/invalidation.py);
* an answer computed while an invalidation of its user arrived is not stored (a per-user change
  counter read before the Redis read and checked before the store);
* while the subscription is down or silent (start-up, Redis lost: the listener pings every
  ``PING_S`` and the cache serves nothing when it heard nothing for ``STALE_S``), no answer is
  served from here, and all are dropped when it comes back: an invalidation may have been missed.

The shared inputs that change without a user-change message are **versioned**, and a kept answer
records the versions it was built from (:class:`Provenance`): the popularity list each popular
candidate came from (services/gateway/candidates.py) and the embedding index of the style path
(services/gateway/similar.py). A hit asks each of those sources for its current version, which
refreshes it exactly as a new build would (the popularity near cache after its 2 s, the index
after its reload interval); a version that moved makes the answer ``outdated`` and it is rebuilt.
A version moves only when the content does, so a shop whose popularity is quiet keeps its style
shelves. Anything not versioned (scoring's ``TopN`` answered the candidates, the style path
without the in-process index) makes the answer **volatile**: kept only ``volatile_ttl_s`` (the
popularity near cache's bound, as before). ``ttl_s`` (``STYLEREC_ANSWER_CACHE_S``, default 30 s)
is then only a backstop, and the sweep's period.

Never kept: degraded answers, and answers shorter than asked (an empty or short
popularity list may fill any moment, as the popularity near cache already assumes). An answer
with a stylized image still PENDING is restyled as soon as the style worker says that image is
stored: it publishes ``[content, style]`` on ``keys.stylized_ready_channel()`` in the same
MULTI/EXEC as the reference, the listener marks the kept answers that showed that pair PENDING,
and their next request **restyles** them: the caller re-asks only the stylized states (one Redis
script call) and keeps the result for the rest of the answer's lifetime, instead of rebuilding the
whole answer (nothing else of it can have changed unnoticed: its user's changes and item updates
still drop it). Without such a message a PENDING answer is re-asked every ``pending_ttl_s``
(``STYLEREC_ANSWER_PENDING_RECHECK_S``, 10 s): a job whose publish failed or whose pending marker
expired is enqueued again then.
Hit rate and invalidations: ``stylerec_gateway_answer_cache_total{result}``,
``stylerec_gateway_answer_cache_invalidations_total{reason}``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol

import redis
from stylerec.v1 import gateway_pb2

from libs.common import keys
from services.gateway.deadlines import Deadline
from services.gateway.metrics import ANSWER_CACHE, ANSWER_CACHE_INVALIDATIONS

log = logging.getLogger(__name__)

Key = tuple[str, bytes]  # (user pseudonym, the request's bytes)


class Versioned(Protocol):
    """A shared input of answers that changes without a user-change message."""

    def version(self, part: Hashable, deadline: Deadline) -> int | None:
        """The current version of ``part``, refreshed as a new answer would refresh it; None when
        it cannot be told now (its store is unreachable: the answer is rebuilt, and degraded)."""
        ...


Depends = tuple[tuple[Versioned, Hashable, int], ...]


@dataclass
class Provenance:
    """What one answer was built from, beyond its user's state and the catalog."""

    depends: list[tuple[Versioned, Hashable, int]] = field(default_factory=list)
    volatile: bool = False  # built from something unversioned: kept only briefly

    def used(self, source: Versioned, part: Hashable, version: int | None) -> None:
        if version is None:
            self.volatile = True
        elif (source, part, version) not in self.depends:
            self.depends.append((source, part, version))


class Kept(NamedTuple):
    answer: gateway_pb2.GetRecommendationsResponse
    expires_at: float  # monotonic; a restyled answer keeps its original lifetime
    restyle: bool  # its PENDING images are due for a re-check (the rest of it is still exact)
    depends: Depends  # the versions it was built from (kept with it when restyled)
    volatile: bool


def pending_pairs(answer: gateway_pb2.GetRecommendationsResponse) -> set[tuple[str, str]]:
    """(content, style) of each stylized image the answer shows PENDING (drawn in its anchor's style)."""
    return {
        (it.item_id, answer.anchor_item_id) for it in answer.items if it.stylized_status == gateway_pb2.STYLIZED_PENDING
    }


PING_S = 0.25  # the listener's heartbeat on its subscribed connection
STALE_S = 1.0  # no hits once the subscription has been silent this long


class AnswerCache:
    def __init__(
        self, ttl_s: float, max_entries: int, pending_ttl_s: float = 0.0, volatile_ttl_s: float | None = None
    ) -> None:
        self.ttl_s = ttl_s
        self.volatile_ttl_s = ttl_s if volatile_ttl_s is None else min(ttl_s, volatile_ttl_s)
        self.pending_ttl_s = min(ttl_s, pending_ttl_s)
        self.max_entries = max_entries
        self._subscribed = False
        self._heard_at = 0.0  # last time the listener heard from Redis (a message or a pong)
        # key -> (expires at, answer, PENDING images re-checked from, versions built from, volatile);
        # monotonic times
        self._entries: dict[Key, tuple[float, gateway_pb2.GetRecommendationsResponse, float, Depends, bool]] = {}
        self._by_user: dict[str, set[Key]] = {}
        # (content, style) of each PENDING image -> the kept answers showing it (may name dropped ones)
        self._pending_pairs: dict[tuple[str, str], set[Key]] = {}
        # Announcements: pair -> the sequence number it was announced at (forgotten at each sweep,
        # whose new epoch refuses any answer started before it anyway).
        self._ready_at: dict[tuple[str, str], int] = {}
        self._ready_seq = 0
        self._changes: dict[str, int] = {}  # user -> invalidations seen (for the race check)
        self._epoch = 0  # bumped by clear() and each sweep: a store started before it is refused
        self._sweep_at = 0.0
        self._lock = threading.Lock()
        self._hit = ANSWER_CACHE.labels("hit")
        self._miss = ANSWER_CACHE.labels("miss")
        self._skipped = ANSWER_CACHE.labels("not_kept")
        self._restyle = ANSWER_CACHE.labels("restyle")
        self._outdated = ANSWER_CACHE.labels("outdated")

    @property
    def enabled(self) -> bool:
        return self.ttl_s > 0 and self.max_entries > 0

    def heard(self, subscribed: bool = True) -> None:
        """The listener heard from Redis (``subscribed=False``: it lost the subscription)."""
        self._subscribed = subscribed
        self._heard_at = time.monotonic()

    @property
    def live(self) -> bool:
        return self._subscribed and time.monotonic() - self._heard_at < STALE_S

    def get(self, key: Key, deadline: Deadline) -> Kept | None:
        now = time.monotonic()
        if not self._subscribed or now - self._heard_at >= STALE_S:
            return None
        entry = self._entries.get(key)
        if entry is None or entry[0] <= now:
            self._miss.inc()
            return None
        until, kept, restyle_at, depends, volatile = entry
        for source, part, version in depends:
            if source.version(part, deadline) != version:
                self._outdated.inc()
                with self._lock:
                    if self._entries.get(key) is entry:
                        del self._entries[key]
                return None
        if restyle_at <= now:
            self._restyle.inc()
            return Kept(kept, until, True, depends, volatile)
        self._hit.inc()
        return Kept(kept, until, False, depends, volatile)

    def token(self, user: str) -> tuple[int, int, int]:
        """Taken before the answer's Redis read; :meth:`put` refuses the answer if its user moved,
        and restyles it at once if an image it shows PENDING was announced meanwhile."""
        return self._epoch, self._changes.get(user, 0), self._ready_seq

    def put(
        self,
        key: Key,
        token: tuple[int, int, int],
        answer: gateway_pb2.GetRecommendationsResponse,
        k: int,
        built_from: Provenance | None = None,
        expires_at: float | None = None,
    ) -> None:
        """``built_from``: the versions the answer was built from; ``expires_at``: the lifetime of
        the answer this one restyles (None: a new answer)."""
        if not self.live:
            return
        if len(answer.items) < k:
            self._skipped.inc()
            return
        now = time.monotonic()
        depends: Depends = tuple(built_from.depends) if built_from is not None else ()
        volatile = built_from is not None and built_from.volatile
        lifetime = self.volatile_ttl_s if volatile else self.ttl_s
        until = now + lifetime if expires_at is None else expires_at
        pairs = pending_pairs(answer)
        pending = bool(pairs)
        if answer.degraded or until <= now or (pending and self.pending_ttl_s <= 0):
            self._skipped.inc()
            return
        restyle_at = now + self.pending_ttl_s if pending else float("inf")
        user = key[0]
        with self._lock:
            if token[:2] != (self._epoch, self._changes.get(user, 0)):
                self._skipped.inc()
                return
            if any(self._ready_at.get(pair, -1) >= token[2] for pair in pairs):
                restyle_at = 0.0  # announced while this answer was read as PENDING
            if now >= self._sweep_at:
                self._sweep(now)
            if len(self._entries) >= self.max_entries:
                self._drop_all()
            self._entries[key] = (until, answer, restyle_at, depends, volatile)
            self._by_user.setdefault(user, set()).add(key)
            for pair in pairs:
                self._pending_pairs.setdefault(pair, set()).add(key)

    def stylized_ready(self, pairs: list[tuple[str, str]]) -> None:
        """The style worker stored these images: answers that showed them PENDING restyle next time."""
        marked = 0
        with self._lock:
            for pair in pairs:
                self._ready_at[pair] = self._ready_seq
                for key in self._pending_pairs.pop(pair, ()):
                    entry = self._entries.get(key)
                    if entry is not None and entry[2] > 0.0:
                        self._entries[key] = (entry[0], entry[1], 0.0, entry[3], entry[4])
                        marked += 1
            self._ready_seq += 1
        if marked:
            ANSWER_CACHE_INVALIDATIONS.labels("stylized_ready").inc(marked)

    def invalidate_users(self, users: list[str]) -> None:
        with self._lock:
            for user in users:
                self._changes[user] = self._changes.get(user, 0) + 1
                for key in self._by_user.pop(user, ()):
                    self._entries.pop(key, None)
        ANSWER_CACHE_INVALIDATIONS.labels("user").inc(len(users))

    def clear(self, reason: str) -> None:
        with self._lock:
            self._drop_all()
        ANSWER_CACHE_INVALIDATIONS.labels(reason).inc()

    def _sweep(self, now: float) -> None:
        """Drop expired answers and forget the change counters, once per lifetime: a shop's
        one-visit shoppers (never invalidated) would otherwise fill the cache to its bound, and
        the counters grow with every user scoring writes. A new epoch keeps the counters' guard:
        an answer started before the sweep is refused, not stored unchecked."""
        self._entries = {k: e for k, e in self._entries.items() if e[0] > now}
        self._by_user = {u: {k for k in ks if k in self._entries} for u, ks in self._by_user.items()}
        self._by_user = {u: ks for u, ks in self._by_user.items() if ks}
        self._pending_pairs = {p: {k for k in ks if k in self._entries} for p, ks in self._pending_pairs.items()}
        self._pending_pairs = {p: ks for p, ks in self._pending_pairs.items() if ks}
        self._changes = {}
        self._ready_at = {}
        self._epoch += 1
        self._sweep_at = now + max(self.ttl_s, 0.5)

    def _drop_all(self) -> None:
        self._epoch += 1
        self._entries = {}
        self._by_user = {}
        self._pending_pairs = {}

    def __len__(self) -> int:
        return len(self._entries)


class UserChangeListener:
    """Follows scoring's user-change messages and the style worker's stylized-ready messages, and
    keeps :attr:`AnswerCache.live` true only while subscribed and heard from (a dedicated
    connection: a subscribed connection cannot serve commands; its PINGs come back as ``pong``
    messages). ``on_stylized`` hears each stored (content, style) too (the stylized-state near
    cache forgets its PENDING, so the restyle reads the reference)."""

    def __init__(
        self,
        r: redis.Redis,
        cache: AnswerCache,
        retry_s: float = 1.0,
        on_stylized: Callable[[tuple[str, str]], None] | None = None,
    ) -> None:
        self.redis = r
        self.cache = cache
        self.retry_s = retry_s
        self.on_stylized = on_stylized
        self._stylized_channel = keys.stylized_ready_channel().encode()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="answer-invalidation", daemon=True)

    def start(self) -> UserChangeListener:
        if self.cache.enabled:
            self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            pubsub = self.redis.pubsub(ignore_subscribe_messages=False)
            try:
                pubsub.subscribe(keys.user_changes_channel(), keys.stylized_ready_channel())
                pinged = 0.0
                while not self._stop.is_set():
                    if time.monotonic() - pinged >= PING_S:
                        pubsub.ping()
                        pinged = time.monotonic()
                    msg = pubsub.get_message(timeout=PING_S)
                    if msg is None:
                        continue
                    kind = msg["type"]
                    if kind == "subscribe":
                        self.cache.clear("resubscribed")  # anything kept before may have missed a change
                        self.cache.heard()
                    elif kind == "message" and msg["channel"] == self._stylized_channel:
                        self._stylized(msg["data"])
                        self.cache.heard()
                    elif kind == "message":
                        data = msg["data"]
                        text = data.decode() if isinstance(data, bytes) else str(data)
                        self.cache.invalidate_users(text.split())
                        self.cache.heard()
                    elif kind == "pong":
                        self.cache.heard()
            except Exception as exc:
                log.warning("user-change subscription lost", extra={"error": f"{type(exc).__name__}: {exc}"})
            finally:
                self.cache.heard(subscribed=False)
                self.cache.clear("unsubscribed")
                with contextlib.suppress(Exception):  # closing a broken connection may fail again
                    pubsub.close()
            self._stop.wait(self.retry_s)

    def _stylized(self, data: bytes | str) -> None:
        try:
            content, style = json.loads(data)
            pair = (str(content), str(style))
        except (ValueError, TypeError):
            log.warning("unreadable stylized-ready message skipped")
            return
        if self.on_stylized is not None:
            self.on_stylized(pair)
        self.cache.stylized_ready([pair])

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5)
