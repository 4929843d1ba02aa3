"""Model registry: one MongoDB document per version, the artifact in GridFS.

A version is immutable once published; "the current model" is simply the newest
successful version, so publishing is a single insert (atomic in any MongoDB) and a
serving replica that missed a ``model-updates`` message still finds it by polling.
Only plain queries are used (the embedded Mongo-protocol server has no reliable
aggregation), and old versions are pruned so GridFS does not grow without bound.
"""

from __future__ import annotations

import io
import json
import logging
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import gridfs
import numpy as np
from pymongo.database import Database

from libs.common.stores import with_retries
from services.scoring.models import Recommender, model_from_bytes
from services.scoring.models.blend import ItemStats, RepeatBlend, RepeatWeights

log = logging.getLogger(__name__)


@dataclass
class ServingModel:
    """A trained model plus the item-id mapping and registry facts needed to serve it."""

    version: str
    model: Recommender
    item_ids: list[str]
    algorithm: str
    parameters: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    data_watermark: float = 0.0
    trained_at: float = 0.0
    users: int = 0
    item_index: dict[str, int] = field(default_factory=dict)
    # Learned rebuy blend (repeat_policy decay); None for models trained with the policy off.
    repeat: RepeatBlend | None = None

    def __post_init__(self) -> None:
        if not self.item_index:
            self.item_index = {it: j for j, it in enumerate(self.item_ids)}


def new_version(algorithm: str) -> str:
    """Sortable by time, unique across concurrent trainers."""
    return f"{algorithm}-{datetime.now(UTC).strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:6]}"


def artifact_bytes(sm: ServingModel) -> bytes:
    """The model's own npz plus the item ids, in one npz (no pickle anywhere)."""
    buf = io.BytesIO()
    extra: dict[str, np.ndarray] = {}
    if sm.repeat is not None:
        # The rebuy blend travels with the model it was learned for (docs/evaluation.md).
        extra = {
            "repeat": np.frombuffer(json.dumps(sm.repeat.meta()).encode(), dtype=np.uint8),
            **sm.repeat.stats.arrays(),
        }
    arrays: dict[str, Any] = {
        "model": np.frombuffer(sm.model.to_bytes(), dtype=np.uint8),
        "item_ids": np.asarray(sm.item_ids, dtype=np.str_),
        **extra,
    }
    np.savez(buf, **arrays)
    return buf.getvalue()


def parse_artifact(data: bytes) -> tuple[Recommender, list[str]]:
    with np.load(io.BytesIO(data), allow_pickle=False) as npz:
        model = model_from_bytes(npz["model"].tobytes())
        item_ids = [str(x) for x in npz["item_ids"]]
    if model.n_items != len(item_ids):
        raise ValueError(f"artifact corrupt: model has {model.n_items} items, index has {len(item_ids)}")
    return model, item_ids


def parse_repeat(data: bytes, n_items: int) -> RepeatBlend | None:
    """The artifact's rebuy blend; None in artifacts trained without one (policy off, or older)."""
    with np.load(io.BytesIO(data), allow_pickle=False) as npz:
        if "repeat" not in npz.files:
            return None
        meta = json.loads(npz["repeat"].tobytes().decode())
        stats = ItemStats.from_arrays({k: npz[k] for k in npz.files if k.startswith("repeat_item_")})
    if stats.rebuy.shape[0] != n_items:
        raise ValueError("artifact corrupt: rebuy item statistics do not match the item index")
    weights = RepeatWeights({k: float(v) for k, v in meta["weights"].items()})
    return RepeatBlend(weights, stats, str(meta.get("learned_on", "")))


class ModelRegistry:
    def __init__(self, db: Database, collection: str = "models") -> None:
        self.col = db[collection]
        self.fs = gridfs.GridFS(db)

    def publish(self, sm: ServingModel) -> str:
        data = artifact_bytes(sm)
        file_id = with_retries(
            lambda: self.fs.put(
                data, filename=f"model-{sm.version}.npz", metadata={"kind": "model", "version": sm.version}
            )
        )
        doc = {
            "_id": sm.version,
            "algorithm": sm.algorithm,
            "parameters": {k: str(v) for k, v in sm.parameters.items()},
            "metrics": {k: float(v) for k, v in sm.metrics.items()},
            "data_watermark": float(sm.data_watermark),
            "trained_at": float(sm.trained_at),
            "artifact_ref": str(file_id),
            "users": int(sm.users),
            "items": len(sm.item_ids),
            "status": "ok",
        }
        if sm.repeat is not None:
            doc["repeat"] = sm.repeat.meta()
        with_retries(lambda: self.col.replace_one({"_id": sm.version}, doc, upsert=True))
        return str(file_id)

    def versions(self) -> list[dict[str, Any]]:
        """All successful versions, newest first (sorted here: plain find only)."""
        docs = list(with_retries(lambda: list(self.col.find({"status": "ok"}))))
        return sorted(docs, key=lambda d: (float(d.get("trained_at", 0.0)), str(d["_id"])), reverse=True)

    def latest(self) -> dict[str, Any] | None:
        docs = self.versions()
        return docs[0] if docs else None

    def load(self, doc: dict[str, Any]) -> ServingModel:
        from bson import ObjectId

        data = with_retries(lambda: self.fs.get(ObjectId(doc["artifact_ref"])).read())
        model, item_ids = parse_artifact(data)
        repeat = parse_repeat(data, len(item_ids))
        params: dict[str, Any] = dict(model.params)
        return ServingModel(
            version=str(doc["_id"]),
            model=model,
            item_ids=item_ids,
            algorithm=str(doc["algorithm"]),
            parameters=params,
            metrics=dict(doc.get("metrics", {})),
            data_watermark=float(doc.get("data_watermark", 0.0)),
            trained_at=float(doc.get("trained_at", 0.0)),
            users=int(doc.get("users", 0)),
            repeat=repeat,
        )

    def load_version(self, version: str) -> ServingModel | None:
        doc = with_retries(lambda: self.col.find_one({"_id": version}))
        return self.load(doc) if doc else None

    def prune(self, keep: int) -> list[str]:
        """Delete all but the ``keep`` newest versions (documents and artifacts)."""
        removed = []
        for doc in self.versions()[keep:]:
            from bson import ObjectId

            try:
                self.fs.delete(ObjectId(doc["artifact_ref"]))
            except Exception:
                log.warning("artifact delete failed", extra={"version": doc["_id"]})
            self.col.delete_one({"_id": doc["_id"]})
            removed.append(str(doc["_id"]))
        return removed


def now() -> float:
    return time.time()
