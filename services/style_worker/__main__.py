"""Entry point: ``python -m services.style_worker``.

settings → logging → runtime → probes → engine (providers probed once) →
servicer → consumers (style-jobs, item-updates) → shutdown hooks → serve.
Shutdown runs hooks in reverse: consumers stop first (finishing and
committing their batch), then the batchers drain, then the producer flushes.
"""

from __future__ import annotations

from stylerec.v1 import common_pb2, style_pb2, style_pb2_grpc

from libs.common.kafka import ProtoConsumerLoop, ProtoProducer, kafka_security
from libs.common.logging import configure_logging
from libs.common.server import ServiceRuntime, mongo_probe, redis_probe, tcp_probe
from libs.common.stores import make_mongo, make_redis, mongo_credentials, mongo_db, redis_credentials
from services.style_worker.config import StyleWorkerSettings
from services.style_worker.engine import StyleEngine
from services.style_worker.jobs import SERVICE, StyleJobProcessor, validate_job
from services.style_worker.server import StyleWorkerServicer


def main() -> None:
    settings = StyleWorkerSettings()
    configure_logging(settings.service_name, settings.log_level)
    runtime = ServiceRuntime(settings)
    r = make_redis(settings.redis_url, settings.store_timeout_s, settings.store_retries, **redis_credentials(settings))
    mongo = make_mongo(settings.mongo_uri, settings.store_timeout_s, **mongo_credentials(settings))
    runtime.require("kafka", tcp_probe(settings.kafka_servers))
    runtime.require("redis", redis_probe(r))
    runtime.require("mongo", mongo_probe(mongo))
    engine = StyleEngine.from_settings(settings)
    runtime.add_service(
        "stylerec.v1.StyleWorkerService",
        style_pb2_grpc.add_StyleWorkerServiceServicer_to_server,
        StyleWorkerServicer(settings, engine),
    )
    producer = ProtoProducer(settings.kafka_servers, client_id=SERVICE, security=kafka_security(settings))
    runtime.on_shutdown(mongo.close)
    runtime.on_shutdown(producer.close)
    runtime.on_shutdown(producer.flush)
    runtime.on_shutdown(engine.close)
    if settings.consume:
        processor = StyleJobProcessor(settings, engine, mongo_db(mongo, settings.mongo_db), r, producer)
        common = {
            "bootstrap": settings.kafka_servers,
            "producer": producer,
            "service": SERVICE,
            "max_poll_records": settings.max_poll_records,
            "max_poll_interval_ms": settings.kafka_max_poll_interval_ms,
            "session_timeout_ms": settings.kafka_session_timeout_ms,
            "security": kafka_security(settings),
        }
        jobs: ProtoConsumerLoop[style_pb2.StyleJob] = ProtoConsumerLoop(
            group_id=settings.jobs_group,
            topics=[settings.jobs_topic],
            message_type=style_pb2.StyleJob,
            handle=processor.handle_jobs,
            validate=validate_job,
            **common,  # type: ignore[arg-type]
        )
        updates: ProtoConsumerLoop[common_pb2.ItemUpdate] = ProtoConsumerLoop(
            group_id=settings.item_updates_group,
            topics=[settings.item_updates_topic],
            message_type=common_pb2.ItemUpdate,
            handle=processor.handle_item_updates,
            **common,  # type: ignore[arg-type]
        )
        runtime.on_shutdown(updates.stop)
        runtime.on_shutdown(jobs.stop)
        jobs.start()
        updates.start()
    runtime.start()
    runtime.serve_forever()


if __name__ == "__main__":
    main()
