"""Time-decayed interaction state: item popularity and each user's recent items.

Decay is kept in log space against a fixed epoch: an interaction at time t adds
``w * 2**((t - EPOCH) / half_life)``, so scores never need rescaling as time
passes and the ranking equals that of ``w * 2**(-(now - t) / half_life)``.
"""

from __future__ import annotations

import math
import threading
from collections import defaultdict
from dataclasses import dataclass, field

EPOCH = 1_600_000_000.0  # 2020-09-13; any fixed instant works


@dataclass
class InteractionState:
    half_life_s: float
    item_score: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    user_items: dict[str, dict[str, float]] = field(default_factory=lambda: defaultdict(dict))
    lock: threading.Lock = field(default_factory=threading.Lock)

    def decay(self, ts: float) -> float:
        # Clamp the exponent: float overflow far in the future would poison scores.
        return math.pow(2.0, min(700.0, (ts - EPOCH) / self.half_life_s))

    def add(self, user: str, item: str, weight: float, ts: float) -> None:
        w = weight * self.decay(ts)
        with self.lock:
            self.item_score[item] += w
            items = self.user_items[user]
            items[item] = items.get(item, 0.0) + w

    def popular(self, k: int, exclude: set[str] | frozenset[str] = frozenset()) -> list[tuple[str, float]]:
        with self.lock:
            ranked = sorted(self.item_score.items(), key=lambda kv: (-kv[1], kv[0]))
        out = [(i, s) for i, s in ranked if i not in exclude]
        return out[:k]

    def seen(self, user: str) -> set[str]:
        with self.lock:
            return set(self.user_items.get(user, {}))
