"""Interaction state: every user's time-decayed, type-weighted interactions, built from events.

State is a pure function of the *set* of events applied (deduplicated by event id, and
addition commutes), so a replica rebuilt from the MongoDB archive, a replica that also
consumed the same events from Kafka, and a replica that got them in another order all
converge to the same numbers.

Decay is kept against a fixed epoch: an event at time t adds ``w * 2**((t - EPOCH)/h)``.
Nothing ever needs rescaling as time passes; :meth:`InteractionState.scale` converts the
stored sums to "weight as of a reference time" (``w * 2**(-(ref - t)/h)``) when read.
"""

from __future__ import annotations

import math
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

EPOCH = 1_600_000_000.0  # 2020-09-13; any fixed instant works
MAX_EXP = 700.0  # 2**700 is still a finite double; clamp so far-future timestamps cannot overflow


@dataclass(frozen=True)
class EventRecord:
    event_id: str
    user_id: str
    item_id: str
    type: int
    ts: float
    # When the archiver wrote it (its clock), for events read back from the archive; 0 otherwise.
    archived_at: float = 0.0


class AppliedIds:
    """Which events were applied (deduplication), in memory that stays bounded under a stream.

    Why not a set of every id: it grew by ~100 bytes per event for the life of the process
    (hundreds of MiB after a few million events) and was then ``clear()``-ed, after which every
    event the archive sync re-read (it re-reads a whole window each tick) counted twice.

    What is kept: every id applied within the last ``protect_s`` seconds of wall time, and every
    id whose event time is within ``protect_s`` of the newest event (``watermark``). Those are all
    the ids the archive sync can read again (it tails by event time and by archive time, each with
    the archive slack, so ``protect_s`` must be at least the slack). Beyond ``capacity`` ids, the
    oldest-applied ids outside that window are dropped; a duplicate of one of those (a Kafka
    replay or a full archive re-read of something applied more than ``capacity`` events ago)
    would count again, the same residual risk the old set had at its cap, minus the cliff.

    Representation: ids are stored by their 64-bit ``hash()`` (per process; the state is never
    persisted), ~16 bytes per id in sorted numpy arrays, with the newest ids in a small dict that
    is merged into the arrays every ``hot_size`` ids. Two different ids of the same hash would be
    taken for one: with 5 million ids kept that is a chance of about 3e-13 per event.
    """

    def __init__(self, capacity: int, protect_s: float, hot_size: int = 32_768) -> None:
        self.capacity = capacity
        self.protect_s = protect_s
        self.hot_size = hot_size
        self._hot: dict[int, int] = {}  # hash -> event second (since EPOCH, clamped to int32)
        self._keys = np.empty(0, dtype=np.int64)  # sorted hashes of merged ids
        self._secs = np.empty(0, dtype=np.int32)  # their event seconds
        self._gens = np.empty(0, dtype=np.int32)  # the merge (generation) that brought them in
        self._gen = 0
        self._gen_merged_at: dict[int, float] = {}  # generation -> wall time of its merge

    def __len__(self) -> int:
        return len(self._hot) + len(self._keys)

    def __contains__(self, event_id: str) -> bool:
        h = hash(event_id)
        if h in self._hot:
            return True
        keys = self._keys
        i = int(keys.searchsorted(h))
        return i < len(keys) and int(keys[i]) == h

    def add(self, event_id: str, ts: float, watermark: float, now: float | None = None) -> None:
        """Record an id (the caller checked it is not in yet); ``watermark`` = newest event time."""
        self._hot[hash(event_id)] = _event_second(ts)
        if len(self._hot) >= self.hot_size:
            self._merge(watermark, time.time() if now is None else now)

    def _merge(self, watermark: float, now: float) -> None:
        hk = np.fromiter(self._hot.keys(), dtype=np.int64, count=len(self._hot))
        hs = np.fromiter(self._hot.values(), dtype=np.int32, count=len(self._hot))
        self._hot = {}
        order = np.argsort(hk)
        hk, hs = hk[order], hs[order]
        pos = self._keys.searchsorted(hk)
        self._keys = np.insert(self._keys, pos, hk)
        self._secs = np.insert(self._secs, pos, hs)
        self._gens = np.insert(self._gens, pos, np.full(len(hk), self._gen, dtype=np.int32))
        self._gen_merged_at[self._gen] = now
        self._gen += 1
        if len(self._keys) > self.capacity:
            self._evict(watermark, now)

    def _evict(self, watermark: float, now: float) -> None:
        excess = len(self._keys) - self.capacity
        old_gens = [g for g, at in self._gen_merged_at.items() if at < now - self.protect_s]
        if not old_gens:
            return
        newest_old = max(old_gens)
        droppable = (self._gens <= newest_old) & (self._secs < _event_second(watermark - self.protect_s))
        if not droppable.any():
            return
        # Oldest generations first, just enough of them to get back under capacity.
        counts = np.bincount(self._gens[droppable], minlength=newest_old + 1)
        cut = int(np.searchsorted(np.cumsum(counts), excess))
        drop = droppable & (self._gens <= min(cut, newest_old))
        keep = ~drop
        self._keys, self._secs, self._gens = self._keys[keep], self._secs[keep], self._gens[keep]
        live = set(np.unique(self._gens).tolist())
        self._gen_merged_at = {g: at for g, at in self._gen_merged_at.items() if g in live}


def _event_second(ts: float) -> int:
    """Event time as whole seconds since EPOCH in int32 range (floor, so "older than" stays safe)."""
    return int(max(-(2**31), min(2**31 - 1, math.floor(ts - EPOCH))))


class InteractionState:
    """Thread-safe; the consumer thread writes while gRPC threads read."""

    def __init__(
        self,
        weights: dict[int, float],
        half_life_s: float,
        max_event_ids: int = 5_000_000,
        id_window_s: float = 3600.0,
        repeat_half_lives_s: dict[int, float] | None = None,
    ) -> None:
        """``id_window_s``: how long (wall time, and event time behind the newest event) applied
        ids are kept whatever ``max_event_ids`` says; at least the archive sync's slack."""
        self.weights = weights
        self.half_life_s = half_life_s
        self.max_event_ids = max_event_ids
        self._lock = threading.Lock()
        self._applied = AppliedIds(max_event_ids, id_window_s)
        self._user_items: dict[str, dict[str, float]] = defaultdict(dict)
        self._item_score: dict[str, float] = defaultdict(float)
        self._item_last_ts: dict[str, float] = {}
        self._user_events: dict[str, int] = defaultdict(int)
        self._pairs = 0  # (user, item) entries in _user_items: the state's size, for the gauge
        # user -> (their event count, model version) when this process last wrote their Redis output.
        self._written: dict[str, tuple[int, str]] = {}
        self.watermark = 0.0  # newest event timestamp applied
        self.events = 0
        # Items by stored popularity, best first (ties by id): rebuilt lazily after a change, so a
        # batch of fold-ins sorts the catalog once instead of once per user (it was 95% of a
        # user's fold-in time with a C-ordered EASE matrix: 2.3 of 2.4 ms on Online Retail).
        self._ranking: list[tuple[str, float]] | None = None
        # Users whose events are never applied (the suppression list of forgotten users).
        self.exclude: Callable[[str], bool] | None = None
        # Called with each forgotten user (after the lock is released): what else keeps per-user
        # data in process (the fold-in's kept score sums) drops it too.
        self.forget_hooks: list[Callable[[str], None]] = []
        # Rebuy history (repeat_policy decay only): per event type its own half-life, so a purchase
        # and a view fade differently. Each pair keeps [count, latest ts, then per half-life class
        # (value, as-of ts)]: exact decay for any half-life, where the fixed-epoch growth trick of
        # _user_items would overflow (a 7-day half-life passes 2**700 within 14 years of EPOCH).
        self.repeat_classes: list[float] = sorted(set((repeat_half_lives_s or {}).values()))
        self._repeat_class_of = {t: self.repeat_classes.index(h) for t, h in (repeat_half_lives_s or {}).items()}
        self._repeat: dict[str, dict[str, list[float]]] = defaultdict(dict)

    # ---------- writing ----------
    def _growth(self, ts: float) -> float:
        return math.pow(2.0, min(MAX_EXP, (ts - EPOCH) / self.half_life_s))

    def apply(self, ev: EventRecord) -> bool:
        """Add one event; False when its id was already applied (replays, archive + Kafka overlap)."""
        return self.apply_many([ev])[0]

    def apply_many(self, events: Sequence[EventRecord]) -> list[bool]:
        """Add a batch under one lock acquisition; per event, False when its id was already applied.

        One acquisition per batch and not per event: the consumer, the archive sync and the gRPC
        readers share this lock, and per-event locking made them hand it over thousands of times
        a second under load.
        """
        exclude = self.exclude
        out = [False] * len(events)
        weighted = [
            (n, ev, self.weights.get(ev.type, 0.0) * self._growth(ev.ts))
            for n, ev in enumerate(events)
            if exclude is None or not exclude(ev.user_id)
        ]
        with self._lock:
            for n, ev, w in weighted:
                if ev.event_id in self._applied:
                    continue
                self._applied.add(ev.event_id, ev.ts, max(self.watermark, ev.ts))
                # Interned: every (user, item) pair keeps its own key, and without this each pair
                # held its own copy of the item id decoded from its first event.
                user, item = sys.intern(ev.user_id), sys.intern(ev.item_id)
                items = self._user_items[user]
                old = items.get(item)
                if old is None:
                    self._pairs += 1
                items[item] = (old or 0.0) + w
                self._item_score[item] += w
                self._item_last_ts[item] = max(ev.ts, self._item_last_ts.get(item, 0.0))
                if self.repeat_classes:
                    self._add_repeat(user, item, ev)
                self._user_events[user] += 1
                self.watermark = max(self.watermark, ev.ts)
                self.events += 1
                out[n] = True
            if any(out):
                self._ranking = None
        return out

    def _add_repeat(self, user: str, item: str, ev: EventRecord) -> None:
        """Fold one event into the pair's rebuy record (caller holds the lock)."""
        c = self._repeat_class_of.get(ev.type)
        rec = self._repeat[user].get(item)
        if rec is None:
            rec = self._repeat[user][item] = [0.0, ev.ts] + [0.0, ev.ts] * len(self.repeat_classes)
        rec[0] += 1.0
        rec[1] = max(rec[1], ev.ts)
        if c is None:
            return
        w = self.weights.get(ev.type, 0.0)
        hl = self.repeat_classes[c]
        v, t = rec[2 + 2 * c], rec[3 + 2 * c]
        if ev.ts >= t:
            rec[2 + 2 * c] = v * math.pow(2.0, -(ev.ts - t) / hl) + w
            rec[3 + 2 * c] = ev.ts
        else:
            rec[2 + 2 * c] = v + w * math.pow(2.0, -(t - ev.ts) / hl)

    def repeat_histories(
        self, users: Sequence[str], item_index: dict[str, int], now: float | None = None
    ) -> tuple[sp.csr_matrix, sp.csr_matrix, sp.csr_matrix, np.ndarray, np.ndarray]:
        """Rebuy inputs of a batch over a model's items: counts, decayed weights and days since the
        latest event (+1) per pair (one sparsity for all three), and per user their rebuy rate
        (1 - distinct items / events) and distinct items. Decay is as of the newest event applied,
        like :meth:`scale`, so replicas agree."""
        ref = now if now is not None else (self.watermark if self.watermark > 0 else time.time())
        classes = self.repeat_classes
        width = 2 + 2 * len(classes)
        items: list[str] = []
        records: list[list[float]] = []
        per_user = np.zeros(len(users), dtype=np.int64)
        events = np.zeros(len(users))
        distinct = np.zeros(len(users))
        with self._lock:
            for r, user in enumerate(users):
                events[r] = self._user_events.get(user, 0)
                distinct[r] = len(self._user_items.get(user, ()))
                pairs = self._repeat.get(user)
                if pairs:
                    items.extend(pairs)
                    records.extend(pairs.values())
                    per_user[r] = len(pairs)
            # Copied into one array while the lock is held: the records are updated in place.
            R = np.array(records, dtype=np.float64).reshape(len(records), width)
        cols = np.fromiter((item_index.get(i, -1) for i in items), dtype=np.int64, count=len(items))
        rows = np.repeat(np.arange(len(users)), per_user)
        known = cols >= 0
        rows, cols, R = rows[known], cols[known], R[known]
        decayed = np.zeros(len(cols))
        for c, hl in enumerate(classes):
            age = np.maximum(ref - R[:, 3 + 2 * c], 0.0)
            decayed += R[:, 2 + 2 * c] * np.exp2(-age / hl)
        # An interaction decayed below resolution is still one: keep it visible.
        decayed = np.maximum(decayed, 1e-12)
        age_days = np.maximum(ref - R[:, 1], 0.0) / 86400.0 + 1.0
        shape = (len(users), len(item_index))
        ind = cols.astype(np.int32)
        ptr = np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=len(users)))]).astype(np.int32)

        def csr(data: np.ndarray) -> sp.csr_matrix:
            return sp.csr_matrix((np.asarray(data, dtype=np.float64), ind, ptr), shape=shape)

        rates = np.where(events > 0, 1.0 - distinct / np.maximum(events, 1.0), 0.0)
        return csr(R[:, 0]), csr(decayed), csr(age_days), rates, distinct

    def forget(self, user: str) -> int:
        """Drop a user's row and take their weight out of item popularity; returns their event count.

        An item only this user touched leaves the state entirely (its score would otherwise be a
        rounding residue). Event ids stay in the applied set: they carry no user, and keeping them
        makes a replayed event of the user a duplicate even before the suppression list is loaded.
        """
        try:
            return self._forget(user)
        finally:
            for hook in self.forget_hooks:
                hook(user)

    def _forget(self, user: str) -> int:
        with self._lock:
            items = self._user_items.pop(user, None)
            self._repeat.pop(user, None)
            n = self._user_events.pop(user, 0)
            self._written.pop(user, None)
            if items is None:
                return 0
            self._pairs -= len(items)
            for item, w in items.items():
                old = self._item_score.get(item, 0.0)
                left = old - w
                if left <= old * 1e-9:
                    self._item_score.pop(item, None)
                    self._item_last_ts.pop(item, None)
                else:
                    self._item_score[item] = left
            self.events -= n
            self._ranking = None
            return n

    # ---------- what Redis already reflects ----------
    def write_marks(self, users: Iterable[str], model_version: str) -> dict[str, tuple[int, str]]:
        """Each user's mark as of now; taken before their output is computed, so an event applied
        meanwhile leaves the mark behind the state (and the user is written again: the safe side)."""
        with self._lock:
            return {u: (self._user_events.get(u, 0), model_version) for u in users}

    def mark_written(self, marks: dict[str, tuple[int, str]]) -> None:
        with self._lock:
            self._written.update({u: m for u, m in marks.items() if u in self._user_events})

    def needs_write(self, user: str, model_version: str) -> bool:
        """False when this process already wrote ``user``'s output from their current state and
        this model: a duplicate event of theirs then changes nothing in Redis. True after a
        restart (nothing written yet), which is what makes a crash replay rewrite Redis."""
        with self._lock:
            return self._written.get(user) != (self._user_events.get(user, 0), model_version)

    def apply_all(self, events: Iterable[EventRecord], chunk: int = 2000) -> int:
        """Apply a (possibly streamed) sequence in chunks; returns how many were new."""
        n = 0
        buf: list[EventRecord] = []
        for ev in events:
            buf.append(ev)
            if len(buf) >= chunk:
                n += sum(self.apply_many(buf))
                buf = []
        return n + sum(self.apply_many(buf))

    # ---------- reading ----------
    def scale(self, now: float | None = None) -> float:
        """Multiply stored sums by this to get weights as of ``now``.

        The default reference time is the newest event applied, not the wall clock: values
        then depend only on the event set (replicas agree exactly), and replaying a
        historical data set does not decay everything to zero.
        """
        if now is None:
            now = self.watermark if self.watermark > 0 else time.time()
        return math.pow(2.0, -min(MAX_EXP, (now - EPOCH) / self.half_life_s))

    def history(self, user: str, now: float | None = None) -> dict[str, float]:
        """The user's items with their decayed weight as of ``now``."""
        s = self.scale(now)
        with self._lock:
            return {i: w * s for i, w in self._user_items.get(user, {}).items()}

    def histories(self, users: Iterable[str], now: float | None = None) -> dict[str, dict[str, float]]:
        """:meth:`history` of many users under one lock acquisition (one scale for all of them)."""
        s = self.scale(now)
        with self._lock:
            return {u: {i: w * s for i, w in self._user_items.get(u, {}).items()} for u in users}

    def seen(self, user: str) -> set[str]:
        with self._lock:
            return set(self._user_items.get(user, {}))

    def stored_histories(
        self, users: Iterable[str], now: float | None = None
    ) -> tuple[dict[str, dict[str, float]], float]:
        """:meth:`histories` as the stored sums and the one factor that decays them (:meth:`scale`):
        a dict copy is done in C, where multiplying every weight took a Python loop over each
        user's whole history on every fold-in, and most readers need the items, not the weights
        (the fold-in multiplies the few it uses, with the same float product)."""
        s = self.scale(now)
        with self._lock:
            return {u: dict(self._user_items.get(u, {})) for u in users}, s

    def items_of(self, users: Iterable[str]) -> set[str]:
        """Every item any of ``users`` interacted with: one union in C, not a loop per item."""
        with self._lock:
            return set().union(*(self._user_items.get(u, ()) for u in users))

    def knows(self, user: str) -> bool:
        with self._lock:
            return bool(self._user_items.get(user))

    def users(self) -> list[str]:
        with self._lock:
            return list(self._user_items)

    def items(self) -> list[str]:
        with self._lock:
            return list(self._item_score)

    @property
    def n_users(self) -> int:
        return len(self._user_items)

    @property
    def n_items(self) -> int:
        return len(self._item_score)

    @property
    def n_pairs(self) -> int:
        return self._pairs

    @property
    def n_applied_ids(self) -> int:
        return len(self._applied)

    def popular(
        self,
        k: int,
        exclude: set[str] | frozenset[str] = frozenset(),
        only: set[str] | None = None,
        now: float | None = None,
    ) -> list[tuple[str, float]]:
        """Top-k items by decayed popularity (ties by id, so every replica ranks identically)."""
        s = self.scale(now)
        out: list[tuple[str, float]] = []
        for item, score in self.ranking():
            if item in exclude or (only is not None and item not in only):
                continue
            out.append((item, score * s))
            if len(out) >= k:
                break
        return out

    def ranking(self) -> list[tuple[str, float]]:
        """Every item with its stored (undecayed) popularity, best first, ties by id.

        Shared, do not mutate: the list is cached until the next applied event or forget.
        Stored sums and decayed ones rank identically (one common factor), so the cache does not
        depend on the reference time.
        """
        with self._lock:
            ranked = self._ranking
            if ranked is None:
                ranked = sorted(self._item_score.items(), key=lambda kv: (-kv[1], kv[0]))
                self._ranking = ranked
            return ranked

    def ranked_among(self, keep: Callable[[str], bool]) -> list[tuple[str, float]]:
        """The :meth:`ranking` of the items ``keep`` accepts, without sorting the rest: the fold-in
        asks for the few items its model does not know once per batch, and a full sort of the
        catalog after every applied batch cost more than the batch's matrix product."""
        with self._lock:
            ranked = self._ranking
            if ranked is None:
                chosen = [(i, v) for i, v in self._item_score.items() if keep(i)]
                return sorted(chosen, key=lambda kv: (-kv[1], kv[0]))
        return [(i, v) for i, v in ranked if keep(i)]

    def matrix(
        self, item_index: dict[str, int] | None = None, users: Sequence[str] | None = None, now: float | None = None
    ) -> tuple[sp.csr_matrix, list[str], list[str]]:
        """users x items CSR of ``log1p(decayed weight)`` plus the row/column ids.

        log1p keeps one heavy purchaser from dominating an item's column while still
        ranking a purchase above a view.
        """
        s = self.scale(now)
        with self._lock:
            user_list = list(users) if users is not None else list(self._user_items)
            if item_index is None:
                item_ids = sorted(self._item_score)
                item_index = {it: j for j, it in enumerate(item_ids)}
            else:
                item_ids = [""] * len(item_index)
                for it, j in item_index.items():
                    item_ids[j] = it
            rows: list[int] = []
            cols: list[int] = []
            vals: list[float] = []
            for r, user in enumerate(user_list):
                for item, w in self._user_items.get(user, {}).items():
                    col = item_index.get(item)
                    if col is not None:
                        rows.append(r)
                        cols.append(col)
                        vals.append(w * s)
        # Floor: an interaction decayed below float32 resolution is still an interaction.
        data = np.maximum(np.log1p(np.asarray(vals, dtype=np.float64)), 1e-6).astype(np.float32)
        X = sp.csr_matrix((data, (rows, cols)), shape=(len(user_list), len(item_index)), dtype=np.float32)
        return X, user_list, item_ids
