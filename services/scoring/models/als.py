"""Implicit ALS (Hu, Koren, Volinsky 2008) through the `implicit` library."""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import scipy.sparse as sp
from implicit.cpu.als import AlternatingLeastSquares
from threadpoolctl import threadpool_limits

from services.scoring.models.base import Recommender, similar_from_vectors


class ALS(Recommender):
    """Fold-in is implicit's own ``recalculate_user``: the exact ALS user step for the new row."""

    algorithm: ClassVar[str] = "als"
    defaults: ClassVar[dict[str, Any]] = {
        "factors": 64,
        "regularization": 0.05,
        "alpha": 2.0,
        "iterations": 15,
        "seed": 42,
    }
    grid: ClassVar[list[dict[str, Any]]] = [
        {"factors": f, "regularization": r, "alpha": a} for f in (64, 128) for r in (0.05, 1.0) for a in (1.0, 5.0)
    ]

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        self.model = self._new()

    def _new(self) -> AlternatingLeastSquares:
        p = self.params
        # implicit parallelises itself; a threaded BLAS underneath only oversubscribes the cores
        # (and implicit warns about it when the model is built).
        with threadpool_limits(1, "blas"):
            return self._build(p)

    @staticmethod
    def _build(p: dict[str, Any]) -> AlternatingLeastSquares:
        return AlternatingLeastSquares(
            factors=int(p["factors"]),
            regularization=float(p["regularization"]),
            alpha=float(p["alpha"]),
            iterations=int(p["iterations"]),
            random_state=int(p["seed"]),
            calculate_training_loss=False,
        )

    def fit(self, X: sp.csr_matrix) -> None:
        self.n_items = X.shape[1]
        self.model = self._new()
        with threadpool_limits(1, "blas"):
            self.model.fit(X.astype(np.float32).tocsr(), show_progress=False)

    def score(self, rows: sp.csr_matrix) -> np.ndarray:
        if rows.shape[0] == 0:
            return np.zeros((0, self.n_items), dtype=np.float32)
        users = self.model.recalculate_user(np.arange(rows.shape[0]), rows.astype(np.float32).tocsr())
        users = np.atleast_2d(users)
        return np.asarray(users @ self.model.item_factors.T, dtype=np.float32)

    def similar_items(self, item: int, k: int) -> list[tuple[int, float]]:
        return similar_from_vectors(np.asarray(self.model.item_factors), item, k)

    def arrays(self) -> dict[str, np.ndarray]:
        return {"item_factors": np.asarray(self.model.item_factors)}

    def load_arrays(self, arrays: dict[str, np.ndarray]) -> None:
        self.model = self._new()
        self.model.item_factors = arrays["item_factors"].astype(np.float32)
        self.n_items = self.model.item_factors.shape[0]
