"""Training: read the whole archive, fit, publish (registry + GridFS + model-updates).

Training needs every user's events, while a serving replica only consumes its own
partitions, so a training run always starts from the MongoDB archive. The same code
runs inside a serving replica (Train RPC, schedule, after N events; one at a time per
cluster thanks to a Redis lock) and as ``--role trainer`` (a Kubernetes CronJob).
A failed run publishes nothing: serving carries on with the last good model.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import redis
from pymongo.database import Database
from stylerec.v1 import scoring_pb2

from libs.common import keys
from libs.common.kafka import MODEL_UPDATES, ProtoProducer
from libs.common.privacy import UserRefs
from libs.common.stores import MONGO_TRANSIENT
from services.scoring import metrics
from services.scoring.config import ScoringSettings
from services.scoring.forget import load_filter
from services.scoring.interactions import EventRecord, InteractionState
from services.scoring.models import make_model
from services.scoring.registry import ModelRegistry, ServingModel, new_version
from services.scoring.repeat_learning import learn_repeat

log = logging.getLogger(__name__)

ARCHIVE_BATCH = 2000  # archive documents per MongoDB batch when reading events
ARCHIVE_READ_ATTEMPTS = 4


class TrainingError(RuntimeError):
    """Training could not produce a model (no data, bad parameters, fit failure)."""


def archive_events(db: Database, collection: str, archived_since: float | None = None) -> Iterator[EventRecord]:
    """Archived events; with ``archived_since`` only those with ``archived_at >= archived_since``
    (the archiver's clock at the write); malformed documents are skipped.

    One plain range condition on purpose: the indexed ``archived_at`` serves it on MongoDB, and
    nx-27017 turns it into SQL, while an ``$or`` (the sync once also tailed by event time) is
    evaluated document by document over the whole collection there (2.5 s per read of 200,000
    archived events on the dev box, however few match).
    """
    query: dict[str, Any] = {} if archived_since is None else {"archived_at": {"$gte": archived_since}}
    # Streamed in batches, never listed whole: the archive sync reads a window of up to hundreds of
    # thousands of documents every few seconds, and listing it each time left scoring's heap at the
    # size of the largest window ever read (RSS grew with the window through a whole soak). A
    # transient error restarts the read from the beginning: every caller applies to a state that
    # deduplicates by event id, so the documents read twice count once.
    projection = {"user_id": 1, "item_id": 1, "type": 1, "ts": 1, "archived_at": 1}
    for attempt in range(ARCHIVE_READ_ATTEMPTS):
        try:
            for d in db[collection].find(query, projection, batch_size=ARCHIVE_BATCH):
                try:
                    yield EventRecord(
                        str(d["_id"]),
                        str(d["user_id"]),
                        str(d["item_id"]),
                        int(d["type"]),
                        float(d["ts"]),
                        float(d.get("archived_at") or 0.0),
                    )
                except (KeyError, TypeError, ValueError):
                    continue
            return
        except MONGO_TRANSIENT:
            if attempt == ARCHIVE_READ_ATTEMPTS - 1:
                raise
            time.sleep(0.05 * 2**attempt)


def newest_archived_at(db: Database, collection: str) -> float | None:
    """The newest ``archived_at`` in the archive (archiver's clock), None when it is empty."""
    doc = db[collection].find_one({}, {"archived_at": 1}, sort=[("archived_at", -1)])
    try:
        return float(doc["archived_at"]) if doc and doc.get("archived_at") is not None else None
    except (TypeError, ValueError):
        return None


def state_from_archive(
    settings: ScoringSettings, db: Database, keep_events: list[EventRecord] | None = None
) -> InteractionState:
    """The whole archive applied to a fresh state; ``keep_events`` also collects the events read
    (the rebuy blend learns from a held-out part of them, services/scoring/repeat_learning.py)."""
    state = InteractionState(
        settings.event_weights(), settings.half_life_days * 86400, repeat_half_lives_s=settings.repeat_half_lives_s()
    )
    # Forgotten users are deleted from the archive; the filter also covers events archived
    # by a replay racing with the deletion.
    try:
        refs = UserRefs(settings.effective_pseudonym_secret())
    except ValueError as exc:
        raise TrainingError(str(exc)) from exc
    state.exclude = load_filter(db, refs)
    events = archive_events(db, settings.events_collection)
    if keep_events is not None:
        events = collected(events, keep_events, state.exclude)
    n = state.apply_all(events)
    metrics.EVENTS_APPLIED.labels("archive", "new").inc(n)
    return state


def collected(
    events: Iterator[EventRecord], into: list[EventRecord], exclude: Callable[[str], bool] | None
) -> Iterator[EventRecord]:
    """Pass ``events`` through, keeping those of users not excluded in ``into``."""
    for ev in events:
        if exclude is None or not exclude(ev.user_id):
            into.append(ev)
        yield ev


def fit_model(state: InteractionState, algorithm: str, params: dict[str, Any]) -> ServingModel:
    X, users, item_ids = state.matrix()
    if X.nnz == 0:
        raise TrainingError("no interactions to train on")
    try:
        model = make_model(algorithm, **params)
    except ValueError as exc:
        raise TrainingError(str(exc)) from exc
    t0 = time.perf_counter()
    model.fit(X)
    fit_s = time.perf_counter() - t0
    return ServingModel(
        version=new_version(algorithm),
        model=model,
        item_ids=item_ids,
        algorithm=algorithm,
        parameters=dict(model.params),
        metrics={"fit_seconds": round(fit_s, 4), "interactions": float(X.nnz)},
        data_watermark=state.watermark,
        trained_at=time.time(),
        users=len(users),
    )


class Trainer:
    """Runs one training at a time in this process; publishes the result."""

    def __init__(
        self,
        settings: ScoringSettings,
        db: Database,
        registry: ModelRegistry,
        producer: ProtoProducer | None,
        r: redis.Redis | None,
        on_published: Callable[[ServingModel], object] | None = None,
    ) -> None:
        self.settings = settings
        self.db = db
        self.registry = registry
        self.producer = producer
        self.redis = r
        self.on_published = on_published
        self._running = threading.Lock()
        self.last_error = ""
        self.last_version = ""

    @property
    def busy(self) -> bool:
        return self._running.locked()

    def train(self, algorithm: str = "", trigger: str = "rpc") -> ServingModel:
        """Train and publish; raises TrainingError (nothing published) on failure."""
        algorithm = algorithm or self.settings.algorithm
        if not self._running.acquire(blocking=False):
            raise TrainingError("a training run is already in progress in this replica")
        lock_token = f"{time.time()}"
        try:
            if not self._cluster_lock(lock_token):
                metrics.TRAIN_RUNS.labels(algorithm, trigger, "skipped").inc()
                raise TrainingError("another replica is training (lock held)")
            start = time.perf_counter()
            try:
                decay = self.settings.repeat_policy == "decay"
                events: list[EventRecord] | None = [] if decay else None
                state = state_from_archive(self.settings, self.db, events)
                if state.events < self.settings.min_train_events:
                    raise TrainingError(
                        f"only {state.events} archived events; need at least {self.settings.min_train_events}"
                    )
                sm = fit_model(state, algorithm, self.settings.params_for(algorithm))
                if events is not None:
                    sm.repeat = learn_repeat(
                        self.settings, events, state, sm.item_index, algorithm, self.settings.params_for(algorithm)
                    )
                sm.metrics["train_seconds"] = round(time.perf_counter() - start, 4)
                artifact = self.registry.publish(sm)
                self.registry.prune(self.settings.keep_models)
                if self.producer is not None:
                    msg = scoring_pb2.ModelUpdate(model_version=sm.version, algorithm=algorithm, artifact_ref=artifact)
                    msg.trained_at.FromSeconds(int(sm.trained_at))
                    self.producer.send_and_wait(MODEL_UPDATES, algorithm, msg)
            except TrainingError as exc:
                self.last_error = str(exc)
                metrics.TRAIN_RUNS.labels(algorithm, trigger, "error").inc()
                raise
            except Exception as exc:
                self.last_error = f"{type(exc).__name__}: {exc}"
                metrics.TRAIN_RUNS.labels(algorithm, trigger, "error").inc()
                log.exception("training failed; serving keeps the last good model")
                raise TrainingError(self.last_error) from exc
            metrics.TRAIN_SECONDS.labels(algorithm).observe(time.perf_counter() - start)
            metrics.TRAIN_RUNS.labels(algorithm, trigger, "ok").inc()
            self.last_version = sm.version
            log.info(
                "model published",
                extra={"version": sm.version, "trigger": trigger, "users": sm.users, "items": len(sm.item_ids)},
            )
            if self.on_published is not None:
                self.on_published(sm)
            return sm
        finally:
            self._cluster_unlock(lock_token)
            self._running.release()

    def _cluster_lock(self, token: str) -> bool:
        if self.redis is None:
            return True
        return bool(self.redis.set(keys.train_lock(), token, nx=True, ex=600))

    def _cluster_unlock(self, token: str) -> None:
        if self.redis is None:
            return
        try:
            if self.redis.get(keys.train_lock()) == token.encode():
                self.redis.delete(keys.train_lock())
        except redis.RedisError:
            log.warning("could not release the training lock (it expires by itself)")

    def train_in_background(self, algorithm: str = "", trigger: str = "rpc") -> bool:
        if self.busy:
            return False

        def run() -> None:
            try:
                self.train(algorithm, trigger)
            except TrainingError as exc:
                log.warning("training did not publish", extra={"reason": str(exc), "trigger": trigger})

        threading.Thread(target=run, name=f"train-{trigger}", daemon=True).start()
        return True


class TrainScheduler:
    """Triggers: every ``train_interval_s`` and after ``train_after_events`` new events."""

    def __init__(
        self,
        settings: ScoringSettings,
        trainer: Trainer,
        events_seen: Callable[[], int],
        model_age_s: Callable[[], float] = lambda: float("inf"),
    ) -> None:
        self.settings = settings
        self.model_age_s = model_age_s
        self.trainer = trainer
        self.events_seen = events_seen
        self._stop = threading.Event()
        self._last_train = time.monotonic()
        self._events_at_last = events_seen()
        self._thread = threading.Thread(target=self._run, name="train-scheduler", daemon=True)

    def start(self) -> TrainScheduler:
        if self.settings.train_interval_s > 0 or self.settings.train_after_events > 0:
            self._thread.start()
        return self

    def _run(self) -> None:
        s = self.settings
        while not self._stop.wait(1.0):
            now = time.monotonic()
            new_events = self.events_seen() - self._events_at_last
            trigger = ""
            if s.train_interval_s > 0 and now - self._last_train >= s.train_interval_s:
                # Several replicas may run a schedule: a fresh model (trained by any of them and
                # hot-loaded here) resets this replica's timer instead of training again.
                if self.model_age_s() < s.train_interval_s:
                    self._last_train = now - self.model_age_s()
                else:
                    trigger = "schedule"
            elif s.train_after_events > 0 and new_events >= s.train_after_events:
                trigger = "events"
            if trigger and not self.trainer.busy:
                self._last_train = now
                self._events_at_last = self.events_seen()
                self.trainer.train_in_background(trigger=trigger)

    def stop(self) -> None:
        self._stop.set()
