"""Batched fold-in gives exactly the one-user-at-a-time answer, for every model.

The reference below is the per-user algorithm scoring used before the micro-batched path
(score one history row, mask seen items, top-k, then new items in the reserved slots), written
out independently so the batched code is compared against the semantics, not against itself.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import scipy.sparse as sp

from services.scoring.foldin import ModelHolder, Recommender
from services.scoring.interactions import EventRecord, InteractionState
from services.scoring.models import ALGORITHMS
from services.scoring.models.base import top_k_indices, top_k_rows
from services.scoring.registry import ServingModel
from services.scoring.trainer import fit_model

WEIGHTS = {1: 1.0, 2: 2.0, 3: 4.0, 4: 6.0, 5: 10.0}
T0 = 1_750_000_000.0
K = 12


def shop_events(seed: int = 7) -> list[EventRecord]:
    """Clustered synthetic shop: 60 users, 40 items in 4 tastes, all event types."""
    rng = random.Random(seed)
    out = []
    for n in range(1500):
        u = rng.randrange(60)
        taste = u % 4
        i = rng.randrange(10) + 10 * taste if rng.random() < 0.8 else rng.randrange(40)
        out.append(EventRecord(f"e{n}", f"u{u}", f"item{i}", rng.randint(1, 5), T0 + n * 60))
    return out


def reference_top_n(engine: Recommender, sm: ServingModel, user: str, k: int, allowed: set[str] | None) -> list:
    """The pre-batching per-user path (foldin.py before the micro-batch change)."""
    state = engine.state
    history = state.history(user)
    exclude = set(history)
    if not any(i in sm.item_index for i in history):
        return state.popular(k, exclude, allowed)
    cols = [sm.item_index[i] for i in history if i in sm.item_index]
    vals = [history[i] for i in history if i in sm.item_index]
    data = np.maximum(np.log1p(np.asarray(vals, dtype=np.float64)).astype(np.float32), np.float32(1e-6))
    row = sp.csr_matrix((data, ([0] * len(cols), cols)), shape=(1, len(sm.item_ids)), dtype=np.float32)
    scores = sm.model.score(row)[0].astype(np.float64)
    for i in exclude:
        j = sm.item_index.get(i)
        if j is not None:
            scores[j] = -np.inf
    if allowed is not None:
        mask = np.full(scores.shape[0], -np.inf)
        for i in allowed:
            j = sm.item_index.get(i)
            if j is not None:
                mask[j] = 0.0
        scores = scores + mask
    items = [(sm.item_ids[j], float(scores[j])) for j in top_k_indices(scores, k) if np.isfinite(scores[j])]
    slots = min(engine.new_item_slots, k // 4)
    fresh = state.popular(slots, exclude | set(sm.item_index), allowed)
    if len(fresh) < slots:
        taken = {i for i, _ in fresh}
        for item, created in engine.arrivals():
            if len(fresh) >= slots or created <= sm.trained_at:
                break
            if item in exclude or item in sm.item_index or item in taken:
                continue
            if allowed is not None and item not in allowed:
                continue
            fresh.append((item, 0.0))
    if not fresh:
        return items[:k]
    kept = items[: k - len(fresh)]
    floor = kept[-1][1] if kept else 0.0
    step = max(abs(floor) * 1e-3, 1e-6)
    return kept + [(item, floor - step * (n + 1)) for n, (item, _) in enumerate(fresh)]


def assert_same(got: list[tuple[str, float]], want: list[tuple[str, float]], rtol: float = 1e-5) -> None:
    assert [i for i, _ in got] == [i for i, _ in want]
    np.testing.assert_allclose([s for _, s in got], [s for _, s in want], rtol=rtol, atol=1e-6)


# implicit's ALS user step runs in float32 with its own blocking over the users it is given, so a
# user's vector differs in the last float32 digits with the batch around it (seen: 8e-5 relative);
# every other model is exact to float64 rounding.
RTOL = {"als": 1e-3}


@pytest.fixture(scope="module")
def shop() -> tuple[InteractionState, list[EventRecord]]:
    evs = shop_events()
    state = InteractionState(WEIGHTS, 30 * 86400)
    state.apply_all(evs[:1200])
    return state, evs


@pytest.mark.parametrize("algorithm", sorted(ALGORITHMS))
def test_batched_equals_one_at_a_time(algorithm: str, shop: tuple[InteractionState, list[EventRecord]]) -> None:
    _base, evs = shop
    state = InteractionState(WEIGHTS, 30 * 86400)
    state.apply_all(evs[:1200])
    sm = fit_model(state, algorithm, {})
    sm.trained_at = T0 + 1200 * 60
    # After training: more events, new items the model has never seen, a newcomer, catalog arrivals.
    state.apply_all(evs[1200:])
    state.apply_all(
        [
            EventRecord("n1", "u3", "brand-new-1", 5, T0 + 2000 * 60),
            EventRecord("n2", "u5", "brand-new-2", 1, T0 + 2001 * 60),
            EventRecord("n3", "newcomer", "brand-new-1", 2, T0 + 2002 * 60),
        ]
    )
    arrivals = [("arrival-b", sm.trained_at + 20), ("arrival-a", sm.trained_at + 10), ("old", sm.trained_at - 5)]
    holder = ModelHolder()
    holder.swap(sm)
    engine = Recommender(state, holder, new_item_slots=2, arrivals=lambda: arrivals)
    users = state.users()
    assert "newcomer" in users and len(users) > 50

    batched = engine.top_n_many(users, K)
    assert set(batched) == set(users)
    for u in users:
        single = engine.top_n(u, K)
        rtol = RTOL.get(algorithm, 1e-5)
        assert batched[u].source == single.source
        assert_same(batched[u].items, single.items, rtol)
        assert_same(batched[u].items, reference_top_n(engine, sm, u, K, None), rtol)
    sources = {r.source for r in batched.values()}
    assert "personalized" in sources or algorithm == "popularity"
    assert batched["newcomer"].source == "popularity"
    # Batch composition changes nothing: any split of the users gives the same lists.
    for begin in range(0, len(users), 7):
        part = engine.top_n_many(users[begin : begin + 7], K)
        for u, r in part.items():
            assert_same(r.items, batched[u].items, RTOL.get(algorithm, 1e-5))


@pytest.mark.parametrize("algorithm", ["ease", "itemknn"])
def test_category_path_equals_reference(algorithm: str, shop: tuple[InteractionState, list[EventRecord]]) -> None:
    state, _ = shop
    sm = fit_model(state, algorithm, {})
    holder = ModelHolder()
    holder.swap(sm)
    cats = {f"item{i}": ("tops" if i % 2 else "shoes") for i in range(40)}
    engine = Recommender(state, holder, new_item_slots=2, categories=lambda: cats)
    allowed = {i for i, c in cats.items() if c == "tops"}
    for u in state.users()[:20]:
        got = engine.top_n(u, K, category="tops")
        assert all(cats[i] == "tops" for i, _ in got.items)
        assert_same(got.items, reference_top_n(engine, sm, u, K, allowed))


def test_top_k_rows_matches_top_k_indices_with_ties_and_masks() -> None:
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 5, size=(30, 50)).astype(np.float64)  # many ties
    scores[rng.random(scores.shape) < 0.3] = -np.inf
    rows = top_k_rows(scores, 10)
    for r in range(scores.shape[0]):
        assert rows[r].tolist() == top_k_indices(scores[r], 10).tolist()
    assert top_k_rows(scores[:0], 10).shape == (0, 0) or top_k_rows(scores[:0], 10).shape[0] == 0


def test_apply_many_is_apply_one_by_one() -> None:
    evs = shop_events(3)[:400]
    evs = evs + evs[:50]  # duplicates inside one batch and across
    one = InteractionState(WEIGHTS, 30 * 86400)
    flags_one = [one.apply(e) for e in evs]
    many = InteractionState(WEIGHTS, 30 * 86400)
    flags_many = many.apply_many(evs[:200]) + many.apply_many(evs[200:])
    assert flags_one == flags_many
    assert sum(flags_many) == 400
    assert one.histories(one.users()) == many.histories(one.users())
    assert one.popular(20) == many.popular(20)
    assert one.n_pairs == many.n_pairs


def test_popularity_ranking_cache_follows_the_state() -> None:
    s = InteractionState(WEIGHTS, 30 * 86400)
    s.apply(EventRecord("1", "u", "a", 1, T0))
    assert [i for i, _ in s.popular(5)] == ["a"]
    s.apply(EventRecord("2", "v", "b", 5, T0))
    assert [i for i, _ in s.popular(5)] == ["b", "a"]
    s.forget("v")
    assert [i for i, _ in s.popular(5)] == ["a"]


@pytest.mark.parametrize("algorithm", ["ease", "itemknn", "history"])
def test_stored_weights_and_a_scale_answer_as_decayed_weights(
    algorithm: str, shop: tuple[InteractionState, list[EventRecord]]
) -> None:
    """The consumer hands the fold-in stored sums and one decay factor (a C-speed copy) instead of
    decayed weights (a Python loop per item): the same products, so the very same lists."""
    state, _ = shop
    sm = fit_model(state, algorithm, {})
    holder = ModelHolder()
    holder.swap(sm)
    engine = Recommender(state, holder, new_item_slots=2)
    users = state.users()
    stored, scale = state.stored_histories(users)
    decayed = state.histories(users)
    assert {u: {i: w * scale for i, w in h.items()} for u, h in stored.items()} == decayed
    assert scale != 1.0
    got = engine.top_n_many(users, K, histories=stored, scale=scale)
    want = engine.top_n_many(users, K, histories=decayed)
    assert all(got[u].items == want[u].items for u in users)
