"""Item metadata for answers: Redis cache first, MongoDB ``items`` on a miss (then cached).

Titles, prices and photo references change rarely and are read on every
request, so the gateway keeps them in Redis (``keys.item_meta``, TTL) and only
goes to the system of record for the ones it has not seen lately.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import redis

from libs.common import keys
from services.gateway.deadlines import Deadline, DependencyUnavailable
from services.gateway.downstream import Degradation, Downstream
from services.gateway.metrics import ITEM_CACHE

log = logging.getLogger(__name__)

FIELDS = ("title", "category", "brand", "price", "image_ref")


@dataclass(frozen=True)
class ItemMeta:
    item_id: str
    title: str = ""
    category: str = ""
    brand: str = ""
    price: float = 0.0
    image_ref: str = ""

    @classmethod
    def from_redis(cls, item_id: str, h: dict[bytes, bytes]) -> ItemMeta:
        def s(name: str) -> str:
            v = h.get(name.encode())
            return v.decode() if v else ""

        try:
            price = float(s("price") or 0.0)
        except ValueError:
            price = 0.0
        return cls(item_id, s("title"), s("category"), s("brand"), price, s("image_ref"))

    @classmethod
    def from_mongo(cls, doc: dict[str, Any]) -> ItemMeta:
        try:
            price = float(doc.get("price") or 0.0)
        except (TypeError, ValueError):
            price = 0.0
        return cls(
            str(doc["_id"]),
            str(doc.get("title") or ""),
            str(doc.get("category") or ""),
            str(doc.get("brand") or ""),
            price,
            str(doc.get("image_ref") or ""),
        )

    def to_redis(self) -> dict[Any, Any]:
        return {
            "title": self.title,
            "category": self.category,
            "brand": self.brand,
            "price": repr(self.price),
            "image_ref": self.image_ref,
        }


class NearCache:
    """A small in-process cache in front of Redis for hot item metadata.

    Entries live ``ttl_s`` (seconds, default a few): a catalog change reaches
    answers after at most that long, and the hottest items cost no round trip.
    """

    def __init__(self, ttl_s: float, max_items: int = 20_000) -> None:
        self.ttl_s = ttl_s
        self.max_items = max_items
        self._items: dict[str, tuple[float, ItemMeta]] = {}

    def get(self, item_id: str, now: float) -> ItemMeta | None:
        hit = self._items.get(item_id)
        if hit is None or now - hit[0] > self.ttl_s:
            return None
        return hit[1]

    def put(self, metas: list[ItemMeta], now: float) -> None:
        if self.ttl_s <= 0:
            return
        if len(self._items) + len(metas) > self.max_items:
            self._items.clear()  # crude but bounded; refills from Redis within one request
        for m in metas:
            self._items[m.item_id] = (now, m)


class ItemCatalog:
    def __init__(self, downstream: Downstream, ttl_s: int, near_cache_s: float = 0.0) -> None:
        self.ds = downstream
        self.ttl_s = ttl_s
        self.near = NearCache(near_cache_s)

    def get_many(self, item_ids: list[str], deadline: Deadline, degradation: Degradation) -> dict[str, ItemMeta]:
        """Metadata of the ids that exist; a missing store degrades instead of failing."""
        if not item_ids:
            return {}
        now = time.monotonic()
        found: dict[str, ItemMeta] = {}
        for item_id in item_ids:
            hit = self.near.get(item_id, now)
            if hit is not None:
                found[item_id] = hit
        ITEM_CACHE.labels("near_hit").inc(len(found))
        if len(found) == len(item_ids):
            return found
        wanted = [i for i in item_ids if i not in found]
        from_redis: list[ItemMeta] = []
        redis_ok = True
        try:

            def fetch(r: redis.Redis) -> list[dict[bytes, bytes]]:
                pipe = r.pipeline(transaction=False)
                for item_id in wanted:
                    pipe.hgetall(keys.item_meta(item_id))
                return pipe.execute()

            for item_id, h in zip(wanted, self.ds.redis_call("item_meta_get", fetch, deadline), strict=True):
                if h:
                    from_redis.append(ItemMeta.from_redis(item_id, h))
        except DependencyUnavailable as exc:
            degradation.add(exc)
            redis_ok = False
        ITEM_CACHE.labels("hit").inc(len(from_redis))
        self.near.put(from_redis, now)
        found.update((m.item_id, m) for m in from_redis)
        misses = [i for i in wanted if i not in found]
        if not misses:
            return found
        try:
            docs = self.ds.mongo_call(
                "items_find",
                lambda db: list(db["items"].find({"_id": {"$in": misses}}, {"style_embedding": 0, "attributes": 0})),
                deadline,
            )
        except DependencyUnavailable as exc:
            degradation.add(exc)
            return found
        filled = [ItemMeta.from_mongo(d) for d in docs]
        ITEM_CACHE.labels("miss").inc(len(filled))
        ITEM_CACHE.labels("absent").inc(len(misses) - len(filled))
        for meta in filled:
            found[meta.item_id] = meta
        self.near.put(filled, now)
        if filled and redis_ok:
            try:

                def fill(r: redis.Redis) -> None:
                    pipe = r.pipeline(transaction=False)
                    for meta in filled:
                        pipe.hset(keys.item_meta(meta.item_id), mapping=meta.to_redis())
                        pipe.expire(keys.item_meta(meta.item_id), self.ttl_s)
                    pipe.execute()

                self.ds.redis_call("item_meta_fill", fill, deadline)
            except DependencyUnavailable as exc:
                # The answer is complete; only the cache fill was lost.
                log.warning("item cache fill failed", extra={"error": str(exc)})
        return found
