"""EASE (Steck 2019): a closed-form item-item linear autoencoder, in torch, on the GPU if present.

B = argmin ||X - XB||² + λ||B||² with diag(B) = 0 has the closed form
P = (XᵀX + λI)⁻¹, B = -P / diag(P), diag(B) = 0. Scoring a user is ``x_u · B``, so
fold-in of a new event is a single sparse-row x matrix product — no retraining.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import scipy.sparse as sp
import torch

from services.scoring.models.base import Recommender, top_k_indices


def torch_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class EASE(Recommender):
    algorithm: ClassVar[str] = "ease"
    defaults: ClassVar[dict[str, Any]] = {"l2": 300.0, "binary": True}
    grid: ClassVar[list[dict[str, Any]]] = [{"l2": v} for v in (50.0, 100.0, 200.0, 300.0, 500.0, 800.0, 1500.0)]

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        self.B = np.zeros((0, 0), dtype=np.float32)

    def _input(self, X: sp.csr_matrix) -> sp.csr_matrix:
        return (X > 0).astype(np.float32) if self.params["binary"] else X.astype(np.float32)

    def fit(self, X: sp.csr_matrix) -> None:
        self.n_items = X.shape[1]
        dev = torch_device()
        Xi = self._input(X)
        # Gram matrix on the host in sparse form (cheap), the O(n³) part on the device. float32 is
        # enough: λ ≥ 50 on the diagonal keeps G well conditioned, and it halves the CPU time.
        G = torch.from_numpy(np.asarray((Xi.T @ Xi).todense(), dtype=np.float32)).to(dev)
        G.diagonal().add_(float(self.params["l2"]))
        L = torch.linalg.cholesky(G)
        P = torch.cholesky_inverse(L)
        B = -P / torch.diagonal(P)
        B.fill_diagonal_(0.0)
        # C order: scipy's sparse x dense product ravels its dense operand, and on the
        # Fortran-ordered array torch hands back that ravel copied the whole n² matrix on every
        # fold-in (46 ms per user on Online Retail's 3,665 items instead of 0.15 ms).
        self.B = np.ascontiguousarray(B.to(torch.float32).cpu().numpy())

    def score(self, rows: sp.csr_matrix) -> np.ndarray:
        return np.asarray(self._input(rows) @ self.B, dtype=np.float32)

    def similar_items(self, item: int, k: int) -> list[tuple[int, float]]:
        col = self.B[:, item].copy()
        col[item] = -np.inf
        idx = top_k_indices(col, k)
        return [(int(i), float(col[i])) for i in idx]

    def arrays(self) -> dict[str, np.ndarray]:
        return {"B": self.B}

    def load_arrays(self, arrays: dict[str, np.ndarray]) -> None:
        self.B = np.ascontiguousarray(arrays["B"], dtype=np.float32)
        self.n_items = self.B.shape[0]
