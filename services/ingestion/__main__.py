"""Entry point: ``python -m services.ingestion``."""

from __future__ import annotations

import logging

from stylerec.v1 import ingestion_pb2_grpc

from libs.common.kafka import ProtoProducer
from libs.common.logging import configure_logging
from libs.common.pseudonym import Pseudonymizer
from libs.common.server import ServiceRuntime, tcp_probe
from services.ingestion.config import IngestionSettings
from services.ingestion.server import IngestionServicer


def main() -> None:
    settings = IngestionSettings()
    configure_logging(settings.service_name, settings.log_level)
    if not settings.pseudonym_secret:
        logging.getLogger(__name__).warning(
            "STYLEREC_PSEUDONYM_SECRET is not set: using the public dev key; user ids are NOT protected"
        )
    secret = settings.effective_pseudonym_secret()
    runtime = ServiceRuntime(settings)
    producer = ProtoProducer(settings.kafka_servers, client_id="ingestion")
    runtime.require("kafka", tcp_probe(settings.kafka_servers))
    runtime.add_service(
        "stylerec.v1.IngestionService",
        ingestion_pb2_grpc.add_IngestionServiceServicer_to_server,
        IngestionServicer(settings, producer, Pseudonymizer(secret)),
    )
    runtime.on_shutdown(producer.close)
    runtime.on_shutdown(producer.flush)
    runtime.start()
    runtime.serve_forever()


if __name__ == "__main__":
    main()
