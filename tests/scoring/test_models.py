"""Algorithms on tiny hand-made data where the right answer is known."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from services.scoring.models import ALGORITHMS, make_model, model_from_bytes

# Two taste clusters: items 0-2 are bought together, items 3-5 are bought together.
ROWS = [
    [0, 1, 2],
    [0, 1],
    [1, 2],
    [0, 2],
    [0, 1, 2],
    [3, 4, 5],
    [3, 4],
    [4, 5],
    [3, 5],
    [3, 4, 5],
]


def matrix(rows: list[list[int]] = ROWS, n_items: int = 6) -> sp.csr_matrix:
    r = [u for u, items in enumerate(rows) for _ in items]
    c = [i for items in rows for i in items]
    return sp.csr_matrix((np.ones(len(c), dtype=np.float32), (r, c)), shape=(len(rows), n_items))


def row(items: list[int], n_items: int = 6) -> sp.csr_matrix:
    return sp.csr_matrix((np.ones(len(items), dtype=np.float32), ([0] * len(items), items)), shape=(1, n_items))


@pytest.mark.parametrize("algo", ["itemknn", "ease"])
def test_known_neighbours(algo: str) -> None:
    m = make_model(algo)
    m.fit(matrix())
    for item, cluster in ((0, {1, 2}), (4, {3, 5})):
        top2 = {i for i, _ in m.similar_items(item, 2)}
        assert top2 == cluster


@pytest.mark.parametrize("algo", ["itemknn", "ease", "als", "bpr"])
def test_known_top_n(algo: str) -> None:
    """A user holding item 0 must get 1 and 2 (its cluster) before anything from the other cluster."""
    # Two clusters need two latent factors; regularised so the tiny data cannot be memorised.
    params: dict[str, float] = {"factors": 2, "iterations": 30, "regularization": 1.0} if algo == "als" else {}
    if algo == "bpr":
        params = {"factors": 4, "learning_rate": 0.05}
        params.update({"learning_rate": 0.05, "iterations": 300})
    m = make_model(algo, **params)
    m.fit(matrix())
    scores = m.score(row([0]))[0]
    scores[0] = -np.inf
    order = list(np.argsort(-scores))
    assert set(order[:2]) == {1, 2}, (algo, scores)


def test_popularity_order_and_same_for_everyone() -> None:
    X = matrix([[0, 1], [1], [1, 2], [2]], 3)
    m = make_model("popularity")
    m.fit(X)
    s = m.score(sp.vstack([row([0], 3), row([2], 3)]).tocsr())
    assert list(np.argsort(-s[0])) == [1, 2, 0]
    assert np.array_equal(s[0], s[1])


@pytest.mark.parametrize("algo", sorted(ALGORITHMS))
def test_artifact_round_trip(algo: str) -> None:
    params = {"factors": 4, "iterations": 5} if algo in ("als", "bpr") else {}
    m = make_model(algo, **params)
    m.fit(matrix())
    back = model_from_bytes(m.to_bytes())
    assert back.algorithm == algo and back.params == m.params
    np.testing.assert_allclose(back.score(row([0, 4])), m.score(row([0, 4])), rtol=1e-5, atol=1e-6)


def test_fold_in_changes_scores() -> None:
    m = make_model("ease")
    m.fit(matrix())
    before = m.score(row([0]))[0]
    after = m.score(row([0, 3]))[0]
    assert after[4] > before[4] and after[5] > before[5]


def test_unknown_algorithm_and_parameter_are_rejected() -> None:
    with pytest.raises(ValueError, match="unknown algorithm"):
        make_model("svd")
    with pytest.raises(ValueError, match="unknown parameters"):
        make_model("ease", lambda_=3)
