"""`history`: the shopper's own items again, by time-decayed count, then popular items.

The baseline every repeat-aware model must beat (Li et al., "A Next Basket Recommendation
Reality Check", 2023: on purchase data the user's own frequent items are hard to beat). Its
score needs *when* each interaction happened, which a count matrix does not carry: the caller
hands it history rows whose values are already decayed (:func:`decayed_rows` offline, the
interaction state's decayed weights in serving). The half-life is a parameter so that the
evaluation can tune it on the validation split; serving decays with its own settings.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import scipy.sparse as sp

from services.scoring.models.base import Recommender

DAY_S = 86400.0
# Seen items score in (1, 2], unseen ones by popularity in [0, 1): every seen item outranks every
# unseen one, and popularity only orders the tail (and breaks ties among seen items below).
SEEN_OFFSET = 1.0
TIE_BREAK = 1e-4


def decayed_rows(
    users: np.ndarray, items: np.ndarray, ts: np.ndarray, n_users: int, n_items: int, half_life_s: float, t_ref: float
) -> sp.csr_matrix:
    """users x items CSR of Σ 2^(-(t_ref - t)/half_life) over each pair's interactions."""
    age = np.maximum(t_ref - ts.astype(np.float64), 0.0)
    w = np.exp2(-age / half_life_s) if np.isfinite(half_life_s) else np.ones(age.shape)
    # Decay to exactly 0 would make an old interaction vanish from the row: floor it.
    w = np.maximum(w, 1e-12).astype(np.float64)
    X = sp.csr_matrix((w, (users, items)), shape=(n_users, n_items))
    X.sum_duplicates()
    return X


def popularity_rank_score(pop: np.ndarray) -> np.ndarray:
    """Popularity mapped into [0, 1) with ties kept (rank-free, so order = popularity order)."""
    top = float(pop.max()) if pop.size else 0.0
    return (pop / (top * (1.0 + 1e-6))).astype(np.float32) if top > 0 else np.zeros_like(pop, dtype=np.float32)


def history_scores(hist: sp.csr_matrix, pop_score: np.ndarray) -> np.ndarray:
    """Dense scores: seen items 1 + their weight / the row's largest (plus a popularity tie-break),
    every other item its popularity score in [0, 1)."""
    n_rows = hist.shape[0]
    out = np.broadcast_to(pop_score, (n_rows, pop_score.shape[0])).copy()
    if hist.nnz == 0:
        return out
    h = hist.tocsr().astype(np.float64)
    row_of = np.repeat(np.arange(n_rows), np.diff(h.indptr))
    row_max = np.zeros(n_rows)
    np.maximum.at(row_max, row_of, h.data)
    rel = h.data / np.maximum(row_max[row_of], 1e-300)
    out[row_of, h.indices] = (SEEN_OFFSET + rel + TIE_BREAK * pop_score[h.indices]).astype(np.float32)
    return out


class History(Recommender):
    """Score = the history row itself (already decayed by the caller), popularity for the rest."""

    algorithm: ClassVar[str] = "history"
    defaults: ClassVar[dict[str, Any]] = {"half_life_days": 30.0}
    grid: ClassVar[list[dict[str, Any]]] = [{"half_life_days": v} for v in (3.0, 7.0, 14.0, 30.0, 60.0, 120.0, 365.0)]
    # Rows must carry decayed weights (see module docstring), not counts.
    uses_time: ClassVar[bool] = True

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        self.pop = np.zeros(0, dtype=np.float32)

    def fit(self, X: sp.csr_matrix) -> None:
        self.n_items = X.shape[1]
        self.pop = np.asarray((X > 0).astype(np.float32).sum(axis=0)).ravel().astype(np.float32)

    def score(self, rows: sp.csr_matrix) -> np.ndarray:
        return history_scores(rows, popularity_rank_score(self.pop))

    def similar_items(self, item: int, k: int) -> list[tuple[int, float]]:
        order = np.argsort(-self.pop, kind="stable")
        return [(int(i), float(self.pop[i])) for i in order[: k + 1] if i != item][:k]

    def arrays(self) -> dict[str, np.ndarray]:
        return {"pop": self.pop}

    def load_arrays(self, arrays: dict[str, np.ndarray]) -> None:
        self.pop = arrays["pop"]
        self.n_items = self.pop.shape[0]
