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

from services.scoring.evaluation.choices import DEFAULT_ALGORITHMS, TARGETS
from services.scoring.evaluation.datasets import Interactions, iter_batches
from services.scoring.evaluation.metrics import ranking_metrics
from services.scoring.evaluation.splits import Split, make_split, subset
from services.scoring.models import ALGORITHMS, make_model
from services.scoring.models.base import Recommender
from services.scoring.models.blend import (
    BLEND_SUFFIX,
    TREND_HALF_LIFE_DAYS,
    ItemStats,
    RepeatWeights,
    UserHistory,
    blend_base,
    blend_scores,
    candidates,
    fit_weights,
    is_blend,
    item_stats,
    labels_for,
    rebuy_rates,
)
from services.scoring.models.history import DAY_S, decayed_rows

TARGET_MEANING = {
    "new": "only test items the user had not interacted with in training; seen items left out of the rankings",
    "all": "every test item; seen items stay in the rankings",
    "repeat": "only test items the user had already interacted with in training (rebuys); seen items stay in",
}

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
    return ranked(lambda u: model.score(X[u]), X, users, k, exclude_seen, batch)


def ranked(
    scores_of: Callable[[np.ndarray], np.ndarray],
    X: sp.csr_matrix,
    users: np.ndarray,
    k: int,
    exclude_seen: bool = True,
    batch: int = 512,
) -> np.ndarray:
    """Top-k item codes per user of ``scores_of(user codes)``; seen items removed when asked."""
    out = np.full((len(users), k), -1, dtype=np.int64)
    for sl in iter_batches(len(users), batch):
        out[sl] = top_k_of(scores_of(users[sl]), X[users[sl]] if exclude_seen else None, k)
    return out


def top_k_of(scores: np.ndarray, seen: sp.csr_matrix | None, k: int) -> np.ndarray:
    """Top-k columns of each row of ``scores`` (-1 where fewer than k are finite)."""
    scores = np.array(scores, dtype=np.float32, copy=True)
    out = np.full((scores.shape[0], k), -1, dtype=np.int64)
    if seen is not None:
        r, c = seen.nonzero()
        scores[r, c] = -np.inf
    kk = min(k, scores.shape[1])
    part = np.argpartition(-scores, kk - 1, axis=1)[:, :kk]
    ps = np.take_along_axis(scores, part, axis=1)
    order = np.argsort(-ps, axis=1, kind="stable")
    best = np.take_along_axis(part, order, axis=1)
    best_scores = np.take_along_axis(ps, order, axis=1)
    best[~np.isfinite(best_scores)] = -1
    out[:, :kk] = best
    return out


def truth_for(
    data: Interactions, split: Split, X_train: sp.csr_matrix, targets: str = "new"
) -> tuple[np.ndarray, list[np.ndarray]]:
    """Users with relevant test items, and those items, for one target set.

    ``new``: items the user has not interacted with in training (the rankings leave seen
    items out too); ``all``: every test item; ``repeat``: only the test items the user had
    already interacted with in training (rebuys). Only users present in training are
    evaluated (a model cannot rank for a user it has no row for; for stratified-item on
    ML-100K this keeps all 943 users).
    """
    if targets not in TARGETS:
        raise ValueError(f"unknown targets {targets!r}; allowed: {', '.join(TARGETS)}")
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
        items = np.unique(grp_i)
        if targets == "new":
            rel = np.setdiff1d(items, seen)
        elif targets == "repeat":
            rel = np.intersect1d(items, seen)
        else:
            rel = items
        if rel.size:
            users.append(u)
            truth.append(rel)
    return np.asarray(users, dtype=np.int64), truth


def repeat_explore_metrics(
    recs: np.ndarray, truth: list[np.ndarray], users: np.ndarray, X_train: sp.csr_matrix, k: int
) -> dict[str, float]:
    """For target set ``all``: the share of hits that were rebuys, and nDCG@k on the explore part.

    The explore part (Li et al. 2023) is each user's test items they had *not* had before,
    scored against the same list (rebuys in it are simply misses there), over the users
    who have such items.
    """
    disc = 1.0 / np.log(np.arange(2, k + 2))
    hits = rebuy_hits = 0
    explore_ndcg = 0.0
    explore_users = 0
    for row, rel, u in zip(recs, truth, users, strict=True):
        seen = X_train.indices[X_train.indptr[u] : X_train.indptr[u + 1]]
        top = row[:k]
        hit = np.isin(top, rel) & (top >= 0)
        hits += int(hit.sum())
        rebuy_hits += int((hit & np.isin(top, seen)).sum())
        new_rel = np.setdiff1d(rel, seen)
        if new_rel.size:
            explore_users += 1
            ideal = disc[: min(new_rel.size, k)].sum()
            explore_ndcg += float(disc[np.isin(top, new_rel) & (top >= 0)].sum()) / ideal
    return {
        "rebuy_share_of_hits": rebuy_hits / hits if hits else 0.0,
        f"explore_nDCG@{k}": explore_ndcg / explore_users if explore_users else 0.0,
        "explore_users": float(explore_users),
    }


@dataclass
class AlgoResult:
    algorithm: str
    params: dict[str, Any]
    metrics: dict[str, float]
    train_seconds: float
    tune_seconds: float
    validation: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class Part:
    """One train/test part (the test split, or a validation split carved from training)."""

    data: Interactions
    split: Split
    targets: str
    X: sp.csr_matrix = field(init=False)
    users: np.ndarray = field(init=False)
    truth: list[np.ndarray] = field(init=False)
    t_ref: float = field(init=False)

    def __post_init__(self) -> None:
        self.X = interaction_matrix(self.data, self.split.train)
        self.users, self.truth = truth_for(self.data, self.split, self.X, self.targets)
        train_ts = self.data.ts[self.split.train]
        self.t_ref = float(train_ts.max()) if train_ts.size else 0.0

    @property
    def exclude_seen(self) -> bool:
        return self.targets == "new"

    def decayed(self, half_life_days: float) -> sp.csr_matrix:
        """Training rows as time-decayed counts (the input of history-based scores)."""
        m = self.split.train
        d = self.data
        return decayed_rows(d.users[m], d.items[m], d.ts[m], d.n_users, d.n_items, half_life_days * DAY_S, self.t_ref)

    def measure(self, recs: np.ndarray, k: int) -> dict[str, float]:
        out = ranking_metrics(recs, self.truth, k, self.data.n_items)
        if self.targets == "all":
            out.update(repeat_explore_metrics(recs, self.truth, self.users, self.X, k))
        return out


def fit_on(algorithm: str, params: dict[str, Any], part: Part) -> tuple[Recommender, float]:
    model = make_model(algorithm, **params)
    t0 = time.perf_counter()
    model.fit(part.X)
    return model, time.perf_counter() - t0


def measure_model(model: Recommender, part: Part, k: int) -> dict[str, float]:
    rows = part.decayed(float(model.params["half_life_days"])) if model.uses_time else part.X
    recs = ranked(lambda u: model.score(rows[u]), part.X, part.users, k, part.exclude_seen)
    return part.measure(recs, k)


def fit_and_measure(
    algorithm: str, params: dict[str, Any], data: Interactions, split: Split, k: int, targets: str = "new"
) -> tuple[Recommender, dict[str, float], float]:
    part = Part(data, split, targets)
    model, seconds = fit_on(algorithm, params, part)
    return model, measure_model(model, part, k), seconds


def validation_split(data: Interactions, split: Split, seed: int) -> tuple[Interactions, Split]:
    """Carve a validation split out of the training rows with the same protocol."""
    train_only = subset(data, split.train, "/train")
    return train_only, make_split(train_only, split.protocol, seed=seed + 1)


def tune(
    algorithm: str,
    data: Interactions,
    split: Split,
    k: int,
    seed: int,
    progress: Progress | None = None,
    targets: str = "new",
) -> tuple[dict[str, Any], list[dict[str, Any]], float]:
    cls = ALGORITHMS[algorithm]
    if not cls.grid:
        return dict(cls.defaults), [], 0.0
    t0 = time.perf_counter()
    vdata, vsplit = validation_split(data, split, seed)
    vpart = Part(vdata, vsplit, targets)
    rows: list[dict[str, Any]] = []
    best: tuple[float, dict[str, Any]] = (-1.0, dict(cls.defaults))
    for cand in cls.grid:
        params = {**cls.defaults, **cand}
        model, secs = fit_on(algorithm, params, vpart)
        m = measure_model(model, vpart, k)
        score = m[f"nDCG@{k}"]
        rows.append({"params": cand, f"val_nDCG@{k}": round(score, 5), "fit_seconds": round(secs, 3)})
        if score > best[0]:
            best = (score, params)
        if progress:
            progress(f"{algorithm} {cand} val nDCG@{k}={score:.4f}")
    return best[1], rows, time.perf_counter() - t0


def pair_last_age_days(part: Part) -> sp.csr_matrix:
    """Days from each training pair's latest interaction to the end of training, plus one."""
    m, d = part.split.train, part.data
    key = d.users[m].astype(np.int64) * d.n_items + d.items[m]
    ts = d.ts[m]
    order = np.lexsort((ts, key))
    key, ts = key[order], ts[order]
    last = np.r_[key[1:] != key[:-1], True] if key.size else np.zeros(0, dtype=bool)
    age = (part.t_ref - ts[last]) / DAY_S + 1.0
    A = sp.csr_matrix((age, (key[last] // d.n_items, key[last] % d.n_items)), shape=(d.n_users, d.n_items))
    A.sort_indices()
    return A


def user_history(part: Part, half_life_days: float) -> Callable[[np.ndarray], UserHistory]:
    """The blend's per-user inputs for any users of ``part`` (rows sliced from whole matrices)."""
    X = part.X.copy()
    X.sort_indices()
    H = part.decayed(half_life_days)
    H.sort_indices()
    A = pair_last_age_days(part)
    rates = rebuy_rates(np.asarray(X.sum(axis=1)).ravel(), np.diff(X.indptr))
    n_items = np.diff(X.indptr)
    return lambda u: UserHistory(X[u], H[u], A[u], rates[u], n_items[u])


def item_stats_of(part: Part) -> ItemStats:
    trend = np.asarray(part.decayed(TREND_HALF_LIFE_DAYS).sum(axis=0)).ravel()
    return item_stats(part.X, trend)


def learn_blend(cf: Recommender, part: Part, half_life_days: float) -> RepeatWeights:
    """Fit the blend's weights on ``part`` (a validation split): candidates, labels, Newton."""
    hist_of = user_history(part, half_life_days)
    stats = item_stats_of(part)
    truth_rows = np.repeat(np.arange(len(part.users)), [t.size for t in part.truth])
    truth_items = np.concatenate(part.truth) if part.truth else np.zeros(0, dtype=np.int64)
    feats: list[np.ndarray] = []
    labels: list[np.ndarray] = []
    for sl in iter_batches(len(part.users), 512):
        u = part.users[sl]
        c = candidates(cf.score(part.X[u]), hist_of(u), stats)
        in_batch = (truth_rows >= sl.start) & (truth_rows < sl.stop)
        feats.append(c.features)
        labels.append(labels_for(c, truth_rows[in_batch] - sl.start, truth_items[in_batch]))
    y = np.concatenate(labels)
    if y.size == 0 or y.min() == y.max():
        raise ValueError("the validation split has no positive and negative candidates to learn the blend from")
    return fit_weights(np.vstack(feats), y)


def evaluate_blend(
    name: str,
    done: dict[str, AlgoResult],
    fitted: dict[str, tuple[Recommender, float]],
    data: Interactions,
    split: Split,
    k: int,
    seed: int,
    do_tune: bool,
    targets: str,
    progress: Progress | None,
) -> AlgoResult:
    """A blend reuses its parts' chosen parameters; its weights are learned on validation."""
    base = blend_base(name)
    cf_params, half_life = done[base].params, float(done["history"].params["half_life_days"])
    t0 = time.perf_counter()
    weights = RepeatWeights()
    if do_tune:
        vdata, vsplit = validation_split(data, split, seed)
        vpart = Part(vdata, vsplit, targets)
        vcf, _ = fit_on(base, cf_params, vpart)
        weights = learn_blend(vcf, vpart, half_life)
        if progress:
            progress(f"{name} weights learned on validation")
    tune_s = time.perf_counter() - t0
    part = Part(data, split, targets)
    cf, train_s = fitted[base] if base in fitted else fit_on(base, cf_params, part)
    hist_of = user_history(part, half_life)
    stats = item_stats_of(part)
    recs = ranked(
        lambda u: blend_scores(cf.score(part.X[u]), hist_of(u), stats, weights),
        part.X,
        part.users,
        k,
        part.exclude_seen,
    )
    params = {base: cf_params, "half_life_days": half_life, "weights": weights.as_dict()}
    return AlgoResult(name, params, part.measure(recs, k), train_s, tune_s, [])


def known_algorithm(name: str) -> bool:
    """A model name, or a blend ``<model>+history`` of any model but history itself."""
    if is_blend(name):
        return blend_base(name) in ALGORITHMS and blend_base(name) != "history"
    return name in ALGORITHMS


def run_order(algorithms: Sequence[str]) -> list[str]:
    """Popularity first, and each blend after the two models it is made of."""
    order: list[str] = ["popularity"]
    for a in algorithms:
        if is_blend(a):
            order += [blend_base(a), "history"]
        order.append(a)
    return list(dict.fromkeys(order))


def evaluate(
    data: Interactions,
    protocol: str,
    algorithms: Sequence[str] = DEFAULT_ALGORITHMS,
    k: int = 10,
    seed: int = 42,
    do_tune: bool = True,
    progress: Progress | None = None,
    on_step: Callable[[], None] | None = None,
    targets: str = "new",
) -> dict[str, Any]:
    if targets not in TARGETS:
        raise ValueError(f"unknown targets {targets!r}; allowed: {', '.join(TARGETS)}")
    for a in algorithms:
        if not known_algorithm(a):
            raise ValueError(
                f"unknown algorithm {a!r}; known: {', '.join(sorted(ALGORITHMS))} and <model>{BLEND_SUFFIX}"
            )
    algos = run_order(algorithms)
    split = make_split(data, protocol, seed=seed)
    results: list[AlgoResult] = []
    done: dict[str, AlgoResult] = {}
    fitted: dict[str, tuple[Recommender, float]] = {}
    for algo in algos:
        if is_blend(algo):
            res = evaluate_blend(algo, done, fitted, data, split, k, seed, do_tune, targets, progress)
        else:
            params, val_rows, tune_s = (
                tune(algo, data, split, k, seed, progress, targets)
                if do_tune
                else (dict(ALGORITHMS[algo].defaults), [], 0.0)
            )
            model, metrics, train_s = fit_and_measure(algo, params, data, split, k, targets)
            fitted[algo] = (model, train_s)  # a blend of it measures this same fit
            res = AlgoResult(algo, params, metrics, train_s, tune_s, val_rows)
        results.append(res)
        done[algo] = res
        if progress:
            progress(f"{algo}: nDCG@{k}={res.metrics[f'nDCG@{k}']:.4f} train {res.train_seconds:.2f}s")
        if on_step:
            on_step()
    key = f"nDCG@{k}"
    best = max(results, key=lambda r: r.metrics[key])
    report: dict[str, Any] = {
        "dataset": data.summary(),
        "protocol": protocol,
        "targets": targets,
        "targets_meaning": TARGET_MEANING[targets],
        "split": split.params,
        "train_interactions": int(split.train.sum()),
        "test_interactions": int(split.test.sum()),
        "k": k,
        "tuned_on": (
            f"validation split carved from the training part (same protocol, seed+1, targets {targets})"
            if do_tune
            else "none"
        ),
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
    if data.name == "ml-100k" and protocol == "stratified-item" and k == 10 and targets == "new":
        top_pub = max(PUBLISHED_ML100K_NDCG10.values())
        report["published_nDCG@10"] = PUBLISHED_ML100K_NDCG10
        report["beats_all_published"] = bool(best.metrics[key] > top_pub)
    return report


def format_table(report: dict[str, Any]) -> str:
    k = report["k"]
    cols = ["MAP", f"MAP@{k}", f"nDCG@{k}", f"Precision@{k}", f"Recall@{k}", "coverage"]
    if report.get("targets") == "all":
        cols += ["rebuy_share_of_hits", f"explore_nDCG@{k}"]
    head = f"| algorithm | {' | '.join(cols)} | train s | tune s |"
    lines = [head, "|" + "---|" * (len(cols) + 3)]
    for r in report["results"]:
        m = r["metrics"]
        vals = " | ".join(f"{m[c]:.4f}" for c in cols)
        lines.append(f"| {r['algorithm']} | {vals} | {r['train_seconds']:.2f} | {r['tune_seconds']:.1f} |")
    ds = report["dataset"]
    title = (
        f"{ds['name']}{' (SYNTHETIC)' if ds['synthetic'] else ''}: {report['protocol']}, "
        f"{report['train_interactions']} train / {report['test_interactions']} test, top-{k}, "
        f"targets {report.get('targets', 'new')}"
    )
    return title + "\n" + "\n".join(lines)
