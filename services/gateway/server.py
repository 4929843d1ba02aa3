"""GatewayService servicer."""

from __future__ import annotations

import grpc
import redis
from stylerec.v1 import gateway_pb2, gateway_pb2_grpc

from libs.common import keys
from libs.common.errors import abort_invalid
from libs.common.pseudonym import Pseudonymizer
from services.gateway.config import GatewaySettings


class GatewayServicer(gateway_pb2_grpc.GatewayServiceServicer):
    def __init__(self, settings: GatewaySettings, r: redis.Redis, pseudonymize: Pseudonymizer) -> None:
        self.settings = settings
        self.redis = r
        self.pseudonymize = pseudonymize

    def GetRecommendations(
        self, request: gateway_pb2.GetRecommendationsRequest, context: grpc.ServicerContext
    ) -> gateway_pb2.GetRecommendationsResponse:
        if not request.user_id:
            abort_invalid(context, "user_id is required", [("user_id", "required")])
        if request.k < 0 or request.k > self.settings.max_k:
            abort_invalid(context, f"k must be in 1..{self.settings.max_k}", [("k", "out of range")])
        k = request.k or self.settings.default_k
        user = self.pseudonymize(request.user_id)
        resp = gateway_pb2.GetRecommendationsResponse()
        recs = self.redis.hgetall(keys.recs(user))
        if recs:
            resp.strategy = gateway_pb2.CF
            meta = self.redis.hget(keys.recs_meta(user), "model_version")
            resp.model_version = meta.decode() if meta else ""
            ranked = sorted(((i.decode(), float(s)) for i, s in recs.items()), key=lambda kv: (-kv[1], kv[0]))
        else:
            resp.strategy = gateway_pb2.POPULAR
            version = self.redis.get(keys.model_version())
            resp.model_version = version.decode() if version else ""
            ranked = [
                (i.decode(), float(s)) for i, s in self.redis.zrevrange(keys.popular(), 0, k - 1, withscores=True)
            ]
        top = ranked[:k]
        best = top[0][1] if top and top[0][1] > 0 else 1.0
        for item_id, score in top:
            resp.items.add(item_id=item_id, cf_score=score / best, final_score=score / best)
        return resp
