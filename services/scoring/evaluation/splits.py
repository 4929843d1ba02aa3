"""Train/test protocols. Each returns boolean masks over the interaction table.

``stratified_item`` mirrors the public `recommenders` benchmark
(``python_stratified_split(filter_by="item", ratio=0.75, seed=42)``): every item's
interactions are shuffled with the same seed and the first round(0.75·n) go to
training. Without pandas the shuffles cannot be bit-identical to theirs; the
protocol (and thus the expected metric level) is the same.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from services.scoring.evaluation.datasets import Interactions

PROTOCOLS = ("stratified-item", "temporal", "leave-last-out")


@dataclass
class Split:
    protocol: str
    train: np.ndarray  # bool mask
    test: np.ndarray  # bool mask
    params: dict[str, float | int | str]


def stratified_item(data: Interactions, ratio: float = 0.75, seed: int = 42) -> Split:
    train = np.zeros(len(data), dtype=bool)
    order = np.argsort(data.items, kind="stable")
    bounds = np.flatnonzero(np.diff(data.items[order])) + 1
    for group in np.split(order, bounds):
        perm = np.random.RandomState(seed).permutation(len(group))
        n_train = round(ratio * len(group))
        train[group[perm[:n_train]]] = True
    return Split("stratified-item", train, ~train, {"ratio": ratio, "seed": seed, "filter_by": "item"})


def temporal(data: Interactions, test_fraction: float = 0.2) -> Split:
    """Global cutoff: the last ``test_fraction`` of interactions in time are the test set."""
    cutoff = float(np.quantile(data.ts, 1.0 - test_fraction))
    train = data.ts < cutoff
    return Split("temporal", train, ~train, {"test_fraction": test_fraction, "cutoff_ts": cutoff})


def leave_last_out(data: Interactions) -> Split:
    """Each user's latest interaction (users with at least two) is held out."""
    order = np.lexsort((np.arange(len(data)), data.ts, data.users))
    last = np.ones(len(order), dtype=bool)
    last[:-1] = data.users[order][1:] != data.users[order][:-1]
    counts = np.bincount(data.users, minlength=data.n_users)
    test = np.zeros(len(data), dtype=bool)
    sel = order[last]
    test[sel[counts[data.users[sel]] >= 2]] = True
    return Split("leave-last-out", ~test, test, {})


def make_split(data: Interactions, protocol: str, seed: int = 42) -> Split:
    if protocol == "stratified-item":
        return stratified_item(data, seed=seed)
    if protocol == "temporal":
        return temporal(data)
    if protocol == "leave-last-out":
        return leave_last_out(data)
    raise ValueError(f"unknown protocol {protocol!r}; known: {', '.join(PROTOCOLS)}")


def subset(data: Interactions, mask: np.ndarray, name_suffix: str = "") -> Interactions:
    """Rows of ``data`` under ``mask``, keeping the same user/item codes (for validation carving)."""
    return Interactions(
        name=data.name + name_suffix,
        users=data.users[mask],
        items=data.items[mask],
        values=data.values[mask],
        ts=data.ts[mask],
        user_ids=data.user_ids,
        item_ids=data.item_ids,
        synthetic=data.synthetic,
        notes=data.notes,
    )
