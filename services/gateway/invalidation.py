"""Catalog changes reach answers in about a second, not after the item-cache TTLs.

The gateway caches item metadata in Redis (``keys.item_meta``, TTL
``item_cache_ttl_s``) and in each replica's memory (``item_near_cache_s``) because
titles and prices are read on every request. A price change must not wait for
either TTL, so the gateway follows ``item-updates`` (the catalog's change feed,
key = item id) twice in one thread:

* in its consumer group (one for all replicas that share a Redis, committed
  offsets, so a restart resumes): deletes the Redis entry of every changed item;
* without a group, every partition from the end, in every replica: evicts the
  item from this replica's in-process cache and remembers the photo reference
  the update carries (services/gateway/catalog.py uses it when MongoDB cannot
  answer in time), and drops every kept answer (services/gateway/answers.py). A
  replica does this for all updates, not only its group share, because each one
  holds its own copy.

The messages are only hints here: one that does not decode is skipped (the
style worker, which acts on them, dead-letters it), and while the broker is
unreachable the loop retries in the background and the TTL still bounds
staleness.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from typing import Any

import redis
from google.protobuf.message import DecodeError
from kafka import KafkaConsumer, TopicPartition
from stylerec.v1 import common_pb2

from libs.common import keys
from libs.common.kafka import ITEM_UPDATES, kafka_security
from libs.common.metrics import CONSUMED
from services.gateway.answers import AnswerCache
from services.gateway.catalog import NearCache
from services.gateway.config import GatewaySettings

log = logging.getLogger(__name__)


class ItemCacheInvalidator:
    def __init__(
        self,
        settings: GatewaySettings,
        r: redis.Redis,
        near: NearCache | None = None,
        answers: AnswerCache | None = None,
    ) -> None:
        self.answers = answers
        self.settings = settings
        self.redis = r
        self.near = near
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

    def _local_consumer(self) -> KafkaConsumer:
        """Group-less, every partition from its end: this replica's own view of all changes."""
        consumer = KafkaConsumer(
            bootstrap_servers=self.settings.kafka_servers,
            group_id=None,
            enable_auto_commit=False,
            client_id="gateway-item-near-cache",
            **kafka_security(self.settings),
        )
        try:
            parts = consumer.partitions_for_topic(ITEM_UPDATES)
            if not parts:
                raise RuntimeError(f"no partitions known for {ITEM_UPDATES} yet")
            tps = [TopicPartition(ITEM_UPDATES, p) for p in sorted(parts)]
            consumer.assign(tps)
            consumer.seek_to_end(*tps)
        except Exception:
            with contextlib.suppress(Exception):
                consumer.close(autocommit=False)
            raise
        return consumer

    def _updates(self, polled: dict[Any, list[Any]], label: str) -> list[common_pb2.ItemUpdate]:
        out = []
        for tp, records in polled.items():
            for rec in records:
                try:
                    out.append(common_pb2.ItemUpdate.FromString(rec.value or b""))
                    CONSUMED.labels(label, tp.topic, "ok").inc()
                except DecodeError:
                    CONSUMED.labels(label, tp.topic, "skipped").inc()
        return [u for u in out if u.item_id]

    def _run(self) -> None:
        consumer: KafkaConsumer | None = None
        local: KafkaConsumer | None = None
        while not self._stop.is_set():
            try:
                if consumer is None:
                    consumer = self._consumer()
                polled = consumer.poll(timeout_ms=250 if self.near is not None or self.answers is not None else 500)
                items = {u.item_id for u in self._updates(polled, self.settings.item_updates_group)}
                if items:
                    self.redis.delete(*[keys.item_meta(i) for i in items])
                    self.invalidated += len(items)
                if polled:
                    consumer.commit()
                if self.near is not None or self.answers is not None:
                    if local is None:
                        local = self._local_consumer()
                    changed = self._updates(local.poll(timeout_ms=250), "gateway-item-near-cache")
                    for u in changed:
                        if self.near is not None:
                            self.near.evict([u.item_id])
                            self.near.learn_photo(u.item_id, "" if u.deleted else u.image_ref)
                    if changed and self.answers is not None:
                        self.answers.clear("item")  # a kept answer may show the old price or photo
            except Exception as exc:
                log.warning("item-cache invalidation loop error", extra={"error": f"{type(exc).__name__}: {exc}"})
                for c in (consumer, local):
                    if c is not None:
                        with contextlib.suppress(Exception):
                            c.close(autocommit=False)
                consumer = local = None
                self._stop.wait(2.0)
        for c in (consumer, local):
            if c is not None:
                with contextlib.suppress(Exception):
                    c.close(autocommit=False)

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(10)
