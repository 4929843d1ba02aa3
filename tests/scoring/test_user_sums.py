"""Heavy shoppers' kept score sums (services/scoring/user_sums.py) give bit-for-bit the answer of the
product over the whole history, whatever the order events came in, and stay bounded."""

from __future__ import annotations

import dataclasses
import random

import numpy as np
import pytest

from services.scoring import metrics
from services.scoring.foldin import ModelHolder, Recommender
from services.scoring.interactions import EventRecord, InteractionState
from services.scoring.models.base import FIXED_POINT_BOUND, fixed_point
from services.scoring.registry import ServingModel
from services.scoring.trainer import fit_model
from services.scoring.user_sums import UserSums
from tests.scoring.test_batched_foldin import WEIGHTS, shop_events

K = 12


def counter(outcome: str) -> float:
    return metrics.USER_SUMS.labels(outcome)._value.get()


@pytest.fixture(scope="module")
def model() -> ServingModel:
    state = InteractionState(WEIGHTS, 30 * 86400)
    state.apply_all(shop_events()[:1200])
    return fit_model(state, "ease", {})


def engines(sm: ServingModel, state: InteractionState, sums: UserSums) -> tuple[Recommender, Recommender]:
    holder = ModelHolder()
    holder.swap(sm)
    return Recommender(state, holder, new_item_slots=2), Recommender(state, holder, new_item_slots=2, user_sums=sums)


def test_fixed_point_keeps_every_sum_in_int32_and_the_float_values() -> None:
    rng = np.random.default_rng(3)
    M = (rng.standard_normal((300, 300)) * rng.random((300, 300)) ** 6).astype(np.float32)
    M[:, 7] *= 1000.0  # one column whose sums are far larger than the rest
    fp = fixed_point(M)
    assert fp.rows.dtype == np.int32
    # The largest sum any set of items can reach stays inside int32.
    assert int(np.abs(fp.rows.astype(np.int64)).sum(axis=0).max()) < 2**31
    assert float(np.abs(M).sum(axis=0, dtype=np.float64).max()) / fp.scale <= FIXED_POINT_BOUND
    x = (rng.random((20, 300)) < 0.3).astype(np.int32)
    got = fp.scores(x @ fp.rows)
    want = x.astype(np.float64) @ M.astype(np.float64)
    np.testing.assert_allclose(got, want, rtol=0, atol=4 * 300 * fp.scale + 1e-6 * np.abs(want).max())


def test_ease_scores_in_fixed_point_and_keeps_float_b_for_the_artifact(model: ServingModel) -> None:
    sums = model.model.item_sums()
    assert sums is not None
    B = model.model.arrays()["B"]
    assert B.dtype == np.float32
    np.testing.assert_array_equal(sums.rows, fixed_point(B).rows)


def test_kept_sums_answer_exactly_as_the_product(model: ServingModel) -> None:
    """Events streamed in batches: each batch's users are folded in by both engines; every list
    and every score is identical (==, not close), while most fold-ins reused kept sums."""
    state = InteractionState(WEIGHTS, 30 * 86400)
    evs = shop_events(11)
    sums = UserSums(max_users=1000, min_items=3)
    plain, kept = engines(model, state, sums)
    reused0, built0 = counter("reused"), counter("built")
    for begin in range(0, len(evs), 40):
        chunk = evs[begin : begin + 40]
        state.apply_many(chunk)
        users = sorted({e.user_id for e in chunk})
        want = plain.top_n_many(users, K)
        got = kept.top_n_many(users, K)
        for u in users:
            assert got[u].items == want[u].items, u
            assert got[u].source == want[u].source
    assert counter("reused") - reused0 > 5 * (counter("built") - built0) > 0
    assert 0 < len(sums) <= 60


def test_order_of_events_does_not_change_a_single_bit(model: ServingModel) -> None:
    """Two replicas, the same events in opposite orders (one with kept sums extended batch by
    batch, one scoring the whole history at the end): the same scores, exactly."""
    evs = shop_events(5)
    forward, backward = InteractionState(WEIGHTS, 30 * 86400), InteractionState(WEIGHTS, 30 * 86400)
    sums = UserSums(max_users=1000, min_items=1)
    _, kept = engines(model, forward, sums)
    for begin in range(0, len(evs), 25):
        chunk = evs[begin : begin + 25]
        forward.apply_many(chunk)
        kept.top_n_many({e.user_id for e in chunk}, K)
    backward.apply_all(list(reversed(evs)))
    plain, _ = engines(model, backward, UserSums(0, 1))
    users = forward.users()
    assert list(forward.history(users[0])) != list(backward.history(users[0]))  # other insertion order
    got, want = kept.top_n_many(users, K), plain.top_n_many(users, K)
    assert all(got[u].items == want[u].items for u in users)


def test_a_history_that_does_not_extend_the_entry_is_summed_again(model: ServingModel) -> None:
    state = InteractionState(WEIGHTS, 30 * 86400)
    sums = UserSums(max_users=10, min_items=1)
    plain, kept = engines(model, state, sums)
    items = model.item_ids
    first = {items[0]: 1.0, items[1]: 1.0, items[2]: 1.0}
    other = {items[0]: 1.0, items[3]: 1.0, items[4]: 1.0, items[5]: 1.0}  # longer, not an extension
    older = {items[0]: 1.0}  # shorter: an older snapshot of the same history
    # new entry; not an extension; shorter than the entry; an extension of the last one
    for history, rebuilt in ((first, 1), (other, 1), (older, 1), (other, 0)):
        built = counter("built")
        got = kept.top_n_many(["u"], K, histories={"u": history})["u"]
        want = plain.top_n_many(["u"], K, histories={"u": history})["u"]
        assert got.items == want.items
        assert counter("built") == built + rebuilt
    # A new model version never extends sums of the old one.
    newer = dataclasses.replace(model, version=model.version + "-b")
    holder = ModelHolder()
    holder.swap(newer)
    built = counter("built")
    Recommender(state, holder, user_sums=sums).top_n_many(["u"], K, histories={"u": other})
    assert counter("built") == built + 1


def test_entries_are_bounded_and_forgetting_a_user_drops_theirs(model: ServingModel) -> None:
    state = InteractionState(WEIGHTS, 30 * 86400)
    state.apply_all(shop_events(2))
    sums = UserSums(max_users=5, min_items=1)
    _, kept = engines(model, state, sums)
    users = state.users()
    kept.top_n_many(users, K)
    assert len(sums) == 5
    assert metrics.USER_SUMS_BYTES._value.get() > 5 * len(model.item_ids) * 5
    last = users[-1]
    assert last in sums._entries
    state.forget(last)
    assert last not in sums._entries and len(sums) == 4


def test_short_histories_get_no_entry(model: ServingModel) -> None:
    state = InteractionState(WEIGHTS, 30 * 86400)
    rng = random.Random(1)
    state.apply_all([EventRecord(f"e{n}", "light", model.item_ids[rng.randrange(10)], 1, 1.75e9 + n) for n in range(3)])
    sums = UserSums(max_users=5, min_items=50)
    _, kept = engines(model, state, sums)
    assert kept.top_n("light", K).source == "personalized"
    assert len(sums) == 0
