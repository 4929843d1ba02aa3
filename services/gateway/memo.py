"""Content-addressed, bounded memo of what the gateway derives from a Redis reply.

WHY: an answer's single Lua read returns the user's raw profile hash and recs hash; turning
them into a :class:`~services.gateway.style.StyleProfile` (vector decode + normalization) and a
sorted ``[(item, score)]`` list (50 floats parsed, ids decoded, a sort) cost ~10% of the
gateway's GIL time per answer (py-spy, docs/gateway.md). Both depend only on the reply's
bytes, so the memo is keyed by the raw reply itself (``tuple`` of the flat HGETALL): a changed
hash is a different key, so a hit can never serve stale data, whatever the writer does with
``updated_at``. Bounded LRU; ``stylerec_gateway_parse_memo_total{kind,result}`` is its hit rate.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

from services.gateway.metrics import PARSE_MEMO

V = TypeVar("V")


class ParseMemo(Generic[V]):
    """``get(key, parse)``: the memoized ``parse()`` for ``key``; at most ``max_entries`` kept (LRU)."""

    def __init__(self, kind: str, max_entries: int) -> None:
        self.max_entries = max_entries
        self._entries: OrderedDict[Hashable, V] = OrderedDict()
        self._lock = threading.Lock()
        self._hit = PARSE_MEMO.labels(kind, "hit")
        self._miss = PARSE_MEMO.labels(kind, "miss")

    def get(self, key: Hashable, parse: Callable[[], V]) -> V:
        if self.max_entries <= 0:
            return parse()
        with self._lock:
            try:
                value = self._entries[key]
            except KeyError:
                pass
            else:
                self._entries.move_to_end(key)
                self._hit.inc()
                return value
        value = parse()
        self._miss.inc()
        with self._lock:
            self._entries[key] = value
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)
        return value

    def __len__(self) -> int:
        return len(self._entries)
