"""Entry point: ``python -m services.gateway``.

settings → logging → runtime → downstream clients → servicer → background
publisher and dependency gauges → shutdown hooks → serve_forever.

No dependency gates SERVING (readiness). Every RPC answers while Redis, MongoDB,
scoring or Kafka is down — degraded, with the missing part named, never an error —
so taking gateways out of rotation during an outage would turn degraded answers
into no answers: Redis is shared by every replica, so a Redis outage would empty
the whole Service at once. Each dependency is still exported as
``stylerec_dependency_up`` (alerts and dashboards see the outage) and every
degraded answer counts in ``stylerec_gateway_degraded_parts_total``.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import grpc
from pymongo import MongoClient
from stylerec.v1 import gateway_pb2_grpc

from libs.common.channels import ClientSecurity, make_channel
from libs.common.logging import configure_logging
from libs.common.metrics import DEPENDENCY_UP
from libs.common.pseudonym import Pseudonymizer
from libs.common.server import ServiceRuntime, mongo_probe, redis_probe, tcp_probe
from libs.common.stores import make_mongo, make_redis, mongo_credentials, redis_credentials
from services.gateway.answers import AnswerCache, UserChangeListener
from services.gateway.candidates import CandidateSource
from services.gateway.catalog import ItemCatalog
from services.gateway.config import GatewaySettings
from services.gateway.downstream import Downstream
from services.gateway.embeddings import ItemEmbeddings, StyleCentroid
from services.gateway.experiments import Experiments
from services.gateway.impressions import ImpressionPublisher
from services.gateway.invalidation import ItemCacheInvalidator
from services.gateway.recommend import Recommender
from services.gateway.server import GatewayServicer
from services.gateway.similar import EmbeddingIndex, SimilarItems
from services.gateway.stylized import StyleJobPublisher, StylizedImages


@dataclass
class GatewayApp:
    settings: GatewaySettings
    servicer: GatewayServicer
    downstream: Downstream
    publisher: StyleJobPublisher
    mongo: MongoClient
    scoring_channel: grpc.Channel | None
    invalidator: ItemCacheInvalidator
    answer_listener: UserChangeListener
    impressions: ImpressionPublisher
    _stop: threading.Event = field(default_factory=threading.Event)

    def start_background(self) -> None:
        self.publisher.start()
        self.invalidator.start()
        self.answer_listener.start()
        self.impressions.start()
        threading.Thread(target=self._gauge_loop, name="dependency-gauges", daemon=True).start()

    def _gauge_loop(self) -> None:
        probes = {
            "redis": redis_probe(self.downstream.redis),
            "mongo": mongo_probe(self.mongo),
            "kafka": tcp_probe(self.settings.kafka_servers),
        }
        if self.settings.scoring_addr:
            probes["scoring"] = tcp_probe([self.settings.scoring_addr])
        while not self._stop.is_set():
            for name, probe in probes.items():
                DEPENDENCY_UP.labels(name).set(1 if probe() else 0)
            self._stop.wait(self.settings.health_interval_s)

    def close(self) -> None:
        self._stop.set()
        self.invalidator.stop()
        self.answer_listener.stop()
        self.publisher.stop()
        self.impressions.stop()
        if self.scoring_channel is not None:
            self.scoring_channel.close()
        self.mongo.close()
        self.downstream.redis.close()


def build_app(settings: GatewaySettings) -> GatewayApp:
    r = make_redis(settings.redis_url, settings.redis_timeout_s, settings.redis_retries, **redis_credentials(settings))
    mongo: MongoClient = make_mongo(settings.mongo_uri, settings.mongo_timeout_s, **mongo_credentials(settings))
    # TLS/mTLS and the gateway's bearer token as configured (libs/common/channels.py).
    scoring_channel = (
        make_channel(settings.scoring_addr, ClientSecurity.from_settings(settings)) if settings.scoring_addr else None
    )
    ds = Downstream(settings, r, mongo[settings.mongo_db], scoring_channel)
    pseudonymize = Pseudonymizer(settings.effective_pseudonym_secret())
    # The publisher's cleanup runs off the request path: ordinary store timeouts.
    publisher = StyleJobPublisher(
        settings,
        make_redis(settings.redis_url, settings.store_timeout_s, settings.store_retries, **redis_credentials(settings)),
    )
    # One centroid cache for both users of style similarity (re-rank and similar items).
    centroid = StyleCentroid(ds, settings.style_centroid_near_cache_s)
    index = EmbeddingIndex(ds, settings.embedding_index_refresh_s, centroid, settings.embedding_index_full_scan_s)
    catalog = ItemCatalog(ds, settings.item_cache_ttl_s, settings.item_near_cache_s)
    # Answers built from something unversioned (scoring's TopN, embeddings outside the index) live
    # no longer than the popularity near cache, as every kept answer did before versions.
    answers = AnswerCache(
        settings.answer_cache_s,
        settings.answer_cache_entries,
        settings.answer_pending_recheck_s,
        volatile_ttl_s=settings.popular_near_cache_s,
    )
    stylized = StylizedImages(settings, ds, publisher)
    recommender = Recommender(
        settings,
        ds,
        pseudonymize,
        catalog,
        CandidateSource(ds, settings.popular_near_cache_s),
        stylized,
        ItemEmbeddings(ds, settings.embedding_cache_s),
        index,
        centroid,
        answers,
    )
    similar = SimilarItems(ds, index, settings.style_lambda)
    impressions = ImpressionPublisher(settings)
    servicer = GatewayServicer(
        settings, ds, pseudonymize, recommender, similar, Experiments.from_settings(settings), impressions
    )
    invalidator = ItemCacheInvalidator(settings, ds.redis, catalog.near, answers)
    # Its own connection: a subscribed one serves no commands. No retries: a lost connection must
    # end the subscription (and serving from memory) at once, not after silent reconnect attempts.
    listener = UserChangeListener(
        make_redis(settings.redis_url, settings.store_timeout_s, 0, **redis_credentials(settings)),
        answers,
        on_stylized=stylized.stored,
    )
    return GatewayApp(settings, servicer, ds, publisher, mongo, scoring_channel, invalidator, listener, impressions)


def main() -> None:
    settings = GatewaySettings()
    configure_logging(settings.service_name, settings.log_level)
    runtime = ServiceRuntime(settings)
    app = build_app(settings)
    runtime.add_service(
        "stylerec.v1.GatewayService", gateway_pb2_grpc.add_GatewayServiceServicer_to_server, app.servicer
    )
    app.start_background()
    runtime.on_shutdown(app.close)
    runtime.start()
    runtime.serve_forever()


if __name__ == "__main__":
    main()
