"""The one interface every recommender implements, and its (de)serialisation.

Serving never needs a user index: every model scores from a user's *history row*
(a CSR row over the model's item index). That is what makes fold-in uniform — a new
event changes the row, the row is re-scored, done — and it is why a trained model
is only item-side state (factors, neighbours, B matrix) plus parameters.
"""

from __future__ import annotations

import io
import json
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import scipy.sparse as sp


class Recommender(ABC):
    """Fit on a users x items CSR matrix of interaction strengths; score history rows."""

    algorithm: ClassVar[str] = ""
    defaults: ClassVar[dict[str, Any]] = {}
    # Small hyper-parameter grids searched on a validation split carved from training data.
    grid: ClassVar[list[dict[str, Any]]] = []
    # True for models whose history rows must hold time-decayed weights rather than counts
    # (models/history.py): the evaluation builds such rows for them.
    uses_time: ClassVar[bool] = False

    def __init__(self, **params: Any) -> None:
        unknown = set(params) - set(self.defaults)
        if unknown:
            raise ValueError(f"{self.algorithm}: unknown parameters {sorted(unknown)}")
        self.params: dict[str, Any] = {**self.defaults, **params}
        self.n_items = 0

    @abstractmethod
    def fit(self, X: sp.csr_matrix) -> None:
        """Learn from ``X`` (users x items, value = interaction strength > 0)."""

    @abstractmethod
    def score(self, rows: sp.csr_matrix) -> np.ndarray:
        """Dense (len(rows) x n_items) scores for users given by their history rows."""

    @abstractmethod
    def similar_items(self, item: int, k: int) -> list[tuple[int, float]]:
        """The ``k`` nearest items to ``item`` (excluding itself), best first."""

    def item_sums(self) -> ItemSums | None:
        """The model's scores as sums of one integer row per seen item (:class:`ItemSums`), for
        models whose score of a history is exactly that; None for the others. Serving keeps such
        sums per heavy shopper and adds only their new items (services/scoring/user_sums.py)."""
        return None

    @abstractmethod
    def arrays(self) -> dict[str, np.ndarray]:
        """Learned state as named arrays (the artifact stored in GridFS)."""

    @abstractmethod
    def load_arrays(self, arrays: dict[str, np.ndarray]) -> None:
        """Restore the state produced by :meth:`arrays`."""

    def to_bytes(self) -> bytes:
        buf = io.BytesIO()
        meta = json.dumps({"algorithm": self.algorithm, "params": self.params, "n_items": self.n_items})
        arrays: dict[str, Any] = {"__meta__": np.frombuffer(meta.encode(), dtype=np.uint8), **self.arrays()}
        np.savez(buf, **arrays)
        return buf.getvalue()


@dataclass(frozen=True)
class ItemSums:
    """Scores of a binary history as a sum of fixed-point item rows: ``score = (Σ rows[i]) * scale``
    over the user's items ``i``.

    Integers, not floats, because integer addition is exact and commutes: a user's sums kept
    across batches (one row added per new item) are bit-for-bit the sums a fresh product over the
    whole history gives, in whatever order the items came, so a replica that restarts (or one
    rebuilt from the archive) serves exactly the scores of one that never stopped. Float sums
    would depend on the order of additions. ``rows`` is int32: :func:`fixed_point` picks the
    scale so that no sum over any set of items can leave its range.
    """

    rows: np.ndarray  # items x items, int32
    scale: float  # a power of two

    def scores(self, sums: np.ndarray) -> np.ndarray:
        """float32 scores from integer sums (one rounding, the same for every path)."""
        return (sums.astype(np.float64) * self.scale).astype(np.float32)


FIXED_POINT_BOUND = 2**30  # largest |sum| allowed before rounding: the rounding adds < n/2 < 2**30


def fixed_point(M: np.ndarray) -> ItemSums:
    """``M`` (float items x items) as :class:`ItemSums`: the largest scale that keeps every column's
    sum of absolute values (the largest any user's score can reach) within 2**30. On Online
    Retail's EASE that is a resolution of about 1e-9 of the largest possible score, far below
    float32's own rounding of one score."""
    bound = float(np.abs(M).sum(axis=0, dtype=np.float64).max()) if M.size else 0.0
    shift = math.floor(math.log2(FIXED_POINT_BOUND / bound)) if bound > 0 else 0
    # ldexp by a power of two is exact in float32, and rint to an integer-valued float32 too.
    rows = np.rint(np.ldexp(np.asarray(M, dtype=np.float32), shift)).astype(np.int32)
    return ItemSums(np.ascontiguousarray(rows), math.ldexp(1.0, -shift))


def top_k_indices(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest values of a 1-d array, best first (argpartition: O(n))."""
    k = min(k, scores.shape[0])
    if k <= 0:
        return np.empty(0, dtype=np.int64)
    part = np.argpartition(-scores, k - 1)[:k]
    return part[np.argsort(-scores[part], kind="stable")]


def top_k_rows(scores: np.ndarray, k: int) -> np.ndarray:
    """:func:`top_k_indices` of every row of a 2-d array at once (rows x min(k, n_items))."""
    n_rows, n_items = scores.shape
    k = min(k, n_items)
    if k <= 0 or n_rows == 0:
        return np.empty((n_rows, 0), dtype=np.int64)
    part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    vals = np.take_along_axis(scores, part, axis=1)
    order = np.argsort(-vals, axis=1, kind="stable")
    return np.take_along_axis(part, order, axis=1)


def similar_from_vectors(vectors: np.ndarray, item: int, k: int) -> list[tuple[int, float]]:
    """Cosine neighbours of one row of ``vectors`` (item factors)."""
    norms = np.linalg.norm(vectors, axis=1) + 1e-9
    sims = (vectors @ vectors[item]) / (norms * norms[item])
    sims[item] = -np.inf
    idx = top_k_indices(sims, k)
    return [(int(i), float(sims[i])) for i in idx if np.isfinite(sims[i])]


def ridge_fold_in(item_factors: np.ndarray, rows: sp.csr_matrix, reg: float) -> np.ndarray:
    """Exact one-step implicit-ALS user solve (Hu et al.) for each history row.

    Used for models whose trainer has no user recalculation of its own (BPR): the
    user vector that best explains the row given fixed item factors.
    """
    V = item_factors.astype(np.float64)
    f = V.shape[1]
    VtV = V.T @ V
    out = np.zeros((rows.shape[0], f), dtype=np.float32)
    for u in range(rows.shape[0]):
        start, end = rows.indptr[u], rows.indptr[u + 1]
        if start == end:
            continue
        idx = rows.indices[start:end]
        c = rows.data[start:end].astype(np.float64)
        Vu = V[idx]
        A = VtV + (Vu.T * (c - 1.0)) @ Vu + reg * np.eye(f)
        b = Vu.T @ c
        out[u] = np.linalg.solve(A, b)
    return out
