"""Catalog changes reach answers in about a second, not after the item-cache TTL.

The gateway caches item metadata in Redis (``keys.item_meta``, TTL
``item_cache_ttl_s``) because titles and prices are read on every request. A
price change must not wait an hour to show, so the gateway follows
``item-updates`` (the catalog's change feed, key = item id) in its own consumer
group and deletes the cached entry of every item that changed; the next request
refills it from MongoDB. One group for all replicas is enough for the Redis
entry; each replica's in-process copy expires by itself within
``item_near_cache_s``.

The messages are only hints here: one that does not decode is skipped (the
style worker, which acts on them, dead-letters it), and while the broker is
unreachable the loop retries in the background and the TTL still bounds
staleness.
"""

from __future__ import annotations

import contextlib
import logging
import threading

import redis
from google.protobuf.message import DecodeError
from kafka import KafkaConsumer
from stylerec.v1 import common_pb2

from libs.common import keys
from libs.common.kafka import ITEM_UPDATES, kafka_security
from libs.common.metrics import CONSUMED
from services.gateway.config import GatewaySettings

log = logging.getLogger(__name__)


class ItemCacheInvalidator:
    def __init__(self, settings: GatewaySettings, r: redis.Redis) -> None:
        self.settings = settings
        self.redis = r
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="item-cache-invalidation", daemon=True)
        self.invalidated = 0

    def start(self) -> ItemCacheInvalidator:
        self._thread.start()
        return self

    def _consumer(self) -> KafkaConsumer:
        return KafkaConsumer(
            ITEM_UPDATES,
            bootstrap_servers=self.settings.kafka_servers,
            group_id=self.settings.item_updates_group,
            enable_auto_commit=False,
            auto_offset_reset="latest",  # older changes are covered by the cache TTL
            max_poll_interval_ms=self.settings.kafka_max_poll_interval_ms,
            session_timeout_ms=self.settings.kafka_session_timeout_ms,
            heartbeat_interval_ms=max(500, self.settings.kafka_session_timeout_ms // 4),
            client_id="gateway-item-cache",
            **kafka_security(self.settings),
        )

    def _run(self) -> None:
        consumer: KafkaConsumer | None = None
        while not self._stop.is_set():
            try:
                if consumer is None:
                    consumer = self._consumer()
                polled = consumer.poll(timeout_ms=500)
                items: set[str] = set()
                for tp, records in polled.items():
                    for rec in records:
                        try:
                            items.add(common_pb2.ItemUpdate.FromString(rec.value or b"").item_id)
                            CONSUMED.labels(self.settings.item_updates_group, tp.topic, "ok").inc()
                        except DecodeError:
                            CONSUMED.labels(self.settings.item_updates_group, tp.topic, "skipped").inc()
                items.discard("")
                if items:
                    self.redis.delete(*[keys.item_meta(i) for i in items])
                    self.invalidated += len(items)
                if polled:
                    consumer.commit()
            except Exception as exc:
                log.warning("item-cache invalidation loop error", extra={"error": f"{type(exc).__name__}: {exc}"})
                if consumer is not None:
                    with contextlib.suppress(Exception):
                        consumer.close(autocommit=False)
                consumer = None
                self._stop.wait(2.0)
        if consumer is not None:
            with contextlib.suppress(Exception):
                consumer.close(autocommit=False)

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(10)
