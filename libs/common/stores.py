"""Redis and MongoDB clients with timeouts and bounded retries.

Both stores are reached over the network from every replica; a hung socket
must never hold a gRPC worker thread forever, so every call is bounded.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

import redis
from pymongo import MongoClient
from pymongo.database import Database
from pymongo.errors import AutoReconnect, NetworkTimeout, ServerSelectionTimeoutError
from redis.backoff import ExponentialBackoff
from redis.retry import Retry


def make_redis(url: str, timeout_s: float = 2.0, retries: int = 3) -> redis.Redis:
    return redis.Redis.from_url(
        url,
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        retry=Retry(ExponentialBackoff(cap=0.5, base=0.02), retries),
        retry_on_error=[redis.ConnectionError, redis.TimeoutError],
        health_check_interval=30,
    )


T = TypeVar("T")
MONGO_TRANSIENT = (AutoReconnect, NetworkTimeout, ServerSelectionTimeoutError)


def with_retries(
    op: Callable[[], T],
    attempts: int = 3,
    transient: tuple[type[BaseException], ...] = MONGO_TRANSIENT,
    base_delay_s: float = 0.05,
) -> T:
    """Run an idempotent store operation, retrying transient errors a bounded number of times."""
    for attempt in range(attempts + 1):
        try:
            return op()
        except transient:
            if attempt == attempts:
                raise
            time.sleep(base_delay_s * (2**attempt))
    raise AssertionError("unreachable")


def make_mongo(uri: str, timeout_s: float = 2.0) -> MongoClient:
    ms = int(timeout_s * 1000)
    return MongoClient(
        uri,
        serverSelectionTimeoutMS=ms,
        connectTimeoutMS=ms,
        socketTimeoutMS=ms * 5,
        retryWrites=False,  # the embedded Mongo-protocol server has no sessions
    )


def mongo_db(client: MongoClient, name: str) -> Database:
    return client[name]
