"""Item-item neighbours: cosine similarity over co-interactions, top-k neighbours per item."""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import scipy.sparse as sp

from services.scoring.models.base import Recommender


class ItemKNN(Recommender):
    """Classic item-based CF (Sarwar et al. 2001): score(u, j) = Σ_i x_ui · sim(i, j).

    Keeping only the ``neighbors`` strongest similarities per item bounds memory and
    removes the long tail of noisy co-occurrences; ``shrink`` damps similarities
    estimated from few co-occurrences.
    """

    algorithm: ClassVar[str] = "itemknn"
    defaults: ClassVar[dict[str, Any]] = {"neighbors": 100, "shrink": 10.0}
    grid: ClassVar[list[dict[str, Any]]] = [{"neighbors": k, "shrink": s} for k in (50, 200) for s in (0.0, 10.0)]

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        self.sim = sp.csr_matrix((0, 0), dtype=np.float32)

    def fit(self, X: sp.csr_matrix) -> None:
        self.n_items = X.shape[1]
        B = (X > 0).astype(np.float32).tocsc()
        norms = np.sqrt(np.asarray(B.sum(axis=0)).ravel()) + 1e-9
        co = (B.T @ B).tocsr().astype(np.float32)
        co.setdiag(0)
        co.eliminate_zeros()
        coo = co.tocoo()
        shrink = float(self.params["shrink"])
        vals = coo.data / (norms[coo.row] * norms[coo.col] + shrink)
        S = sp.csr_matrix((vals.astype(np.float32), (coo.row, coo.col)), shape=co.shape)
        self.sim = _prune_rows(S, int(self.params["neighbors"]))

    def score(self, rows: sp.csr_matrix) -> np.ndarray:
        return np.asarray((rows.astype(np.float32) @ self.sim).todense(), dtype=np.float32)

    def similar_items(self, item: int, k: int) -> list[tuple[int, float]]:
        row = self.sim.getrow(item)
        order = np.argsort(-row.data, kind="stable")[:k]
        return [(int(row.indices[i]), float(row.data[i])) for i in order]

    def arrays(self) -> dict[str, np.ndarray]:
        s = self.sim
        return {"data": s.data, "indices": s.indices, "indptr": s.indptr, "shape": np.array(s.shape)}

    def load_arrays(self, arrays: dict[str, np.ndarray]) -> None:
        shape = tuple(int(x) for x in arrays["shape"])
        self.sim = sp.csr_matrix((arrays["data"], arrays["indices"], arrays["indptr"]), shape=shape)
        self.n_items = shape[1]


def _prune_rows(S: sp.csr_matrix, k: int) -> sp.csr_matrix:
    """Keep the k largest entries of each row."""
    data, indices, indptr = [], [], [0]
    for r in range(S.shape[0]):
        s, e = S.indptr[r], S.indptr[r + 1]
        d, i = S.data[s:e], S.indices[s:e]
        if e - s > k:
            keep = np.argpartition(-d, k - 1)[:k]
            d, i = d[keep], i[keep]
        data.append(d)
        indices.append(i)
        indptr.append(indptr[-1] + len(d))
    return sp.csr_matrix(
        (
            np.concatenate(data) if data else np.zeros(0, np.float32),
            np.concatenate(indices) if indices else np.zeros(0, np.int32),
            np.array(indptr),
        ),
        shape=S.shape,
    )
