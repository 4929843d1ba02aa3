"""Prometheus metrics shared by all services: RED per RPC from a server interceptor,
dependency health, Kafka consumer lag, and the /metrics HTTP endpoint.

Every metric is prefixed ``stylerec_``; the per-service ones live in each
service's own ``metrics.py``. The catalog is in docs/metrics.md.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc
from prometheus_client import Counter, Gauge, Histogram, start_http_server

RPC_STARTED = Counter(
    "stylerec_grpc_server_started_total",
    "RPCs started on the server.",
    ["grpc_service", "grpc_method"],
)
RPC_HANDLED = Counter(
    "stylerec_grpc_server_handled_total",
    "RPCs completed on the server, by status code.",
    ["grpc_service", "grpc_method", "grpc_code"],
)
RPC_LATENCY = Histogram(
    "stylerec_grpc_server_handling_seconds",
    "Time from receiving an RPC to sending its final status.",
    ["grpc_service", "grpc_method"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
DEPENDENCY_UP = Gauge(
    "stylerec_dependency_up",
    "1 when the last probe of a dependency (kafka, redis, mongo) succeeded.",
    ["dependency"],
)
SERVING = Gauge("stylerec_serving", "1 while the service reports SERVING on grpc.health.v1.")
CONSUMER_LAG = Gauge(
    "stylerec_kafka_consumer_lag_messages",
    "Messages between the committed/consumed position and the partition end.",
    ["group", "topic", "partition"],
)
CONSUMED = Counter(
    "stylerec_kafka_messages_consumed_total",
    "Kafka messages handled by a consumer, by outcome (ok, dead_letter, skipped, error).",
    ["group", "topic", "outcome"],
)
CONSUMER_BATCH = Histogram(
    "stylerec_kafka_consumer_batch_seconds",
    "Wall time of each step of a consumer's poll -> handle -> commit cycle, for polls that returned"
    " records (poll: the poll call, which waits for the fetch; handle: decoding and the service's"
    " batch handler; commit: the offset commit). An event waits about two cycles.",
    ["group", "phase"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
PRODUCED = Counter(
    "stylerec_kafka_messages_produced_total",
    "Kafka messages produced, by outcome (ok, error).",
    ["topic", "outcome"],
)
DEAD_LETTERS = Counter(
    "stylerec_dead_letters_total",
    "Messages sent to a dead-letter topic, by reason class.",
    ["topic", "reason"],
)
AUTH_FAILURES = Counter(
    "stylerec_auth_failures_total",
    "RPCs refused by caller authentication/authorization (missing_token, invalid_token, permission_denied).",
    ["service", "method", "reason"],
)
STORE_ERRORS = Counter(
    "stylerec_store_errors_total",
    "Errors talking to Redis or MongoDB after retries.",
    ["store", "operation"],
)


def start_metrics_server(port: int) -> int:
    """Start the /metrics endpoint; returns the bound port (useful when port=0)."""
    server, _thread = start_http_server(port)
    return int(server.server_address[1])


def _split(full_method: str) -> tuple[str, str]:
    # "/stylerec.v1.GatewayService/GetRecommendations"
    _, service, method = full_method.split("/", 2) if full_method.count("/") >= 2 else ("", "", full_method)
    return service, method


def _code_name(context: grpc.ServicerContext, error: BaseException | None) -> str:
    code = context.code() if hasattr(context, "code") else None
    if isinstance(code, grpc.StatusCode):
        return code.name
    if error is not None:
        return grpc.StatusCode.UNKNOWN.name
    return grpc.StatusCode.OK.name


class MetricsInterceptor(grpc.ServerInterceptor):
    """Counts and times every RPC; streaming RPCs are timed until the stream ends."""

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        service, method = _split(handler_call_details.method)
        if service.startswith("grpc.reflection"):
            return handler

        def observe(context: grpc.ServicerContext, start: float, error: BaseException | None) -> None:
            RPC_HANDLED.labels(service, method, _code_name(context, error)).inc()
            RPC_LATENCY.labels(service, method).observe(time.perf_counter() - start)

        def wrap_unary(fn: Callable[[Any, grpc.ServicerContext], Any]) -> Callable[..., Any]:
            def wrapped(request: Any, context: grpc.ServicerContext) -> Any:
                RPC_STARTED.labels(service, method).inc()
                start = time.perf_counter()
                error: BaseException | None = None
                try:
                    return fn(request, context)
                except BaseException as exc:
                    error = exc
                    raise
                finally:
                    observe(context, start, error)

            return wrapped

        def wrap_stream(fn: Callable[[Any, grpc.ServicerContext], Iterator[Any]]) -> Callable[..., Any]:
            def wrapped(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
                RPC_STARTED.labels(service, method).inc()
                start = time.perf_counter()
                error: BaseException | None = None
                try:
                    yield from fn(request, context)
                except BaseException as exc:
                    error = exc
                    raise
                finally:
                    observe(context, start, error)

            return wrapped

        if handler.unary_unary:
            return handler._replace(unary_unary=wrap_unary(handler.unary_unary))
        if handler.stream_unary:
            return handler._replace(stream_unary=wrap_unary(handler.stream_unary))
        if handler.unary_stream:
            return handler._replace(unary_stream=wrap_stream(handler.unary_stream))
        if handler.stream_stream:
            return handler._replace(stream_stream=wrap_stream(handler.stream_stream))
        return handler
