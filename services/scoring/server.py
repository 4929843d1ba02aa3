"""ScoringService servicer: TopN, Score, SimilarItems, Train, ModelInfo.

Input is validated up front (INVALID_ARGUMENT with field violations); the model is read
once per call from the holder so a concurrent hot swap can never mix two versions.
"""

from __future__ import annotations

from collections.abc import Callable

import grpc
from stylerec.v1 import scoring_pb2, scoring_pb2_grpc

from libs.common.audit import AuditLog
from libs.common.errors import abort_invalid
from services.scoring.foldin import ModelHolder, Recommender
from services.scoring.models import ALGORITHMS
from services.scoring.trainer import Trainer, TrainingError

MAX_K = 1000
MAX_ITEMS = 1000
MAX_ID = 512
TRAIN_ACTION = "stylerec.v1.ScoringService/Train"


def _check_id(name: str, value: str, violations: list[tuple[str, str]], required: bool = True) -> None:
    if not value:
        if required:
            violations.append((name, "required"))
    elif len(value) > MAX_ID:
        violations.append((name, f"longer than {MAX_ID} characters"))


def _check_k(k: int, violations: list[tuple[str, str]]) -> None:
    if k < 0 or k > MAX_K:
        violations.append(("k", f"must be between 1 and {MAX_K} (0 = default 10)"))


class ScoringServicer(scoring_pb2_grpc.ScoringServiceServicer):
    def __init__(
        self,
        engine: Recommender,
        holder: ModelHolder,
        trainer: Trainer | None,
        replica: str,
        partitions: Callable[[], list[int]],
        audit: AuditLog | None = None,
    ) -> None:
        self.engine = engine
        self.holder = holder
        self.trainer = trainer
        self.replica = replica
        self.partitions = partitions
        self.audit = audit or AuditLog(None, "scoring")

    def TopN(self, request: scoring_pb2.TopNRequest, context: grpc.ServicerContext) -> scoring_pb2.TopNResponse:
        v: list[tuple[str, str]] = []
        _check_id("user_id", request.user_id, v, required=False)
        _check_k(request.k, v)
        if len(request.category) > MAX_ID:
            v.append(("category", f"longer than {MAX_ID} characters"))
        if v:
            abort_invalid(context, "invalid TopN request", v)
        recs = self.engine.top_n(request.user_id, request.k or 10, request.exclude_seen, request.category)
        return scoring_pb2.TopNResponse(
            items=[scoring_pb2.ScoredItem(item_id=i, score=s) for i, s in recs.items],
            model_version=recs.version,
            source=recs.source,
        )

    def Score(self, request: scoring_pb2.ScoreRequest, context: grpc.ServicerContext) -> scoring_pb2.ScoreResponse:
        v: list[tuple[str, str]] = []
        _check_id("user_id", request.user_id, v)
        if not request.item_ids:
            v.append(("item_ids", "at least one item id is required"))
        if len(request.item_ids) > MAX_ITEMS:
            v.append(("item_ids", f"at most {MAX_ITEMS} items"))
        for n, item in enumerate(request.item_ids):
            if not item or len(item) > MAX_ID:
                v.append((f"item_ids[{n}]", "empty or too long"))
        if v:
            abort_invalid(context, "invalid Score request", v)
        scored, version = self.engine.score_items(request.user_id, request.item_ids)
        return scoring_pb2.ScoreResponse(
            items=[scoring_pb2.ScoredItem(item_id=i, score=s) for i, s in scored], model_version=version
        )

    def SimilarItems(
        self, request: scoring_pb2.SimilarItemsRequest, context: grpc.ServicerContext
    ) -> scoring_pb2.SimilarItemsResponse:
        v: list[tuple[str, str]] = []
        _check_id("item_id", request.item_id, v)
        _check_k(request.k, v)
        if v:
            abort_invalid(context, "invalid SimilarItems request", v)
        sm = self.holder.get()
        if sm is None:
            abort_invalid(
                context, "no model trained yet", [("model", "call Train first")], grpc.StatusCode.FAILED_PRECONDITION
            )
        j = sm.item_index.get(request.item_id)
        if j is None:
            abort_invalid(
                context,
                f"item {request.item_id!r} is unknown to model {sm.version}",
                [("item_id", "not in the current model (new items appear after the next training)")],
                grpc.StatusCode.NOT_FOUND,
            )
        pairs = sm.model.similar_items(j, request.k or 10)
        return scoring_pb2.SimilarItemsResponse(
            items=[scoring_pb2.ScoredItem(item_id=sm.item_ids[i], score=s) for i, s in pairs],
            model_version=sm.version,
        )

    def Train(self, request: scoring_pb2.TrainRequest, context: grpc.ServicerContext) -> scoring_pb2.TrainResponse:
        if request.algorithm and request.algorithm not in ALGORITHMS:
            abort_invalid(
                context,
                f"unknown algorithm {request.algorithm!r}",
                [("algorithm", f"one of {', '.join(sorted(ALGORITHMS))}")],
            )
        if self.trainer is None:
            abort_invalid(context, "this replica does not train", [], grpc.StatusCode.FAILED_PRECONDITION)
        algorithm = request.algorithm or "default"
        if not request.wait:
            started = self.trainer.train_in_background(request.algorithm, "rpc")
            status = "started" if started else "already-running"
            self.audit.record(TRAIN_ACTION, "ok", target=algorithm, details={"status": status, "wait": False})
            return scoring_pb2.TrainResponse(model_version=self.holder.version, status=status)
        try:
            sm = self.trainer.train(request.algorithm, "rpc")
        except TrainingError as exc:
            self.audit.record(TRAIN_ACTION, "error", target=algorithm, details={"error": str(exc)[:300], "wait": True})
            abort_invalid(
                context,
                f"training failed, serving keeps {self.holder.version}: {exc}",
                [("training", str(exc))],
                grpc.StatusCode.FAILED_PRECONDITION,
            )
        self.audit.record(
            TRAIN_ACTION,
            "ok",
            target=algorithm,
            details={"status": "published", "model_version": sm.version, "users": sm.users, "wait": True},
        )
        return scoring_pb2.TrainResponse(model_version=sm.version, status="published", metrics=sm.metrics)

    def ModelInfo(
        self, request: scoring_pb2.ModelInfoRequest, context: grpc.ServicerContext
    ) -> scoring_pb2.ModelInfoResponse:
        sm = self.holder.get()
        state = self.engine.state
        resp = scoring_pb2.ModelInfoResponse(
            model_version=self.holder.version,
            replica=self.replica,
            partitions=sorted(self.partitions()),
            state_events=state.events,
        )
        if sm is not None:
            resp.algorithm = sm.algorithm
            resp.parameters.update({k: str(val) for k, val in sm.parameters.items()})
            resp.metrics.update({k: float(val) for k, val in sm.metrics.items()})
            if sm.repeat is not None:
                # The learned rebuy blend (repeat_policy decay), as the registry shows it.
                resp.metrics.update({f"repeat_weight.{k}": float(v) for k, v in sm.repeat.weights.weights.items()})
                resp.parameters["repeat_learned_on"] = sm.repeat.learned_on
            resp.trained_at.FromNanoseconds(int(sm.trained_at * 1e9))
            resp.data_watermark = int(sm.data_watermark)
            resp.users = sm.users
            resp.items = len(sm.item_ids)
        else:
            resp.algorithm = "popularity"
            resp.items = state.n_items
            resp.users = state.n_users
        return resp
