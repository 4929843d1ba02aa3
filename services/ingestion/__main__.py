"""Entry point: ``python -m services.ingestion [--role all|api|archiver]``.

``all`` (default) serves the gRPC front door and runs the Mongo archiver as a
second consumer group in the same process; ``api`` and ``archiver`` split them
so each can be scaled (or killed) on its own.
"""

from __future__ import annotations

import argparse
import logging
import sys

from pydantic import ValidationError
from stylerec.v1 import admin_pb2_grpc, ingestion_pb2_grpc

from libs.common.audit import AuditLog
from libs.common.kafka import ProtoProducer, kafka_security
from libs.common.logging import configure_logging
from libs.common.privacy import UserRefs
from libs.common.pseudonym import Pseudonymizer
from libs.common.server import ServiceRuntime, mongo_probe, redis_probe, tcp_probe
from libs.common.stores import make_mongo, make_redis, mongo_credentials, redis_credentials
from services.ingestion.admin import AdminServicer, UserForgetter
from services.ingestion.archiver import ArchiverRunner
from services.ingestion.attribution import ExperimentsRunner
from services.ingestion.catalog import ItemCatalog
from services.ingestion.config import IngestionSettings
from services.ingestion.dedup import DedupStore
from services.ingestion.events import EventIntake
from services.ingestion.publisher import EventPublisher
from services.ingestion.rate_limit import CallerRateLimiter
from services.ingestion.server import IngestionServicer

log = logging.getLogger("services.ingestion")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m services.ingestion")
    parser.add_argument("--role", choices=["all", "api", "archiver"], help="overrides STYLEREC_ROLE")
    args = parser.parse_args(argv)
    try:
        settings = IngestionSettings(**({"role": args.role} if args.role else {}))
    except ValidationError as exc:
        print(f"ingestion: invalid configuration:\n{exc}", file=sys.stderr)
        return 2
    configure_logging(settings.service_name, settings.log_level)
    # Both roles need the key: the API pseudonymizes, the archiver checks the suppression list.
    try:
        secret = settings.effective_pseudonym_secret()
    except ValueError as exc:
        log.error("refusing to start", extra={"error": str(exc)})
        return 2
    refs = UserRefs(secret)
    runtime = ServiceRuntime(settings)
    mongo = make_mongo(settings.mongo_uri, settings.store_timeout_s, **mongo_credentials(settings))
    db = mongo[settings.mongo_db]
    runtime.require("kafka", tcp_probe(settings.kafka_servers))
    runtime.require("mongo", mongo_probe(mongo))
    runtime.on_shutdown(mongo.close)
    if settings.runs_api:
        if not settings.pseudonym_secret:
            log.warning(
                "STYLEREC_PSEUDONYM_SECRET is not set: using the PUBLIC dev key; user ids are NOT protected. "
                "Never run like this with real data (STYLEREC_MODE=prod refuses to start)."
            )
        r = make_redis(
            settings.redis_url, settings.store_timeout_s, settings.store_retries, **redis_credentials(settings)
        )
        runtime.require("redis", redis_probe(r))
        runtime.on_shutdown(r.close)
        publisher = EventPublisher(settings).start()
        runtime.require("producer", lambda: publisher.ready)
        runtime.on_shutdown(publisher.close)
        catalog = ItemCatalog(settings, db, publisher)
        runtime.on_shutdown(catalog.close)
        pseudonymize = Pseudonymizer(secret)
        intake = EventIntake(
            settings,
            publisher,
            DedupStore(r, settings.dedup_window_s, settings.dedup_pending_s),
            pseudonymize,
        )
        runtime.add_service(
            "stylerec.v1.IngestionService",
            ingestion_pb2_grpc.add_IngestionServiceServicer_to_server,
            IngestionServicer(
                intake,
                catalog,
                settings.stream_pipeline_chunks,
                CallerRateLimiter(settings.ingest_rate_limit_eps, settings.ingest_rate_limit_burst),
            ),
        )
        forgetter = UserForgetter(
            db,
            r,
            lambda: ProtoProducer(
                settings.kafka_servers, client_id="ingestion-admin", security=kafka_security(settings)
            ),
            pseudonymize,
            refs,
            AuditLog(db, settings.service_name),
            settings.events_collection,
            settings.publish_timeout_s,
            settings.impressions_collection,
            (settings.attributions_collection, settings.attribution_pending_collection),
        )
        runtime.on_shutdown(forgetter.close)
        runtime.add_service(
            "stylerec.v1.AdminService",
            admin_pb2_grpc.add_AdminServiceServicer_to_server,
            AdminServicer(forgetter, settings.max_id_length),
        )
    if settings.runs_archiver and settings.experiments_enabled:
        experiments = ExperimentsRunner(settings, db, refs).start()
        runtime.require("attribution", lambda: experiments.running)
        runtime.on_shutdown(experiments.stop)
    if settings.runs_archiver:
        archiver = ArchiverRunner(settings, db, refs).start()
        runtime.require("archiver", lambda: archiver.running)
        # Registered last so it runs first on shutdown: stop consuming (and commit) before closing clients.
        runtime.on_shutdown(archiver.stop)
    log.info("ingestion configured", extra={"role": settings.role, "events_topic": settings.events_topic})
    runtime.start()
    runtime.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
