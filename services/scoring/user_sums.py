"""Heavy shoppers' model scores kept between fold-ins, so a new event costs its new items only.

For a model whose score of a history is a sum of one row per item (binary EASE, models/base.py
``ItemSums``), a user's scores after an event are their previous scores plus the rows of the
items the event added: a view of an item already seen adds nothing. Recomputing the product over
the whole history instead costs one row per item the user ever touched, and under load a heavy
shopper reaches thousands of items within minutes; that product was the largest part of
scoring's time late in a `make load` soak and the reason freshness got worse as the soak went on
(docs/load.md).

An entry holds the integer sums and the ids of the history's first ``n`` items they cover. A
history is an insertion-ordered dict that only grows (InteractionState): an entry is used only
when the history it is asked about starts with exactly those ids, and then the items after them
are added. Anything else (another model version, a history that is not an extension: a test's
made-up one, a forgotten user) rebuilds the entry from the whole history. The sums are integers,
so an entry extended a thousand times holds exactly the sums of one product over the history.

Only histories of at least ``min_items`` items get an entry (short ones are cheap to score
whole), and at most ``max_users`` entries are kept, least recently used evicted: memory is
bounded by ``max_users`` x (5 bytes per catalog item + 8 per history item).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import islice

import numpy as np
import scipy.sparse as sp

from services.scoring import metrics
from services.scoring.models.base import ItemSums


@dataclass
class _Entry:
    version: str
    ids: tuple[str, ...]  # the history's first len(ids) items, in its order: what ``sums`` covers
    sums: np.ndarray  # int32 per catalog item
    seen: np.ndarray  # bool per catalog item: the model's items among ``ids``

    @property
    def nbytes(self) -> int:
        return self.sums.nbytes + self.seen.nbytes + 8 * len(self.ids)


@dataclass(frozen=True)
class UserScores:
    scores: np.ndarray  # float32 per catalog item (a new array the caller may change)
    seen: np.ndarray  # indices of the model's items in the history


class UserSums:
    """Thread-safe: the consumer, the archive sync and TopN requests share one instance."""

    def __init__(self, max_users: int, min_items: int) -> None:
        self.max_users = max_users
        self.min_items = min_items
        self._lock = threading.Lock()
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._bytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    def drop(self, user: str) -> None:
        """Forget a user's entry (their ids are personal data: a forgotten user keeps none here)."""
        with self._lock:
            entry = self._entries.pop(user, None)
            if entry is not None:
                self._bytes -= entry.nbytes

    def wants(self, history: Mapping[str, float]) -> bool:
        return self.max_users > 0 and len(history) >= self.min_items

    def scores(
        self,
        version: str,
        sums: ItemSums,
        item_index: Mapping[str, int],
        users: Sequence[str],
        histories: Mapping[str, Mapping[str, float]],
    ) -> dict[str, UserScores]:
        """Each user's scores over the model's items (those :meth:`wants`), from their entry."""
        out: dict[str, UserScores] = {}
        reused = built = 0
        with self._lock:
            for user in users:
                history = histories[user]
                entry = self._entries.get(user)
                n = len(entry.ids) if entry is not None else 0
                if (
                    entry is not None
                    and entry.version == version
                    and len(history) >= n
                    and tuple(islice(history, n)) == entry.ids
                ):
                    new = tuple(islice(history, n, None))
                    cols = [j for j in (item_index.get(i) for i in new) if j is not None]
                    if cols:
                        # Sums over any set of items stay in int32's range (models/base.py fixed_point).
                        entry.sums += sums.rows[cols].sum(axis=0, dtype=np.int32)
                        entry.seen[cols] = True
                    if new:
                        entry.ids += new
                        self._bytes += 8 * len(new)
                    self._entries.move_to_end(user)
                    reused += 1
                else:
                    old = self._entries.get(user)
                    self._bytes -= old.nbytes if old is not None else 0
                    entry = self._build(version, sums, item_index, history)
                    self._entries[user] = entry
                    self._bytes += entry.nbytes
                    self._entries.move_to_end(user)
                    built += 1
                out[user] = UserScores(sums.scores(entry.sums), np.flatnonzero(entry.seen))
            while len(self._entries) > self.max_users:
                self._bytes -= self._entries.popitem(last=False)[1].nbytes
            size, nbytes = len(self._entries), self._bytes
        metrics.USER_SUMS.labels("reused").inc(reused)
        metrics.USER_SUMS.labels("built").inc(built)
        metrics.USER_SUMS_USERS.set(size)
        metrics.USER_SUMS_BYTES.set(nbytes)
        return out

    @staticmethod
    def _build(version: str, sums: ItemSums, item_index: Mapping[str, int], history: Mapping[str, float]) -> _Entry:
        ids = tuple(history)
        cols = np.fromiter((j for j in (item_index.get(i) for i in ids) if j is not None), dtype=np.int32, count=-1)
        n_items = sums.rows.shape[0]
        # One sparse row times the matrix (no copy of the rows it adds), as the model's own score does.
        row = sp.csr_matrix(
            (np.ones(len(cols), dtype=np.int32), cols, np.array([0, len(cols)], dtype=np.int32)), shape=(1, n_items)
        )
        seen = np.zeros(n_items, dtype=bool)
        seen[cols] = True
        return _Entry(version, ids, np.asarray(row @ sums.rows, dtype=np.int32).ravel().copy(), seen)
