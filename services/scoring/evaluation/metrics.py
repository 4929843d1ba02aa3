"""Ranking metrics with the definitions of the public `recommenders` library (python_evaluation).

For every user u with relevant test items T_u and top-k list R_u (train items removed):

* Precision@k = |R_u ∩ T_u| / k;  Recall@k = |R_u ∩ T_u| / |T_u|
* nDCG@k = Σ_{hits at rank r} 1/log(1+r)  /  Σ_{r=1..min(|T_u|,k)} 1/log(1+r)  (binary relevance)
* MAP (``recommenders.map``, the "normalized" MAP of their published benchmark tables) =
  Σ_{j-th hit at rank r} (j/r) / |T_u|
* MAP@k (``recommenders.map_at_k`` since 1.2, Spark's definition) = same sum / min(|T_u|, k)

All are averaged over every user with at least one relevant test item; users with no
hit contribute 0. Catalog coverage = distinct recommended items / catalog size.
"""

from __future__ import annotations

import numpy as np


def ranking_metrics(recs: np.ndarray, truth: list[np.ndarray], k: int, n_items: int) -> dict[str, float]:
    """``recs``: (n_users x k) item codes (-1 = empty slot); ``truth``: relevant codes per row."""
    n = len(truth)
    if n == 0:
        raise ValueError("no users with relevant test items")
    disc = 1.0 / np.log(np.arange(2, k + 2))
    prec = rec = ndcg = map_legacy = map_k = 0.0
    for row, rel in zip(recs, truth, strict=True):
        if rel.size == 0:
            continue
        hits = np.isin(row[:k], rel) & (row[:k] >= 0)
        n_hit = int(hits.sum())
        prec += n_hit / k
        rec += n_hit / rel.size
        ideal = disc[: min(rel.size, k)].sum()
        ndcg += float(disc[hits].sum()) / ideal
        if n_hit:
            ranks = np.flatnonzero(hits) + 1
            ap_sum = float((np.arange(1, n_hit + 1) / ranks).sum())
            map_legacy += ap_sum / rel.size
            map_k += ap_sum / min(rel.size, k)
    valid = recs[recs >= 0]
    return {
        "MAP": map_legacy / n,
        f"MAP@{k}": map_k / n,
        f"nDCG@{k}": ndcg / n,
        f"Precision@{k}": prec / n,
        f"Recall@{k}": rec / n,
        "coverage": float(np.unique(valid).size) / max(1, n_items),
        "users": float(n),
    }
