"""Learning the rebuy blend's weights at training time (repeat_policy decay).

The evaluation learns them on a validation split (services/scoring/evaluation/harness.py);
training does the same on the archive it trains from: the newest ``HOLDOUT`` of the events (by
time) is held out, a model of the same algorithm and parameters is fitted on the rest, and the
weights are fitted on which of each shopper's candidates (own items + the CF model's new ones)
they went on to buy. The weights, and item statistics from the whole archive, travel in the
model artifact. With too little held-out data to learn from (a young shop), the weights learned
on Online Retail (blend.DEFAULT_WEIGHTS) are used and the registry says so.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np

from services.scoring.config import PURCHASE, ScoringSettings
from services.scoring.interactions import EventRecord, InteractionState
from services.scoring.models import make_model
from services.scoring.models.blend import (
    TREND_HALF_LIFE_DAYS,
    ItemStats,
    RepeatBlend,
    RepeatWeights,
    UserHistory,
    candidates,
    fit_weights,
    item_stats,
    labels_for,
)

log = logging.getLogger(__name__)

HOLDOUT = 0.2  # newest share of the events held out to learn from
MIN_POSITIVES = 20  # held-out (user, candidate) purchases needed to trust learned weights
BATCH = 512


def new_state(settings: ScoringSettings) -> InteractionState:
    return InteractionState(
        settings.event_weights(), settings.half_life_days * 86400, repeat_half_lives_s=settings.repeat_half_lives_s()
    )


def stats_from(state: InteractionState, events: Sequence[EventRecord], item_index: dict[str, int]) -> ItemStats:
    """Item rebuy share, trend and popularity over ``item_index`` from a state and its events."""
    users = state.users()
    counts = state.repeat_histories(users, item_index)[0]
    ref = max((ev.ts for ev in events), default=0.0)
    cols = np.fromiter((item_index.get(ev.item_id, -1) for ev in events), dtype=np.int64, count=len(events))
    ts = np.fromiter((ev.ts for ev in events), dtype=np.float64, count=len(events))
    keep = cols >= 0
    trend = np.bincount(
        cols[keep], weights=np.exp2(-(ref - ts[keep]) / (TREND_HALF_LIFE_DAYS * 86400)), minlength=len(item_index)
    )
    return item_stats(counts, trend)


def learn_repeat(
    settings: ScoringSettings,
    events: Sequence[EventRecord],
    state: InteractionState,
    item_index: dict[str, int],
    algorithm: str,
    params: dict[str, Any],
) -> RepeatBlend:
    """The blend for a model trained on ``state`` (all of ``events``) over ``item_index``."""
    stats = stats_from(state, events, item_index)
    try:
        weights, note = learn_weights(settings, events, item_index, algorithm, params)
    except ValueError as exc:
        log.warning("rebuy weights not learned; using defaults", extra={"reason": str(exc)})
        weights, note = RepeatWeights(), f"defaults (Online Retail): {exc}"
    return RepeatBlend(weights, stats, note)


def learn_weights(
    settings: ScoringSettings,
    events: Sequence[EventRecord],
    item_index: dict[str, int],
    algorithm: str,
    params: dict[str, Any],
) -> tuple[RepeatWeights, str]:
    if not events:
        raise ValueError("no events")
    ts = np.fromiter((ev.ts for ev in events), dtype=np.float64, count=len(events))
    cutoff = float(np.quantile(ts, 1.0 - HOLDOUT))
    past = new_state(settings)
    past.apply_all(ev for ev, t in zip(events, ts, strict=True) if t < cutoff)
    X, users, _ = past.matrix(item_index)
    if X.nnz == 0:
        raise ValueError("nothing before the held-out part")
    model = make_model(algorithm, **params)
    model.fit(X)
    row_of = {u: r for r, u in enumerate(users)}
    later = [ev for ev, t in zip(events, ts, strict=True) if t >= cutoff and ev.user_id in row_of]
    bought = [ev for ev in later if ev.type == PURCHASE] or later
    t_rows = np.asarray([row_of[ev.user_id] for ev in bought if ev.item_id in item_index], dtype=np.int64)
    t_items = np.asarray([item_index[ev.item_id] for ev in bought if ev.item_id in item_index], dtype=np.int64)
    stats = stats_from(past, [ev for ev, t in zip(events, ts, strict=True) if t < cutoff], item_index)
    feats: list[np.ndarray] = []
    labels: list[np.ndarray] = []
    for start in range(0, len(users), BATCH):
        part = users[start : start + BATCH]
        hist = UserHistory(*past.repeat_histories(part, item_index))
        c = candidates(model.score(X[start : start + len(part)]), hist, stats)
        sel = (t_rows >= start) & (t_rows < start + len(part))
        feats.append(c.features)
        labels.append(labels_for(c, t_rows[sel] - start, t_items[sel]))
    y = np.concatenate(labels) if labels else np.zeros(0)
    positives = int(y.sum())
    if positives < MIN_POSITIVES or positives == y.size:
        raise ValueError(f"{positives} held-out purchases among {y.size} candidates (need {MIN_POSITIVES})")
    weights = fit_weights(np.vstack(feats), y)
    return weights, f"newest {HOLDOUT:.0%} of the archive held out: {positives} purchases among {y.size} candidates"
