"""Item metadata for answers: in-process cache, then Redis, then MongoDB ``items`` (then cached).

Titles, prices and photo references change rarely and are read on every
request. Each replica keeps the ones it served in process (bounded, TTL
``item_near_cache_s``) and evicts an item as soon as ``item-updates`` says it changed
(services/gateway/invalidation.py), so the common answer needs no catalog round trip
at all; Redis (``keys.item_meta``, TTL) is shared by the replicas, and the system of
record is read only for what neither has, within what is left of the request's budget.

When MongoDB cannot answer in time (the demo's bulk load keeps the Mongo-protocol
server busy), an item whose photo reference this replica learnt from ``item-updates``
is still returned as a *partial* entry (id and photo only, the answer marked degraded),
so its stylized image is not lost; a partial entry never passes a category or price filter.
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
from services.gateway.metrics import ITEM_CACHE, ITEM_CACHE_AGE, ITEM_CACHE_EVICTIONS

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
    # Only id and photo are known (from item-updates, MongoDB unavailable): not filterable.
    partial: bool = False

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
    """The in-process item-metadata cache of one replica.

    Entries live at most ``ttl_s`` (a bound for an update this replica missed, e.g. while the
    broker was unreachable); ``evict`` drops an item the moment item-updates says it changed.
    At ``max_items`` the oldest tenth goes (dicts keep insertion order), so the hot set stays.
    ``photos`` remembers the photo reference item-updates announced per item (bounded the same
    way): enough to draw an item whose metadata MongoDB cannot deliver in time.
    """

    def __init__(self, ttl_s: float, max_items: int = 20_000) -> None:
        self.ttl_s = ttl_s
        self.max_items = max_items
        self._items: dict[str, tuple[float, ItemMeta]] = {}
        self.photos: dict[str, str] = {}

    def get(self, item_id: str, now: float) -> tuple[float, ItemMeta] | None:
        """(time it was cached, entry), or None when absent or older than ttl_s."""
        hit = self._items.get(item_id)
        if hit is None:
            return None
        if now - hit[0] > self.ttl_s:
            self._items.pop(item_id, None)
            ITEM_CACHE_EVICTIONS.labels("expired").inc()
            return None
        return hit

    def put(self, metas: list[ItemMeta], now: float) -> None:
        if self.ttl_s <= 0 or not metas:
            return
        if len(self._items) + len(metas) > self.max_items:
            self._trim(self._items, len(metas))
        for m in metas:
            self._items[m.item_id] = (now, m)

    def _trim(self, d: dict[str, Any], incoming: int) -> None:
        drop = max(incoming, self.max_items // 10)
        for key in list(d)[:drop]:
            del d[key]
        if d is self._items:
            ITEM_CACHE_EVICTIONS.labels("full").inc(drop)

    def evict(self, item_ids: list[str]) -> int:
        """Drop changed items (called from the item-updates listener's thread)."""
        n = 0
        for i in item_ids:
            if self._items.pop(i, None) is not None:
                n += 1
        if n:
            ITEM_CACHE_EVICTIONS.labels("update").inc(n)
        return n

    def learn_photo(self, item_id: str, image_ref: str) -> None:
        if not image_ref:
            self.photos.pop(item_id, None)
            return
        if len(self.photos) >= self.max_items:
            self._trim(self.photos, 1)
        self.photos[item_id] = image_ref


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
        oldest = now
        near = self.near
        for item_id in item_ids:
            hit = near.get(item_id, now)
            if hit is not None:
                found[item_id] = hit[1]
                if hit[0] < oldest:
                    oldest = hit[0]
        if found:
            ITEM_CACHE.labels("near_hit").inc(len(found))
            # Staleness: one observation per lookup, the age of the oldest entry it served.
            ITEM_CACHE_AGE.observe(now - oldest)
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
            photos = self.near.photos
            for item_id in misses:
                ref = photos.get(item_id)
                if ref:
                    found[item_id] = ItemMeta(item_id, image_ref=ref, partial=True)
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
