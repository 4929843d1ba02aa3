"""Entry point: ``python -m services.style_worker``."""

from __future__ import annotations

from pathlib import Path

from stylerec.v1 import style_pb2_grpc

from libs.common.logging import configure_logging
from libs.common.server import ServiceRuntime, mongo_probe, redis_probe, tcp_probe
from libs.common.stores import make_mongo, make_redis
from services.style_worker.config import StyleWorkerSettings
from services.style_worker.models import StyleModels, default_models_dir
from services.style_worker.server import StyleWorkerServicer


def main() -> None:
    settings = StyleWorkerSettings()
    configure_logging(settings.service_name, settings.log_level)
    runtime = ServiceRuntime(settings)
    r = make_redis(settings.redis_url, settings.store_timeout_s, settings.store_retries)
    mongo = make_mongo(settings.mongo_uri, settings.store_timeout_s)
    runtime.require("kafka", tcp_probe(settings.kafka_servers))
    runtime.require("redis", redis_probe(r))
    runtime.require("mongo", mongo_probe(mongo))
    models_dir = Path(settings.models_dir) if settings.models_dir else default_models_dir()
    models = StyleModels(models_dir, ["CPUExecutionProvider"], settings.intra_op_threads)
    runtime.add_service(
        "stylerec.v1.StyleWorkerService",
        style_pb2_grpc.add_StyleWorkerServiceServicer_to_server,
        StyleWorkerServicer(settings, models),
    )
    runtime.on_shutdown(mongo.close)
    runtime.start()
    runtime.serve_forever()


if __name__ == "__main__":
    main()
