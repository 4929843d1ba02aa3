"""Metric definitions (recommenders' python_evaluation) and split protocols on hand-made data."""

from __future__ import annotations

import math

import numpy as np
import pytest

from services.scoring.evaluation import datasets, harness, splits
from services.scoring.evaluation.metrics import ranking_metrics


def test_metrics_by_hand() -> None:
    # user 0: relevant {1, 5}; recs [1, 2, 5]: hits at ranks 1 and 3.
    # user 1: relevant {9};    recs [3, 4, 6]: no hit.
    recs = np.array([[1, 2, 5], [3, 4, 6]])
    truth = [np.array([1, 5]), np.array([9])]
    m = ranking_metrics(recs, truth, k=3, n_items=10)
    assert m["Precision@3"] == pytest.approx((2 / 3) / 2)
    assert m["Recall@3"] == pytest.approx(1.0 / 2)
    dcg = 1 / math.log(2) + 1 / math.log(4)
    idcg = 1 / math.log(2) + 1 / math.log(3)
    assert m["nDCG@3"] == pytest.approx((dcg / idcg) / 2)
    ap = (1 / 1 + 2 / 3) / 2
    assert m["MAP"] == pytest.approx(ap / 2)
    assert m["MAP@3"] == pytest.approx(ap / 2)  # min(|T|, k) = 2 = |T| here
    assert m["coverage"] == pytest.approx(6 / 10)


def test_map_normalisations_differ_when_many_relevant() -> None:
    recs = np.array([[0, 1]])
    truth = [np.arange(10)]
    m = ranking_metrics(recs, truth, k=2, n_items=10)
    assert m["MAP"] == pytest.approx(2 / 10)  # legacy: divided by |T| = 10
    assert m["MAP@2"] == pytest.approx(1.0)  # Spark MAP@k: divided by min(|T|, k) = 2


def small() -> datasets.Interactions:
    rows = [(f"u{u}", f"i{i}", 1.0, float(u * 100 + i)) for u in range(20) for i in range(u % 7, u % 7 + 8)]
    return datasets.from_rows("tiny", rows)


def test_stratified_item_split_is_per_item_75_25_and_seeded() -> None:
    d = small()
    s = splits.stratified_item(d)
    for item in range(d.n_items):
        n = int((d.items == item).sum())
        assert int((d.items[s.train] == item).sum()) == round(0.75 * n)
    assert np.array_equal(s.train, splits.stratified_item(d).train)
    assert not np.array_equal(s.train, splits.stratified_item(d, seed=1).train)


def test_temporal_and_leave_last_out() -> None:
    d = small()
    t = splits.temporal(d, 0.25)
    assert d.ts[t.train].max() < d.ts[t.test].min()
    lo = splits.leave_last_out(d)
    assert lo.test.sum() == d.n_users
    for u in range(d.n_users):
        assert d.ts[lo.test & (d.users == u)].max() == d.ts[d.users == u].max()


def test_harness_runs_every_algorithm_with_popularity_baseline() -> None:
    report = harness.evaluate(
        datasets.synthetic(n_users=120, n_items=80, per_user=12), "leave-last-out", ["ease", "itemknn"], do_tune=False
    )
    algos = [r["algorithm"] for r in report["results"]]
    assert algos == ["popularity", "ease", "itemknn"]
    assert report["dataset"]["synthetic"] is True
    assert "nDCG@10" in report["results"][0]["metrics"]


def test_csv_loader_reports_bad_columns(tmp_path) -> None:  # type: ignore[no-untyped-def]
    f = tmp_path / "x.csv"
    f.write_text("who,what\na,b\n")
    with pytest.raises(datasets.DatasetError, match="column 'user'"):
        datasets.csv_interactions(f, "user", "what")
    d = datasets.csv_interactions(f, "who", "what")
    assert len(d) == 1
