"""Bayesian Personalized Ranking (Rendle et al. 2009) through the `implicit` library."""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import scipy.sparse as sp
from implicit.cpu.bpr import BayesianPersonalizedRanking

from services.scoring.models.base import Recommender, similar_from_vectors


class BPR(Recommender):
    """implicit's BPR has no user recalculation, so fold-in optimises the BPR objective for the
    user's vector alone (item factors frozen): full-batch gradient ascent over the user's
    positives against sampled negatives. Deterministic (seeded) so replicas agree."""

    algorithm: ClassVar[str] = "bpr"
    defaults: ClassVar[dict[str, Any]] = {
        "factors": 64,
        "learning_rate": 0.05,
        "regularization": 0.01,
        "iterations": 100,
        "foldin_epochs": 60,
        "foldin_lr": 0.05,
        "seed": 42,
    }
    grid: ClassVar[list[dict[str, Any]]] = [
        {"factors": f, "learning_rate": lr, "regularization": r}
        for f in (64, 128)
        for lr in (0.01, 0.05)
        for r in (0.001, 0.01)
    ]

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        self.item_factors = np.zeros((0, 0), dtype=np.float32)

    def fit(self, X: sp.csr_matrix) -> None:
        self.n_items = X.shape[1]
        p = self.params
        model = BayesianPersonalizedRanking(
            factors=int(p["factors"]),
            learning_rate=float(p["learning_rate"]),
            regularization=float(p["regularization"]),
            iterations=int(p["iterations"]),
            random_state=int(p["seed"]),
        )
        model.fit((X > 0).astype(np.float32).tocsr(), show_progress=False)
        self.item_factors = np.asarray(model.item_factors, dtype=np.float32)

    def score(self, rows: sp.csr_matrix) -> np.ndarray:
        V = self.item_factors[:, :-1]
        bias = self.item_factors[:, -1]
        users = bpr_fold_in(
            V,
            bias,
            (rows > 0).astype(np.float32).tocsr(),
            epochs=int(self.params["foldin_epochs"]),
            lr=float(self.params["foldin_lr"]),
            reg=float(self.params["regularization"]),
            seed=int(self.params["seed"]),
        )
        return np.asarray(users @ V.T + bias, dtype=np.float32)

    def similar_items(self, item: int, k: int) -> list[tuple[int, float]]:
        return similar_from_vectors(self.item_factors[:, :-1], item, k)

    def arrays(self) -> dict[str, np.ndarray]:
        return {"item_factors": self.item_factors}

    def load_arrays(self, arrays: dict[str, np.ndarray]) -> None:
        self.item_factors = arrays["item_factors"].astype(np.float32)
        self.n_items = self.item_factors.shape[0]


def bpr_fold_in(
    V: np.ndarray, bias: np.ndarray, rows: sp.csr_matrix, epochs: int, lr: float, reg: float, seed: int
) -> np.ndarray:
    """Per row: maximise Σ log sigmoid(u·(v_i - v_j) + b_i - b_j) - reg·|u|² over u, items fixed."""
    n_items, f = V.shape
    out = np.zeros((rows.shape[0], f), dtype=np.float32)
    for r in range(rows.shape[0]):
        pos = rows.indices[rows.indptr[r] : rows.indptr[r + 1]]
        if pos.size == 0:
            continue
        rng = np.random.default_rng(seed)
        u = np.zeros(f, dtype=np.float32)
        is_pos = np.zeros(n_items, dtype=bool)
        is_pos[pos] = True
        Vp, bp = V[pos], bias[pos]
        for _ in range(epochs):
            neg = rng.integers(0, n_items, size=pos.size)
            keep = ~is_pos[neg]
            if not keep.any():
                continue
            d = Vp[keep] - V[neg[keep]]
            x = d @ u + (bp[keep] - bias[neg[keep]])
            g = (1.0 / (1.0 + np.exp(x)))[:, None] * d
            u += lr * (g.mean(axis=0) * 10.0 - reg * u)
        out[r] = u
    return out
