"""Interaction state, fold-in, new-item slots, atomic model swap and style profiles (in process)."""

from __future__ import annotations

import random
import threading
import time

import numpy as np
import pytest

from services.scoring.foldin import ModelHolder, Recommender
from services.scoring.interactions import EventRecord, InteractionState
from services.scoring.registry import ServingModel, artifact_bytes, parse_artifact
from services.scoring.style_profile import compute_profile
from services.scoring.trainer import fit_model

WEIGHTS = {1: 1.0, 2: 2.0, 3: 4.0, 4: 6.0, 5: 10.0}
DAY = 86400.0
T0 = 1_750_000_000.0


def events() -> list[EventRecord]:
    """Cluster A (a0-a2) and cluster B (b0-b2), ten users each side."""
    out = []
    n = 0
    for u in range(10):
        for cluster in ("a", "b"):
            for i in range(3):
                if (u + i) % 4 == 3:
                    continue
                out.append(EventRecord(f"e{n}", f"{cluster}user{u}", f"{cluster}{i}", 5, T0 + n))
                n += 1
    return out


def state_of(evs: list[EventRecord]) -> InteractionState:
    s = InteractionState(WEIGHTS, 30 * DAY)
    s.apply_all(evs)
    return s


def test_state_is_a_function_of_the_event_set() -> None:
    evs = events()
    shuffled = evs[:]
    random.Random(3).shuffle(shuffled)
    a, b = state_of(evs), state_of(shuffled + evs[:5])  # other order, plus replayed duplicates
    assert b.events == a.events == len(evs)
    Xa, ua, ia = a.matrix()
    Xb, _, ib = b.matrix(users=ua)
    assert ia == ib
    np.testing.assert_allclose(Xa.toarray(), Xb.toarray(), rtol=1e-6)


def test_weights_and_time_decay() -> None:
    s = InteractionState(WEIGHTS, 10 * DAY)
    s.apply(EventRecord("1", "u", "viewed", 1, T0))
    s.apply(EventRecord("2", "u", "bought", 5, T0))
    s.apply(EventRecord("3", "u", "old-purchase", 5, T0 - 10 * DAY))
    h = s.history("u")
    assert h["bought"] == pytest.approx(10 * h["viewed"])
    assert h["old-purchase"] == pytest.approx(h["bought"] / 2)  # one half-life older


def serving(state: InteractionState, algorithm: str = "ease", **params: float) -> ServingModel:
    return fit_model(state, algorithm, dict(params))


def test_fold_in_changes_recommendations_without_retraining() -> None:
    state = state_of(events())
    holder = ModelHolder()
    holder.swap(serving(state))
    engine = Recommender(state, holder, new_item_slots=0)
    state.apply(EventRecord("n1", "newbie", "a0", 5, T0 + 1000))
    first = engine.top_n("newbie", 2)
    assert first.source == "personalized" and {i for i, _ in first.items} == {"a1", "a2"}
    for n, item in enumerate(("b0", "b1", "b0", "b1")):
        state.apply(EventRecord(f"n{n + 2}", "newbie", item, 5, T0 + 2000 + n))
    second = engine.top_n("newbie", 2)
    assert "b2" in {i for i, _ in second.items}
    assert second.version == first.version  # same model: the change is the fold-in


def test_unknown_user_gets_popularity_and_new_items_get_slots() -> None:
    state = state_of(events())
    holder = ModelHolder()
    holder.swap(serving(state))
    engine = Recommender(state, holder, new_item_slots=1)
    assert engine.top_n("stranger", 3).source == "popularity"
    # A brand-new item, unknown to the model, becomes popular: it takes the reserved slot.
    for n in range(30):
        state.apply(EventRecord(f"x{n}", f"fan{n}", "brand-new", 5, T0 + 5000 + n))
    recs = engine.top_n("auser0", 4)
    assert recs.items[-1][0] == "brand-new"
    assert recs.items[-1][1] < recs.items[-2][1]
    # A list shorter than four is the model's alone.
    assert "brand-new" not in [i for i, _ in engine.top_n("auser0", 3).items]


def test_new_catalog_arrivals_fill_remaining_slots() -> None:
    state = state_of(events())
    holder = ModelHolder()
    sm = serving(state)
    holder.swap(sm)
    arrivals = [("just-listed", sm.trained_at + 10), ("a0", sm.trained_at + 5), ("old-stock", sm.trained_at - 10)]
    engine = Recommender(state, holder, new_item_slots=2, arrivals=lambda: arrivals)
    ids = [i for i, _ in engine.top_n("auser0", 4).items]
    assert ids[-1] == "just-listed"  # newer than the model, never interacted with: gets a slot
    assert "old-stock" not in ids  # created before training: the model had its chance


def test_artifact_round_trip_keeps_item_index() -> None:
    sm = serving(state_of(events()), "itemknn")
    model, item_ids = parse_artifact(artifact_bytes(sm))
    assert item_ids == sm.item_ids and model.algorithm == "itemknn"


def test_atomic_swap_under_concurrent_topn() -> None:
    """Readers never see a mix: every answer's items belong to the version it reports."""
    state = state_of(events())
    holder = ModelHolder()
    m1 = serving(state, "ease")
    m2 = serving(state, "itemknn")
    m2.trained_at = m1.trained_at + 1
    expected = {}
    engine = Recommender(state, holder, new_item_slots=0)
    for sm in (m1, m2):
        holder._current = sm  # compute each version's answer alone
        expected[sm.version] = engine.top_n("auser1", 3).items
    holder._current = None
    holder.swap(m1)
    stop = threading.Event()
    seen: dict[str, int] = {}
    errors: list[str] = []

    def reader() -> None:
        while not stop.is_set():
            r = engine.top_n("auser1", 3)
            seen[r.version] = seen.get(r.version, 0) + 1
            if r.items != expected[r.version]:
                errors.append(r.version)

    threads = [threading.Thread(target=reader) for _ in range(4)]
    for t in threads:
        t.start()
    for n in range(200):
        sm = m2 if n % 2 == 0 else m1
        holder._current = sm  # flip back and forth as fast as possible
        time.sleep(0.0005)
    holder._current = m1
    assert holder.swap(m2)
    time.sleep(0.05)
    stop.set()
    for t in threads:
        t.join()
    assert not errors
    assert set(seen) == {m1.version, m2.version}
    assert holder.version == m2.version
    assert not holder.swap(m1)  # an older model never replaces a newer one


def test_style_profile_anchor_confidence_and_vector() -> None:
    e = {f"i{n}": np.eye(4, dtype=np.float32)[n % 4] for n in range(4)}
    coherent = compute_profile({"i0": 10.0, "i1": 1.0}, e, half_confidence_weight=5.0)
    mixed = compute_profile({"i0": 5.0, "i2": 5.0, "i1": 1.0}, e, half_confidence_weight=5.0)
    assert coherent is not None and mixed is not None
    assert coherent.anchor == "i0"
    assert abs(float(np.linalg.norm(coherent.vector)) - 1.0) < 1e-5
    assert coherent.confidence > mixed.confidence
    assert compute_profile({"no-photo": 3.0}, e, 5.0) is None
    few = compute_profile({"i0": 0.5}, e, 5.0)
    assert few is not None and few.confidence < coherent.confidence
