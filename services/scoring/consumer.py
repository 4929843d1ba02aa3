"""Applies `user-events` to the interaction state and rewrites affected users' top-N in Redis."""

from __future__ import annotations

import logging
import time

import redis
from stylerec.v1 import common_pb2

from libs.common import keys
from libs.common.kafka import Decoded
from services.scoring.config import ScoringSettings
from services.scoring.popularity import InteractionState
from services.scoring.server import POPULARITY_VERSION

log = logging.getLogger(__name__)


def event_weights(settings: ScoringSettings) -> dict[int, float]:
    return {
        common_pb2.VIEW: settings.weight_view,
        common_pb2.CLICK: settings.weight_click,
        common_pb2.FAVORITE: settings.weight_favorite,
        common_pb2.ADD_TO_CART: settings.weight_add_to_cart,
        common_pb2.PURCHASE: settings.weight_purchase,
    }


class EventApplier:
    def __init__(self, settings: ScoringSettings, state: InteractionState, r: redis.Redis) -> None:
        self.settings = settings
        self.state = state
        self.redis = r
        self.weights = event_weights(settings)

    def __call__(self, batch: list[Decoded[common_pb2.Event]]) -> None:
        users: set[str] = set()
        for d in batch:
            e = d.message
            ts = e.timestamp.seconds + e.timestamp.nanos / 1e9
            self.state.add(e.user_id, e.item_id, self.weights.get(e.type, 1.0), ts)
            users.add(e.user_id)
        self.publish(users)

    def publish(self, users: set[str]) -> None:
        n = self.settings.top_n
        ttl = self.settings.recs_ttl_s
        pipe = self.redis.pipeline(transaction=False)
        pop = self.state.popular(max(n * 4, 200))
        pipe.delete(keys.popular())
        if pop:
            pipe.zadd(keys.popular(), {i: s for i, s in pop})
        pipe.set(keys.model_version(), POPULARITY_VERSION)
        now = str(time.time())
        for user in users:
            seen = self.state.seen(user)
            top = self.state.popular(n, seen)
            pipe.delete(keys.recs(user))
            if top:
                pipe.hset(keys.recs(user), mapping={i: s for i, s in top})
                pipe.expire(keys.recs(user), ttl)
            pipe.hset(keys.recs_meta(user), mapping={"model_version": POPULARITY_VERSION, "updated_at": now})
            pipe.expire(keys.recs_meta(user), ttl)
            pipe.delete(keys.user_seen(user))
            if seen:
                pipe.sadd(keys.user_seen(user), *seen)
                pipe.expire(keys.user_seen(user), ttl)
        pipe.execute()
