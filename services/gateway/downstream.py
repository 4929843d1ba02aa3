"""The gateway's downstream parts (Redis, MongoDB + GridFS, scoring) behind one timed, guarded call.

Every call goes through :meth:`Downstream.call`: it is skipped when the part's
breaker is open, bounded by the request deadline, timed into
``stylerec_gateway_downstream_seconds`` and turned into
:class:`DependencyUnavailable` on failure, which the callers catch to degrade.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, TypeVar

import grpc
import pymongo
import redis
from gridfs import GridFSBucket
from pymongo.database import Database
from stylerec.v1 import scoring_pb2_grpc

from libs.common.metrics import STORE_ERRORS
from services.gateway.config import GatewaySettings
from services.gateway.deadlines import Breaker, Deadline, DependencyUnavailable
from services.gateway.metrics import DEGRADED_PARTS, DOWNSTREAM_SECONDS

T = TypeVar("T")

REDIS = "redis"
MONGO = "mongo"
SCORING = "scoring"


def text(value: object) -> str:
    """A Redis reply (bytes, str or None) as text."""
    if value is None:
        return ""
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value).decode()
    return str(value)


# Codes that mean scoring is broken or overloaded; others (NOT_FOUND, FAILED_PRECONDITION,
# INVALID_ARGUMENT, ...) are answers about the request and must not open the breaker.
TRANSIENT_GRPC = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.INTERNAL,
    grpc.StatusCode.UNKNOWN,
    grpc.StatusCode.CANCELLED,
}


def grpc_failure(exc: Exception) -> bool:
    code = exc.code() if isinstance(exc, grpc.RpcError) and callable(getattr(exc, "code", None)) else None
    return code is None or code in TRANSIENT_GRPC


class Downstream:
    def __init__(
        self,
        settings: GatewaySettings,
        r: redis.Redis,
        db: Database[Any] | None,
        scoring_channel: grpc.Channel | None,
    ) -> None:
        self.settings = settings
        self.redis = r
        self.db = db
        self.gridfs = GridFSBucket(db) if db is not None else None
        self.scoring = scoring_pb2_grpc.ScoringServiceStub(scoring_channel) if scoring_channel is not None else None
        self.breakers = {name: Breaker(name, settings.breaker_open_s) for name in (REDIS, MONGO, SCORING)}
        # Labelled histogram children looked up once per (dependency, operation), not per call.
        self._timers: dict[tuple[str, str], Any] = {}

    def call(
        self,
        dependency: str,
        operation: str,
        fn: Callable[[], T],
        deadline: Deadline,
        is_failure: Callable[[Exception], bool] | None = None,
    ) -> T:
        start = time.perf_counter()
        try:
            return self.breakers[dependency].call(fn, deadline, is_failure=is_failure)
        except DependencyUnavailable:
            if dependency in (REDIS, MONGO):
                STORE_ERRORS.labels(dependency, operation).inc()
            raise
        finally:
            timer = self._timers.get((dependency, operation))
            if timer is None:
                timer = self._timers[(dependency, operation)] = DOWNSTREAM_SECONDS.labels(dependency, operation)
            timer.observe(time.perf_counter() - start)

    def redis_call(self, operation: str, fn: Callable[[redis.Redis], T], deadline: Deadline) -> T:
        return self.call(REDIS, operation, lambda: fn(self.redis), deadline)

    def mongo_call(self, operation: str, fn: Callable[[Database[Any]], T], deadline: Deadline) -> T:
        db = self.db
        if db is None:
            raise DependencyUnavailable(MONGO, "not configured")

        def run() -> T:
            # pymongo's client-side operation timeout: the call cannot outlive the request.
            with pymongo.timeout(max(0.001, deadline.timeout(self.settings.mongo_timeout_s))):
                return fn(db)

        return self.call(MONGO, operation, run, deadline)

    def scoring_call(self, operation: str, fn: Callable[[Any, float], T], deadline: Deadline) -> T:
        stub = self.scoring
        if stub is None:
            raise DependencyUnavailable(SCORING, "no scoring address configured")
        return self.call(
            SCORING,
            operation,
            lambda: fn(stub, deadline.timeout(self.settings.scoring_timeout_s)),
            deadline,
            is_failure=grpc_failure,
        )


class Degradation:
    """Collects the parts missing from one answer; the answer says which and why."""

    def __init__(self) -> None:
        self.reasons: list[str] = []

    def add(self, error: DependencyUnavailable | str) -> None:
        text = str(error)
        dependency = error.dependency if isinstance(error, DependencyUnavailable) else text.split(":", 1)[0]
        if text not in self.reasons:
            self.reasons.append(text)
            DEGRADED_PARTS.labels(dependency).inc()

    @property
    def degraded(self) -> bool:
        return bool(self.reasons)

    def reason(self) -> str:
        return "; ".join(self.reasons)[:1000]
