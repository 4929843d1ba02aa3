"""Repeat-aware blends `<cf>+history`: a CF model's scores and the shopper's own history, mixed
by weights learned on held-out purchases.

A fixed mix of two normalised score vectors (TIFU-KNN's ``a * own + (1 - a) * neighbours``) barely
beat the history baseline on Online Retail (nDCG@10 0.355 vs 0.347 with the best global weight,
docs/evaluation.md): *which* of a shopper's past items come back depends on more than one
number. So the mix is a small logistic model over the candidates of each user, their own past
items plus the CF model's top ``CANDIDATES`` new items, with features that are cheap to keep
live in serving:

* per pair: seen or not, log(1 + count), the time-decayed weight relative to the user's largest,
  how recently it happened, and the CF score (relative to the user's best, for seen and new
  items apart);
* per item: how often its buyers buy it again (smoothed), its recent popularity trend and its
  overall popularity;
* per user: their own rebuy rate (1 - distinct items / interactions), which lets the weight of
  the history differ per shopper, and how many items they have.

Weights are fitted by Newton's method (L2-regularised logistic regression) on a validation
split carved from the training data, never on the test split; serving carries them in the
model artifact (registry field ``repeat``). One function scores offline and in serving, so what
is measured is what is served. Everything is array arithmetic over a batch of users.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import scipy.sparse as sp

BLEND_SUFFIX = "+history"
CANDIDATES = 50  # new items per user the CF model proposes (besides all of the user's own items)
TREND_HALF_LIFE_DAYS = 7.0  # item trend: popularity decayed with this half-life
REBUY_PRIOR_WEIGHT = 20.0  # smoothing of an item's rebuy share toward the catalog's
REBUY_FLOOR = 1e-4  # added before the log of a rebuy share
L2 = 1.0
NEWTON_STEPS = 25
FEATURES = (
    "seen",
    "log_count",
    "history",
    "recency",
    "log_item_rebuy",
    "log_item_trend",
    "cf",
    "seen_user_rebuy_rate",
    "log_user_items",
    "seen_log_user_items",
    "item_popularity",
    "seen_cf",
)
# Learned on Online Retail's validation split (`stylerec eval online-retail --targets all`,
# ease+history, 2026-12-06; docs/evaluation.md): what serving uses when a model was trained on too little
# held-out data to learn its own.
DEFAULT_WEIGHTS: dict[str, float] = {
    "bias": -3.6154,
    "seen": 2.35186,
    "log_count": 0.62844,
    "history": 0.8583,
    "recency": 0.16564,
    "log_item_rebuy": 0.38019,
    "log_item_trend": 0.44005,
    "cf": 1.92965,
    "seen_user_rebuy_rate": 1.03748,
    "log_user_items": 0.28732,
    "seen_log_user_items": -0.22223,
    "item_popularity": -1.23415,
    "seen_cf": -1.04209,
}


def is_blend(name: str) -> bool:
    return name.endswith(BLEND_SUFFIX) and len(name) > len(BLEND_SUFFIX)


def blend_base(name: str) -> str:
    """The CF model of a blend name (``ease+history`` -> ``ease``)."""
    return name[: -len(BLEND_SUFFIX)]


@dataclass
class UserHistory:
    """A batch of users' own items over the model's item index (all four share one sparsity)."""

    counts: sp.csr_matrix  # interactions of the pair
    decayed: sp.csr_matrix  # time-decayed weight of the pair
    age_days: sp.csr_matrix  # days since the pair's latest interaction (stored +1 so 0 stays visible)
    rebuy_rate: np.ndarray  # per user: 1 - distinct items / interactions
    n_items: np.ndarray  # per user: distinct items


@dataclass
class ItemStats:
    """Item-side inputs, fitted with the CF model and carried in the artifact."""

    rebuy: np.ndarray  # smoothed share of an item's buyers who had it more than once
    trend: np.ndarray  # recent popularity / the largest, in (0, 1]
    popularity: np.ndarray  # overall popularity mapped to [0, 1)

    def arrays(self) -> dict[str, np.ndarray]:
        return {"repeat_item_rebuy": self.rebuy, "repeat_item_trend": self.trend, "repeat_item_pop": self.popularity}

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> ItemStats:
        return cls(arrays["repeat_item_rebuy"], arrays["repeat_item_trend"], arrays["repeat_item_pop"])


def item_stats(counts: sp.csr_matrix, trend_weight: np.ndarray) -> ItemStats:
    """From a users x items count matrix and each item's recently-decayed interaction weight."""
    buyers = np.asarray((counts > 0).sum(axis=0)).ravel().astype(np.float64)
    rebuyers = np.asarray((counts >= 2).sum(axis=0)).ravel().astype(np.float64)
    prior = rebuyers.sum() / buyers.sum() if buyers.sum() > 0 else 0.0
    rebuy = (rebuyers + REBUY_PRIOR_WEIGHT * prior) / (buyers + REBUY_PRIOR_WEIGHT)
    top = float(trend_weight.max()) if trend_weight.size else 0.0
    trend = trend_weight / top if top > 0 else np.zeros_like(trend_weight, dtype=np.float64)
    pop_top = float(buyers.max()) if buyers.size else 0.0
    pop = buyers / (pop_top * (1 + 1e-6)) if pop_top > 0 else np.zeros_like(buyers)
    return ItemStats(rebuy.astype(np.float32), trend.astype(np.float32), pop.astype(np.float32))


def rebuy_rates(interactions: np.ndarray, distinct: np.ndarray) -> np.ndarray:
    """Per user: the share of their interactions that repeated an item they already had."""
    n = np.asarray(interactions, dtype=np.float64)
    d = np.asarray(distinct, dtype=np.float64)
    return np.where(n > 0, 1.0 - d / np.maximum(n, 1.0), 0.0)


def unit_rows(scores: np.ndarray) -> np.ndarray:
    """Each row's positive part divided by the row's largest value (rows without one stay 0)."""
    pos = np.maximum(np.asarray(scores, dtype=np.float32), np.float32(0.0))
    if pos.shape[1] == 0:
        return pos
    top = pos.max(axis=1, keepdims=True)
    return np.divide(pos, top, out=np.zeros_like(pos), where=top > 0)


def row_relative(m: sp.csr_matrix) -> np.ndarray:
    """The CSR data of ``m`` divided by its row's largest value."""
    if m.nnz == 0:
        return np.zeros(0)
    row_of = np.repeat(np.arange(m.shape[0]), np.diff(m.indptr))
    top = np.zeros(m.shape[0])
    np.maximum.at(top, row_of, m.data)
    return np.asarray(m.data / np.maximum(top[row_of], 1e-300))


@dataclass
class Candidates:
    """Each user's candidates as flat (row, item) pairs with their feature matrix."""

    rows: np.ndarray
    items: np.ndarray
    features: np.ndarray  # len(rows) x len(FEATURES)
    n_rows: int
    n_items: int


def candidates(cf: np.ndarray, hist: UserHistory, stats: ItemStats, n_new: int = CANDIDATES) -> Candidates:
    """The user's own items plus the CF model's ``n_new`` best new items, with their features."""
    n_rows, n_items = cf.shape
    cf_n = unit_rows(cf)
    seen = hist.counts.tocsr()
    s_rows = np.repeat(np.arange(n_rows), np.diff(seen.indptr))
    s_items = seen.indices.astype(np.int64)
    masked = cf_n.copy()
    masked[s_rows, s_items] = -np.inf
    take = max(0, min(n_new, n_items - 1))
    if take > 0:
        new_items = np.argpartition(-masked, take - 1, axis=1)[:, :take]
        ok = np.isfinite(np.take_along_axis(masked, new_items, axis=1))
        n_rows_new = np.repeat(np.arange(n_rows), take).reshape(n_rows, take)[ok]
        new_items = new_items[ok]
    else:
        n_rows_new = new_items = np.zeros(0, dtype=np.int64)
    rows = np.concatenate([s_rows, n_rows_new]).astype(np.int64)
    items = np.concatenate([s_items, new_items]).astype(np.int64)
    is_seen = np.zeros(len(rows))
    is_seen[: len(s_rows)] = 1.0

    def on_seen(values: np.ndarray) -> np.ndarray:
        out = np.zeros(len(rows))
        out[: len(s_rows)] = values
        return out

    log_user_items = np.log1p(hist.n_items.astype(np.float64))[rows]
    cf_at = cf_n[rows, items].astype(np.float64)
    F = np.column_stack(
        [
            is_seen,
            on_seen(np.log1p(seen.data.astype(np.float64))),
            on_seen(row_relative(hist.decayed.tocsr())),
            on_seen(-np.log1p(np.maximum(hist.age_days.tocsr().data.astype(np.float64) - 1.0, 0.0))),
            # + REBUY_FLOOR: a catalog where nobody ever rebought (ML-100K ratings) has shares of 0.
            on_seen(np.log(stats.rebuy[s_items].astype(np.float64) + REBUY_FLOOR)),
            np.log(stats.trend[items].astype(np.float64) + 1e-4),
            cf_at,
            is_seen * hist.rebuy_rate[rows],
            log_user_items,
            is_seen * log_user_items,
            stats.popularity[items].astype(np.float64),
            is_seen * cf_at,
        ]
    )
    return Candidates(rows, items, F, n_rows, n_items)


@dataclass
class RepeatWeights:
    """Logistic weights per feature (raw feature scale) and the bias."""

    weights: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_WEIGHTS))

    def vector(self) -> tuple[float, np.ndarray]:
        return float(self.weights.get("bias", 0.0)), np.asarray([self.weights.get(f, 0.0) for f in FEATURES])

    def as_dict(self) -> dict[str, float]:
        return {k: round(float(v), 5) for k, v in self.weights.items()}


def fit_weights(F: np.ndarray, y: np.ndarray) -> RepeatWeights:
    """L2-regularised logistic regression by Newton's method on standardised features."""
    if not np.isfinite(F).all():
        raise ValueError("blend features are not all finite")
    mu, sd = F.mean(axis=0), F.std(axis=0) + 1e-9
    Z = np.column_stack([np.ones(len(F)), (F - mu) / sd])
    w = np.zeros(Z.shape[1])
    reg = L2 * np.eye(Z.shape[1])
    reg[0, 0] = 0.0
    for _ in range(NEWTON_STEPS):
        p = 1.0 / (1.0 + np.exp(-np.clip(Z @ w, -40, 40)))
        grad = Z.T @ (p - y) + reg @ w
        hess = (Z * (p * (1.0 - p))[:, None]).T @ Z + reg + 1e-9 * np.eye(Z.shape[1])
        step = np.linalg.solve(hess, grad)
        w -= step
        if float(np.abs(step).max()) < 1e-7:
            break
    raw = w[1:] / sd
    bias = float(w[0] - (raw * mu).sum())
    return RepeatWeights({"bias": bias, **{f: float(v) for f, v in zip(FEATURES, raw, strict=True)}})


def labels_for(c: Candidates, truth_rows: np.ndarray, truth_items: np.ndarray) -> np.ndarray:
    """1 where a candidate (row, item) is among the held-out (row, item) pairs."""
    keys = c.rows * c.n_items + c.items
    return np.isin(keys, truth_rows.astype(np.int64) * c.n_items + truth_items.astype(np.int64)).astype(np.float64)


def blend_scores(cf: np.ndarray, hist: UserHistory, stats: ItemStats, weights: RepeatWeights) -> np.ndarray:
    """Dense scores: each candidate its logit, every other item -inf (then the caller's top-k)."""
    c = candidates(cf, hist, stats)
    bias, w = weights.vector()
    out = np.full(cf.shape, -np.inf, dtype=np.float32)
    out[c.rows, c.items] = (bias + c.features @ w).astype(np.float32)
    return out


def weights_from_meta(meta: dict[str, Any] | None) -> RepeatWeights | None:
    if not meta:
        return None
    return RepeatWeights({k: float(v) for k, v in meta.items()})


@dataclass
class RepeatBlend:
    """What a serving model carries for repeat_policy decay: learned weights and item statistics."""

    weights: RepeatWeights
    stats: ItemStats
    learned_on: str = ""  # how the weights were obtained (shown in the registry)

    def meta(self) -> dict[str, Any]:
        return {"weights": self.weights.as_dict(), "learned_on": self.learned_on}


def neutral_stats(n_items: int) -> ItemStats:
    """Item statistics that favour no item: for a model trained without them (policy was off)."""
    return ItemStats(
        np.full(n_items, 0.2, dtype=np.float32), np.ones(n_items, dtype=np.float32), np.zeros(n_items, np.float32)
    )
