"""Entry point: ``python -m services.scoring``."""

from __future__ import annotations

from stylerec.v1 import common_pb2, scoring_pb2_grpc

from libs.common.kafka import USER_EVENTS, ProtoConsumerLoop, ProtoProducer
from libs.common.logging import configure_logging
from libs.common.server import ServiceRuntime, mongo_probe, redis_probe, tcp_probe
from libs.common.stores import make_mongo, make_redis
from services.scoring.config import ScoringSettings
from services.scoring.consumer import EventApplier
from services.scoring.popularity import InteractionState
from services.scoring.server import ScoringServicer


def main() -> None:
    settings = ScoringSettings()
    configure_logging(settings.service_name, settings.log_level)
    runtime = ServiceRuntime(settings)
    r = make_redis(settings.redis_url, settings.store_timeout_s, settings.store_retries)
    mongo = make_mongo(settings.mongo_uri, settings.store_timeout_s)
    producer = ProtoProducer(settings.kafka_servers, client_id="scoring")
    runtime.require("kafka", tcp_probe(settings.kafka_servers))
    runtime.require("redis", redis_probe(r))
    runtime.require("mongo", mongo_probe(mongo))
    state = InteractionState(half_life_s=settings.half_life_days * 86400)
    runtime.add_service(
        "stylerec.v1.ScoringService", scoring_pb2_grpc.add_ScoringServiceServicer_to_server, ScoringServicer(state)
    )
    consumer = ProtoConsumerLoop(
        bootstrap=settings.kafka_servers,
        group_id=settings.consumer_group,
        topics=[USER_EVENTS],
        message_type=common_pb2.Event,
        handle=EventApplier(settings, state, r),
        producer=producer,
        service="scoring",
        max_poll_interval_ms=settings.kafka_max_poll_interval_ms,
        session_timeout_ms=settings.kafka_session_timeout_ms,
    )
    runtime.on_shutdown(mongo.close)
    runtime.on_shutdown(producer.close)
    runtime.on_shutdown(consumer.stop)
    runtime.start()
    consumer.start()
    runtime.serve_forever()


if __name__ == "__main__":
    main()
