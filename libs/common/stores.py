"""Redis and MongoDB clients with timeouts, bounded retries and credentials.

Both stores are reached over the network from every replica; a hung socket
must never hold a gRPC worker thread forever, so every call is bounded.
Credentials (passwords, CA bundles) come from the settings object, i.e. from
env vars filled by a Kubernetes Secret, never from files in the repository;
URLs that may carry a password are only ever logged through :func:`redact_url`.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

import redis
from pymongo import MongoClient
from pymongo.database import Database
from pymongo.errors import AutoReconnect, NetworkTimeout, ServerSelectionTimeoutError
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

if TYPE_CHECKING:
    from libs.common.settings import ServiceSettings

# scheme://user:password@ -- a password must be percent-encoded, so it holds no '@' or '/'.
_PASSWORD_IN_URL = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.-]*://[^:@/]*):[^@/]*@")


def redact_url(url: str) -> str:
    """``url`` with any password replaced by ``***`` (user name kept): the only form fit for logs."""
    return _PASSWORD_IN_URL.sub(r"\g<head>:***@", url)


def redis_credentials(settings: ServiceSettings) -> dict[str, Any]:
    """Keyword arguments of :func:`make_redis` from the settings' Redis credential fields."""
    return {
        "password": settings.redis_password.get_secret_value(),
        "username": settings.redis_username,
        "tls_ca_file": settings.redis_tls_ca_file,
    }


def make_redis(
    url: str,
    timeout_s: float = 2.0,
    retries: int = 3,
    *,
    password: str = "",
    username: str = "",
    tls_ca_file: str = "",
) -> redis.Redis:
    """A bounded Redis client; ``rediss://`` speaks TLS, verified against ``tls_ca_file`` when given.

    A password or user name inside ``url`` wins over the arguments (redis-py's own rule), so
    either place works; the env/Secret form keeps the password out of the URL and its logs.
    """
    extra: dict[str, Any] = {}
    if password:
        extra["password"] = password
    if username:
        extra["username"] = username
    if url.startswith("rediss://"):
        extra["ssl_cert_reqs"] = "required"
        if tls_ca_file:
            extra["ssl_ca_certs"] = tls_ca_file
    return redis.Redis.from_url(
        url,
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        retry=Retry(ExponentialBackoff(cap=0.5, base=0.02), retries),
        retry_on_error=[redis.ConnectionError, redis.TimeoutError],
        health_check_interval=30,
        **extra,
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


def mongo_credentials(settings: ServiceSettings) -> dict[str, Any]:
    """Keyword arguments of :func:`make_mongo` from the settings' MongoDB credential fields."""
    return {
        "username": settings.mongo_username,
        "password": settings.mongo_password.get_secret_value(),
        "auth_source": settings.mongo_auth_source,
        "tls_ca_file": settings.mongo_tls_ca_file,
    }


def mongo_client_options(
    timeout_s: float = 2.0, *, username: str = "", password: str = "", auth_source: str = "", tls_ca_file: str = ""
) -> dict[str, Any]:
    """The MongoClient keyword arguments :func:`make_mongo` uses (split out so tests can read them)."""
    ms = int(timeout_s * 1000)
    options: dict[str, Any] = {
        "serverSelectionTimeoutMS": ms,
        "connectTimeoutMS": ms,
        "socketTimeoutMS": ms * 5,
        "retryWrites": False,  # the embedded Mongo-protocol server has no sessions
    }
    if username:
        options["username"] = username
        options["password"] = password
        if auth_source:
            options["authSource"] = auth_source
    if tls_ca_file:
        options["tls"] = True
        options["tlsCAFile"] = tls_ca_file
    return options


def make_mongo(
    uri: str,
    timeout_s: float = 2.0,
    *,
    username: str = "",
    password: str = "",
    auth_source: str = "",
    tls_ca_file: str = "",
) -> MongoClient:
    """A bounded MongoClient; credentials as arguments (from a Secret) or inside ``uri``."""
    return MongoClient(
        uri,
        **mongo_client_options(
            timeout_s, username=username, password=password, auth_source=auth_source, tls_ca_file=tls_ca_file
        ),
    )


def mongo_db(client: MongoClient, name: str) -> Database:
    return client[name]
