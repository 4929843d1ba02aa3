"""`stylerec eval`: every algorithm plus the popularity baseline on one split, tuned honestly.

Hyper-parameters are chosen on a *validation* split carved from the training part
with the same protocol (different seed), then each model is refit on the whole
training part and measured once on the test part. The test split never influences
a choice. Training seconds are the final fit only; tuning time is reported apart.
"""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch

from services.scoring.evaluation.datasets import Interactions, iter_batches
from services.scoring.evaluation.metrics import ranking_metrics
from services.scoring.evaluation.splits import Split, make_split, subset
from services.scoring.models import ALGORITHMS, make_model
from services.scoring.models.base import Recommender

DEFAULT_ALGORITHMS = ("popularity", "itemknn", "als", "bpr", "ease")

# nDCG@10 on ML-100K, stratified-item 75/25, top-10 (recommenders' benchmark notebook, README table).
PUBLISHED_ML100K_NDCG10 = {"SAR": 0.382, "NCF": 0.396, "LightGCN": 0.420, "BPR": 0.442, "BiVAE": 0.475}

Progress = Callable[[str], None]


def interaction_matrix(data: Interactions, mask: np.ndarray) -> sp.csr_matrix:
    """users x items, value = number of interactions of the pair (duplicates summed)."""
    X = sp.csr_matrix(
        (np.ones(int(mask.sum()), dtype=np.float32), (data.users[mask], data.items[mask])),
        shape=(data.n_users, data.n_items),
    )
    X.sum_duplicates()
    return X


def top_k(
    model: Recommender, X: sp.csr_matrix, users: np.ndarray, k: int, exclude_seen: bool = True, batch: int = 512
) -> np.ndarray:
    """Top-k item codes per user from their training rows (seen items removed)."""
    out = np.full((len(users), k), -1, dtype=np.int64)
    for sl in iter_batches(len(users), batch):
        rows = X[users[sl]]
        scores = model.score(rows).astype(np.float32, copy=True)
        if exclude_seen:
            r, c = rows.nonzero()
            scores[r, c] = -np.inf
        kk = min(k, scores.shape[1])
        part = np.argpartition(-scores, kk - 1, axis=1)[:, :kk]
        ps = np.take_along_axis(scores, part, axis=1)
        order = np.argsort(-ps, axis=1, kind="stable")
        best = np.take_along_axis(part, order, axis=1)
        best_scores = np.take_along_axis(ps, order, axis=1)
        best[~np.isfinite(best_scores)] = -1
        out[sl, :kk] = best
    return out


def truth_for(data: Interactions, split: Split, X_train: sp.csr_matrix) -> tuple[np.ndarray, list[np.ndarray]]:
    """Users with relevant test items that they have not already interacted with in training.

    Only users present in training are evaluated (a model cannot rank for a user it has
    no row for; for stratified-item on ML-100K this keeps all 943 users).
    """
    te_u, te_i = data.users[split.test], data.items[split.test]
    order = np.lexsort((te_i, te_u))
    te_u, te_i = te_u[order], te_i[order]
    has_train = np.diff(X_train.indptr) > 0
    users: list[int] = []
    truth: list[np.ndarray] = []
    bounds = np.flatnonzero(np.diff(te_u)) + 1
    for grp_u, grp_i in zip(np.split(te_u, bounds), np.split(te_i, bounds), strict=True):
        if grp_u.size == 0:
            continue
        u = int(grp_u[0])
        if not has_train[u]:
            continue
        seen = X_train.indices[X_train.indptr[u] : X_train.indptr[u + 1]]
        rel = np.setdiff1d(np.unique(grp_i), seen)
        if rel.size:
            users.append(u)
            truth.append(rel)
    return np.asarray(users, dtype=np.int64), truth


@dataclass
class AlgoResult:
    algorithm: str
    params: dict[str, Any]
    metrics: dict[str, float]
    train_seconds: float
    tune_seconds: float
    validation: list[dict[str, Any]] = field(default_factory=list)


def fit_and_measure(
    algorithm: str, params: dict[str, Any], data: Interactions, split: Split, k: int
) -> tuple[Recommender, dict[str, float], float]:
    X = interaction_matrix(data, split.train)
    users, truth = truth_for(data, split, X)
    model = make_model(algorithm, **params)
    t0 = time.perf_counter()
    model.fit(X)
    seconds = time.perf_counter() - t0
    recs = top_k(model, X, users, k)
    return model, ranking_metrics(recs, truth, k, data.n_items), seconds


def validation_split(data: Interactions, split: Split, seed: int) -> tuple[Interactions, Split]:
    """Carve a validation split out of the training rows with the same protocol."""
    train_only = subset(data, split.train, "/train")
    return train_only, make_split(train_only, split.protocol, seed=seed + 1)


def tune(
    algorithm: str, data: Interactions, split: Split, k: int, seed: int, progress: Progress | None = None
) -> tuple[dict[str, Any], list[dict[str, Any]], float]:
    cls = ALGORITHMS[algorithm]
    if not cls.grid:
        return dict(cls.defaults), [], 0.0
    t0 = time.perf_counter()
    vdata, vsplit = validation_split(data, split, seed)
    rows: list[dict[str, Any]] = []
    best: tuple[float, dict[str, Any]] = (-1.0, dict(cls.defaults))
    for cand in cls.grid:
        params = {**cls.defaults, **cand}
        _, m, secs = fit_and_measure(algorithm, params, vdata, vsplit, k)
        score = m[f"nDCG@{k}"]
        rows.append({"params": cand, f"val_nDCG@{k}": round(score, 5), "fit_seconds": round(secs, 3)})
        if score > best[0]:
            best = (score, params)
        if progress:
            progress(f"{algorithm} {cand} val nDCG@{k}={score:.4f}")
    return best[1], rows, time.perf_counter() - t0


def evaluate(
    data: Interactions,
    protocol: str,
    algorithms: Sequence[str] = DEFAULT_ALGORITHMS,
    k: int = 10,
    seed: int = 42,
    do_tune: bool = True,
    progress: Progress | None = None,
    on_step: Callable[[], None] | None = None,
) -> dict[str, Any]:
    algos = list(dict.fromkeys(["popularity", *algorithms]))
    for a in algos:
        if a not in ALGORITHMS:
            raise ValueError(f"unknown algorithm {a!r}; known: {', '.join(sorted(ALGORITHMS))}")
    split = make_split(data, protocol, seed=seed)
    results: list[AlgoResult] = []
    for algo in algos:
        params, val_rows, tune_s = (
            tune(algo, data, split, k, seed, progress) if do_tune else (dict(ALGORITHMS[algo].defaults), [], 0.0)
        )
        _, metrics, train_s = fit_and_measure(algo, params, data, split, k)
        results.append(AlgoResult(algo, params, metrics, train_s, tune_s, val_rows))
        if progress:
            progress(f"{algo}: nDCG@{k}={metrics[f'nDCG@{k}']:.4f} train {train_s:.2f}s")
        if on_step:
            on_step()
    key = f"nDCG@{k}"
    best = max(results, key=lambda r: r.metrics[key])
    report: dict[str, Any] = {
        "dataset": data.summary(),
        "protocol": protocol,
        "split": split.params,
        "train_interactions": int(split.train.sum()),
        "test_interactions": int(split.test.sum()),
        "k": k,
        "tuned_on": "validation split carved from the training part (same protocol, seed+1)" if do_tune else "none",
        "machine": {
            "cpus": os.cpu_count(),
            "torch_device": "cuda" if torch.cuda.is_available() else "cpu",
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
        "results": [
            {
                "algorithm": r.algorithm,
                "params": r.params,
                "metrics": {m: round(float(v), 5) for m, v in r.metrics.items()},
                "train_seconds": round(r.train_seconds, 3),
                "tune_seconds": round(r.tune_seconds, 3),
                "validation": r.validation,
            }
            for r in results
        ],
        "best": {"algorithm": best.algorithm, key: round(float(best.metrics[key]), 5)},
    }
    if data.name == "ml-100k" and protocol == "stratified-item" and k == 10:
        top_pub = max(PUBLISHED_ML100K_NDCG10.values())
        report["published_nDCG@10"] = PUBLISHED_ML100K_NDCG10
        report["beats_all_published"] = bool(best.metrics[key] > top_pub)
    return report


def format_table(report: dict[str, Any]) -> str:
    k = report["k"]
    cols = ["MAP", f"MAP@{k}", f"nDCG@{k}", f"Precision@{k}", f"Recall@{k}", "coverage"]
    head = f"| algorithm | {' | '.join(cols)} | train s | tune s |"
    lines = [head, "|" + "---|" * (len(cols) + 3)]
    for r in report["results"]:
        m = r["metrics"]
        vals = " | ".join(f"{m[c]:.4f}" for c in cols)
        lines.append(f"| {r['algorithm']} | {vals} | {r['train_seconds']:.2f} | {r['tune_seconds']:.1f} |")
    ds = report["dataset"]
    title = (
        f"{ds['name']}{' (SYNTHETIC)' if ds['synthetic'] else ''}: {report['protocol']}, "
        f"{report['train_interactions']} train / {report['test_interactions']} test, top-{k}"
    )
    return title + "\n" + "\n".join(lines)
