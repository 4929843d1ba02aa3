"""ScoringService servicer."""

from __future__ import annotations

import grpc
from stylerec.v1 import scoring_pb2, scoring_pb2_grpc

from libs.common.errors import abort_invalid
from services.scoring.popularity import InteractionState

POPULARITY_VERSION = "popularity-v1"


class ScoringServicer(scoring_pb2_grpc.ScoringServiceServicer):
    def __init__(self, state: InteractionState) -> None:
        self.state = state

    def TopN(self, request: scoring_pb2.TopNRequest, context: grpc.ServicerContext) -> scoring_pb2.TopNResponse:
        if request.k < 0 or request.k > 1000:
            abort_invalid(context, "k must be between 1 and 1000", [("k", "out of range")])
        k = request.k or 10
        seen = self.state.seen(request.user_id) if request.user_id else set()
        exclude = seen if request.exclude_seen else set()
        items = self.state.popular(k, exclude)
        return scoring_pb2.TopNResponse(
            items=[scoring_pb2.ScoredItem(item_id=i, score=s) for i, s in items],
            model_version=POPULARITY_VERSION,
            source="personalized" if seen else "popularity",
        )
