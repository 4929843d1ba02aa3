"""Algorithms by name, and loading an artifact back into a model."""

from __future__ import annotations

import io
import json
from typing import Any

import numpy as np

from services.scoring.models.als import ALS
from services.scoring.models.base import Recommender, top_k_indices
from services.scoring.models.bpr import BPR
from services.scoring.models.ease import EASE
from services.scoring.models.history import History
from services.scoring.models.itemknn import ItemKNN
from services.scoring.models.popularity import Popularity

ALGORITHMS: dict[str, type[Recommender]] = {
    cls.algorithm: cls for cls in (Popularity, ItemKNN, ALS, BPR, EASE, History)
}


def make_model(algorithm: str, **params: Any) -> Recommender:
    try:
        cls = ALGORITHMS[algorithm]
    except KeyError:
        raise ValueError(f"unknown algorithm {algorithm!r}; known: {sorted(ALGORITHMS)}") from None
    return cls(**params)


def model_from_bytes(data: bytes) -> Recommender:
    """Inverse of :meth:`Recommender.to_bytes`; rejects artifacts of unknown algorithms."""
    with np.load(io.BytesIO(data), allow_pickle=False) as npz:
        meta = json.loads(npz["__meta__"].tobytes().decode())
        arrays = {k: npz[k] for k in npz.files if k != "__meta__"}
    model = make_model(meta["algorithm"], **meta["params"])
    model.load_arrays(arrays)
    return model


__all__ = ["ALGORITHMS", "Recommender", "make_model", "model_from_bytes", "top_k_indices"]
