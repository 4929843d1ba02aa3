"""Popularity: the baseline every other model must beat, and the cold-start fallback."""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import scipy.sparse as sp

from services.scoring.models.base import Recommender


class Popularity(Recommender):
    """Score = total (already time-decayed) interaction strength of the item; the same for everyone."""

    algorithm: ClassVar[str] = "popularity"
    defaults: ClassVar[dict[str, Any]] = {"binary": True}
    grid: ClassVar[list[dict[str, Any]]] = []

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        self.pop = np.zeros(0, dtype=np.float32)

    def fit(self, X: sp.csr_matrix) -> None:
        self.n_items = X.shape[1]
        M = (X > 0).astype(np.float32) if self.params["binary"] else X
        self.pop = np.asarray(M.sum(axis=0)).ravel().astype(np.float32)

    def score(self, rows: sp.csr_matrix) -> np.ndarray:
        return np.broadcast_to(self.pop, (rows.shape[0], self.n_items)).copy()

    def similar_items(self, item: int, k: int) -> list[tuple[int, float]]:
        order = np.argsort(-self.pop, kind="stable")
        return [(int(i), float(self.pop[i])) for i in order[: k + 1] if i != item][:k]

    def arrays(self) -> dict[str, np.ndarray]:
        return {"pop": self.pop}

    def load_arrays(self, arrays: dict[str, np.ndarray]) -> None:
        self.pop = arrays["pop"]
        self.n_items = self.pop.shape[0]
