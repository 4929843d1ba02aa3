"""Entry point: ``python -m services.scoring [--role serving|trainer] [--once]``.

serving (default): rebuild the interaction state from the archive, load the newest
model, then consume user-events (fold-in → Redis), hot-load new models and serve gRPC.
trainer: train from the whole archive and publish a model version (``--once`` for a
Kubernetes CronJob; otherwise every ``STYLEREC_TRAIN_INTERVAL_S``).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import sys
import threading
from typing import Any

from pydantic import ValidationError
from stylerec.v1 import common_pb2, scoring_pb2_grpc

from libs.common.audit import AuditLog
from libs.common.kafka import USER_EVENTS, ProtoConsumerLoop, ProtoProducer, kafka_security
from libs.common.logging import configure_logging
from libs.common.metrics import start_metrics_server
from libs.common.privacy import UserRefs, redact_user_event
from libs.common.server import ServiceRuntime, mongo_probe, redis_probe, tcp_probe
from libs.common.stores import make_mongo, make_redis, mongo_credentials, redis_credentials
from services.scoring import metrics
from services.scoring.config import ScoringSettings
from services.scoring.consumer import (
    ArchiveSync,
    CategoryCache,
    EventApplier,
    ModelUpdates,
    Ownership,
    Publisher,
    event_problem,
)
from services.scoring.foldin import ModelHolder, Recommender
from services.scoring.forget import ForgetListener, ForgottenFilter, skip_forgotten
from services.scoring.interactions import InteractionState
from services.scoring.registry import ModelRegistry
from services.scoring.server import ScoringServicer
from services.scoring.style_profile import CatalogCentroid, EmbeddingSource, ProfileWriter
from services.scoring.trainer import Trainer, TrainingError, TrainScheduler, archive_events
from services.scoring.user_sums import UserSums

log = logging.getLogger("services.scoring")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m services.scoring")
    parser.add_argument("--role", choices=["serving", "trainer"], help="overrides STYLEREC_ROLE")
    parser.add_argument("--once", action="store_true", help="trainer: train once, publish, exit")
    parser.add_argument("--algorithm", help="trainer: algorithm to train (default STYLEREC_ALGORITHM)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        settings = ScoringSettings()
    except ValidationError as exc:
        # A bad setting (e.g. STYLEREC_REPEAT_POLICY=sometimes) is refused before anything starts,
        # with pydantic's message naming the variable and the allowed values, and exit code 2.
        print(f"scoring: invalid settings:\n{exc}", file=sys.stderr)
        sys.exit(2)
    if args.role:
        settings = settings.model_copy(update={"role": args.role})
    replica = settings.replica_name or f"{socket.gethostname()}:{os.getpid()}"
    settings = settings.model_copy(update={"replica_name": replica})
    configure_logging(settings.service_name, settings.log_level)
    if settings.role == "trainer":
        sys.exit(run_trainer(settings, args.once, args.algorithm or ""))
    run_serving(settings)


def run_trainer(settings: ScoringSettings, once: bool, algorithm: str) -> int:
    """The CronJob/loop trainer: no gRPC, just metrics, train, publish."""
    if not once:
        start_metrics_server(settings.metrics_port)
    mongo = make_mongo(settings.mongo_uri, settings.store_timeout_s, **mongo_credentials(settings))
    r = make_redis(settings.redis_url, settings.store_timeout_s, settings.store_retries, **redis_credentials(settings))
    producer = ProtoProducer(settings.kafka_servers, client_id="scoring-trainer", security=kafka_security(settings))
    db = mongo[settings.mongo_db]
    trainer = Trainer(settings, db, ModelRegistry(db, settings.models_collection), producer, r)
    stop = threading.Event()

    def on_signal(_signum: int, _frame: Any) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    interval = settings.train_interval_s or 3600.0
    rc = 0
    try:
        while True:
            try:
                sm = trainer.train(algorithm, "trainer")
                print(f"published {sm.version}", flush=True)
                rc = 0
            except TrainingError as exc:
                log.error("training failed", extra={"reason": str(exc)})
                rc = 1
            if once or stop.wait(interval):
                break
    finally:
        producer.close()
        mongo.close()
    return rc


def run_serving(settings: ScoringSettings) -> None:
    try:
        # The key of the forgotten-users list (user references are keyed hashes of pseudonyms).
        refs = UserRefs(settings.effective_pseudonym_secret())
    except ValueError as exc:
        log.error("refusing to start", extra={"error": str(exc)})
        sys.exit(2)
    runtime = ServiceRuntime(settings)
    r = make_redis(settings.redis_url, settings.store_timeout_s, settings.store_retries, **redis_credentials(settings))
    mongo = make_mongo(settings.mongo_uri, settings.store_timeout_s, **mongo_credentials(settings))
    db = mongo[settings.mongo_db]
    producer = ProtoProducer(settings.kafka_servers, client_id="scoring", security=kafka_security(settings))
    runtime.require("kafka", tcp_probe(settings.kafka_servers))
    runtime.require("redis", redis_probe(r))
    runtime.require("mongo", mongo_probe(mongo))
    ready = threading.Event()
    runtime.require("state", ready.is_set)

    # Applied ids are kept at least as long as the archive sync can read their events again.
    id_window_s = settings.archive_slack_s + settings.archive_sync_s + 60.0
    state = InteractionState(
        settings.event_weights(),
        settings.half_life_days * 86400,
        id_window_s=id_window_s,
        repeat_half_lives_s=settings.repeat_half_lives_s(),
    )
    forgotten = ForgottenFilter(refs)
    state.exclude = forgotten
    holder = ModelHolder()
    categories = CategoryCache(db, settings.items_collection)
    engine = Recommender(
        state,
        holder,
        settings.new_item_slots,
        categories,
        categories.newest,
        repeat=settings.repeat_policy == "decay",
        user_sums=UserSums(settings.foldin_sums_users, settings.foldin_sums_min_items),
    )
    embeddings = EmbeddingSource(
        r, db, settings.items_collection, settings.embedding_dim, cache_ttl_s=settings.embedding_cache_s
    )
    centroid = CatalogCentroid(r, settings.embedding_dim, settings.style_centroid_refresh_s)
    profiles = ProfileWriter(r, embeddings, settings.profile_half_confidence_weight, settings.recs_ttl_s, centroid)
    publisher = Publisher(settings, r, state, engine, profiles, categories)
    applier = EventApplier(state, publisher)
    consumer = ProtoConsumerLoop(
        bootstrap=settings.kafka_servers,
        group_id=settings.consumer_group,
        topics=[USER_EVENTS],
        message_type=common_pb2.Event,
        handle=skip_forgotten(applier, forgotten),
        producer=producer,
        service="scoring",
        max_poll_records=settings.foldin_batch_max,
        max_poll_interval_ms=settings.kafka_max_poll_interval_ms,
        session_timeout_ms=settings.kafka_session_timeout_ms,
        validate=event_problem,
        fetch_max_wait_ms=settings.kafka_fetch_max_wait_ms,
        poll_tick_s=settings.kafka_poll_tick_ms / 1000,
        security=kafka_security(settings),
        redact=redact_user_event,
    )
    ownership = Ownership(consumer.assignment, state, publisher)
    registry = ModelRegistry(db, settings.models_collection)
    updates = ModelUpdates(settings, registry, holder, on_swap=lambda _sm: ownership.rewrite_in_background())
    trainer = Trainer(settings, db, registry, producer, r, on_published=updates.install)
    scheduler = TrainScheduler(settings, trainer, lambda: applier.applied, holder.age_s)
    archive_sync = ArchiveSync(settings, db, state, publisher, categories, ownership.partitions)
    forget_listener = ForgetListener(
        settings.kafka_servers,
        settings.replica_name,
        db,
        r,
        state,
        forgotten,
        on_forgotten=lambda: publisher.popularity(force=True),
        security=kafka_security(settings),
    )
    servicer = ScoringServicer(
        engine, holder, trainer, settings.replica_name, ownership.partitions, AuditLog(db, settings.service_name)
    )
    runtime.add_service("stylerec.v1.ScoringService", scoring_pb2_grpc.add_ScoringServiceServicer_to_server, servicer)

    def bootstrap() -> None:
        """Archive → state, newest model (or a first training), then start consuming."""
        try:
            # The suppression list first: no forgotten user's event may enter the state.
            forget_listener.load()
            archive_sync.begin()
            n = state.apply_all(archive_events(db, settings.events_collection))
            metrics.EVENTS_APPLIED.labels("archive", "new").inc(n)
            categories.refresh()
            log.info("state rebuilt from archive", extra={"events": n, "users": state.n_users})
            if not updates.load_latest() and settings.train_on_start and state.events >= settings.min_train_events:
                try:
                    trainer.train(trigger="start")
                except TrainingError as exc:
                    log.warning("start-up training skipped", extra={"reason": str(exc)})
            publisher.popularity(force=True)
        except Exception:
            archive_sync.full_needed = True
            log.exception("bootstrap from the archive failed; the archive sync will retry a full read")
        # Neither the centroid's SCAN nor the embeddings' MongoDB fallback may stall the consumer.
        centroid.start()
        embeddings.start_backfill()
        publisher.start()
        forget_listener.start()
        consumer.start()
        updates.start()
        archive_sync.start()
        ownership.start()
        scheduler.start()
        ready.set()

    runtime.on_shutdown(mongo.close)
    runtime.on_shutdown(producer.close)
    runtime.on_shutdown(consumer.stop)
    runtime.on_shutdown(forget_listener.stop)
    runtime.on_shutdown(updates.stop)
    runtime.on_shutdown(archive_sync.stop)
    runtime.on_shutdown(ownership.stop)
    runtime.on_shutdown(scheduler.stop)
    runtime.on_shutdown(publisher.stop)
    runtime.on_shutdown(centroid.stop)
    runtime.on_shutdown(embeddings.stop)
    runtime.start()
    threading.Thread(target=bootstrap, name="bootstrap", daemon=True).start()
    runtime.serve_forever()


if __name__ == "__main__":
    main()
