"""repeat_policy in scoring, in process (issue 20): the setting, the per-event-type rebuy record,
the batched blend in the fold-in, the artifact round trip, and the refusal of unknown policies
by the real service entry point."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from pydantic import ValidationError

from cli.localstack.stack import REPO
from services.scoring.config import ScoringSettings
from services.scoring.foldin import ModelHolder, Recommender
from services.scoring.interactions import EventRecord, InteractionState
from services.scoring.models.blend import RepeatBlend, RepeatWeights, neutral_stats
from services.scoring.registry import artifact_bytes, parse_artifact, parse_repeat
from services.scoring.repeat_learning import learn_repeat
from services.scoring.trainer import fit_model
from tests.scoring.test_batched_foldin import WEIGHTS, shop_events

DAY = 86400.0
T0 = 1_750_000_000.0


def decay_state(purchase_days: float = 365.0, view_days: float = 7.0) -> InteractionState:
    s = ScoringSettings(repeat_policy="decay", repeat_half_life_purchase_days=purchase_days,
                        repeat_half_life_view_days=view_days)  # fmt: skip
    return InteractionState(WEIGHTS, 30 * DAY, repeat_half_lives_s=s.repeat_half_lives_s())


def test_unknown_policy_is_refused_naming_the_allowed() -> None:
    with pytest.raises(ValidationError, match="allowed: off, decay"):
        ScoringSettings(repeat_policy="sometimes")
    assert ScoringSettings().repeat_half_lives_s() is None


def test_service_refuses_to_start_with_an_unknown_policy() -> None:
    env = {**os.environ, "STYLEREC_REPEAT_POLICY": "sometimes", "PYTHONPATH": f"{REPO}:{REPO / 'gen'}"}
    res = subprocess.run([sys.executable, "-m", "services.scoring"], env=env, cwd=REPO, capture_output=True,
                         text=True, timeout=60)  # fmt: skip
    assert res.returncode == 2, res.stderr
    assert "repeat_policy" in res.stderr and "allowed: off, decay" in res.stderr
    assert "Traceback" not in res.stderr


def test_purchases_and_views_fade_at_their_own_pace() -> None:
    state = decay_state(purchase_days=100.0, view_days=1.0)
    state.apply_many([
        EventRecord("p", "u", "bought", 5, T0),
        EventRecord("v", "u", "viewed", 1, T0),
        EventRecord("x", "other", "later", 1, T0 + 10 * DAY),  # moves the state's clock 10 days on
    ])  # fmt: skip
    counts, decayed, age, rates, distinct = state.repeat_histories(["u"], {"bought": 0, "viewed": 1, "later": 2})
    w = dict(zip(decayed.indices.tolist(), decayed.data.tolist(), strict=True))
    assert w[0] == pytest.approx(10.0 * 2 ** (-10 / 100))  # purchase weight 10, 10 days of a 100-day half-life
    assert w[1] == pytest.approx(1.0 * 2**-10)  # a view fades in days
    assert sorted(age.data.tolist()) == [pytest.approx(11.0)] * 2  # 10 days + 1
    assert counts.data.tolist() == [1.0, 1.0] and rates.tolist() == [0.0] and distinct.tolist() == [2.0]
    # out of order: an older purchase adds its decayed weight, the record stays exact
    state.apply(EventRecord("p0", "u", "bought", 5, T0 - 100 * DAY))
    _, decayed, _, rates, _ = state.repeat_histories(["u"], {"bought": 0})
    assert decayed.data[0] == pytest.approx(10.0 * 2 ** (-10 / 100) + 10.0 * 2 ** (-110 / 100))
    assert rates[0] == pytest.approx(1 - 2 / 3)
    assert state.forget("u") == 3
    counts, *_ = state.repeat_histories(["u"], {"bought": 0})
    assert counts.nnz == 0


def engine_with(policy_repeat: bool) -> tuple[Recommender, InteractionState]:
    state = decay_state()
    events = shop_events()
    state.apply_many(events)
    sm = fit_model(state, "ease", {})
    sm.repeat = learn_repeat(ScoringSettings(repeat_policy="decay"), events, state, sm.item_index, "ease", {})
    holder = ModelHolder()
    holder.swap(sm)
    return Recommender(state, holder, new_item_slots=0, repeat=policy_repeat), state


def test_decay_lists_own_items_marked_and_off_never() -> None:
    engine, state = engine_with(True)
    users = [f"u{n}" for n in range(20)]
    blended = engine.top_n_many(users, 10, exclude_seen=False)
    plain = engine.top_n_many(users, 10, exclude_seen=True)
    own_listed = 0
    for u in users:
        history = set(state.history(u))
        ids = [i for i, _ in blended[u].items]
        assert blended[u].rebuys == frozenset(i for i in ids if i in history)
        own_listed += len(blended[u].rebuys)
        assert not {i for i, _ in plain[u].items} & history and plain[u].rebuys == frozenset()
    assert own_listed > 0  # shoppers of this synthetic shop come back to their items
    off, _ = engine_with(False)
    assert all(r.rebuys == frozenset() for r in off.top_n_many(users, 10, exclude_seen=False).values())


def test_batched_blend_equals_one_user_at_a_time() -> None:
    engine, _ = engine_with(True)
    users = [f"u{n}" for n in range(15)]
    batch = engine.top_n_many(users, 10, exclude_seen=False)
    for u in users:
        alone = engine.top_n(u, 10, exclude_seen=False)
        assert [i for i, _ in alone.items] == [i for i, _ in batch[u].items]
        assert np.allclose([s for _, s in alone.items], [s for _, s in batch[u].items], rtol=1e-5)


def test_blend_travels_in_the_artifact() -> None:
    engine, _ = engine_with(True)
    sm = engine.holder.get()
    assert sm is not None and sm.repeat is not None
    data = artifact_bytes(sm)
    _, ids = parse_artifact(data)
    back = parse_repeat(data, len(ids))
    assert back is not None and back.weights.as_dict() == sm.repeat.weights.as_dict()
    assert np.array_equal(back.stats.rebuy, sm.repeat.stats.rebuy) and back.learned_on == sm.repeat.learned_on
    sm.repeat = None
    assert parse_repeat(artifact_bytes(sm), len(ids)) is None
    assert RepeatBlend(RepeatWeights(), neutral_stats(3)).meta()["weights"]["bias"] < 0
