"""Caller authentication (bearer tokens) and per-RPC authorization (roles) for every service.

The permission table below is the one place that says which role each RPC
needs; docs/security.md copies it for operators and a test checks that every
method of every service in ``protos/`` has an entry, so a new RPC is refused
(PERMISSION_DENIED) until someone decides who may call it.

Tokens are configured as SHA-256 digests (STYLEREC_AUTH_CALLERS). The presented
token is hashed and compared with every configured digest using
``hmac.compare_digest``, without stopping at the first match, so the time taken
says nothing about which digest (or how much of it) matched.

Health (``grpc.health.v1``) and reflection stay open: Kubernetes probes and
grpcurl carry no token, and neither reveals data.

Why the check runs inside the wrapped handler, not in ``intercept_service``:
grpc's sync server calls interceptors on its polling thread and the handler on
a pool thread; the caller contextvar (libs/common/auth.py) must be set on the
handler's thread for audit and rate-limit code to see it.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import grpc

from libs.common.auth import ANONYMOUS, caller_scope
from libs.common.metrics import AUTH_FAILURES
from libs.common.settings import AuthCaller, Role

log = logging.getLogger(__name__)

# Full method name -> role required. Roles do not imply each other (admin is not read):
# give a caller every role it needs.
PERMISSIONS: dict[str, Role] = {
    "/stylerec.v1.IngestionService/IngestEvents": "ingest",
    "/stylerec.v1.IngestionService/StreamEvents": "ingest",
    "/stylerec.v1.IngestionService/UpsertItems": "ingest",
    "/stylerec.v1.IngestionService/GetItem": "read",
    "/stylerec.v1.AdminService/ForgetUser": "admin",
    "/stylerec.v1.ScoringService/TopN": "read",
    "/stylerec.v1.ScoringService/Score": "read",
    "/stylerec.v1.ScoringService/SimilarItems": "read",
    "/stylerec.v1.ScoringService/ModelInfo": "read",
    "/stylerec.v1.ScoringService/Train": "admin",
    "/stylerec.v1.StyleWorkerService/Stylize": "style",
    "/stylerec.v1.StyleWorkerService/Embed": "style",
    "/stylerec.v1.StyleWorkerService/ModelInfo": "read",
    "/stylerec.v1.GatewayService/GetRecommendations": "read",
    "/stylerec.v1.GatewayService/GetStylizedImage": "read",
    "/stylerec.v1.GatewayService/GetSimilarItems": "read",
}

# Services anyone may call: probes and tooling.
OPEN_SERVICES = frozenset(
    {
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
        "grpc.reflection.v1.ServerReflection",
    }
)

BEARER = "bearer "


@dataclass(frozen=True)
class Denial:
    code: grpc.StatusCode
    reason: str  # metric label: missing_token, invalid_token, permission_denied
    message: str


@dataclass(frozen=True)
class _Entry:
    name: str
    digest: bytes
    roles: frozenset[str]


def token_digest(token: str) -> str:
    """The hex SHA-256 an operator puts into STYLEREC_AUTH_CALLERS for ``token``."""
    return hashlib.sha256(token.encode()).hexdigest()


def _service_of(method: str) -> str:
    parts = method.split("/")
    return parts[1] if len(parts) >= 3 else ""


class Authorizer:
    """Decides one call: who is calling (from the token) and whether that caller may call the method."""

    def __init__(self, callers: Sequence[AuthCaller], required: bool) -> None:
        self._entries = [
            _Entry(c.name, bytes.fromhex(c.token_sha256.get_secret_value()), frozenset(c.roles)) for c in callers
        ]
        self.required = required

    def identify(self, token: str) -> str | None:
        """The caller owning ``token``, or None; compares against every digest in constant time."""
        presented = hashlib.sha256(token.encode()).digest()
        found: str | None = None
        for entry in self._entries:
            if hmac.compare_digest(presented, entry.digest):
                found = entry.name
        return found

    def _roles(self, name: str) -> frozenset[str]:
        for entry in self._entries:
            if entry.name == name:
                return entry.roles
        return frozenset()

    def decide(self, method: str, metadata: Sequence[tuple[str, Any]] | None) -> str | Denial:
        """The caller name, or why the call is refused."""
        if _service_of(method) in OPEN_SERVICES:
            return ANONYMOUS
        values = [v for k, v in (metadata or ()) if k.lower() == "authorization"]
        if not values:
            if not self.required:
                return ANONYMOUS
            return Denial(
                grpc.StatusCode.UNAUTHENTICATED,
                "missing_token",
                "missing bearer token: send metadata 'authorization: Bearer <token>'",
            )
        header = values[0].decode() if isinstance(values[0], bytes) else str(values[0])
        if len(values) > 1 or not header.lower().startswith(BEARER) or not header[len(BEARER) :].strip():
            return Denial(
                grpc.StatusCode.UNAUTHENTICATED,
                "invalid_token",
                "malformed authorization metadata: expected exactly one 'Bearer <token>'",
            )
        name = self.identify(header[len(BEARER) :].strip())
        if name is None:
            return Denial(grpc.StatusCode.UNAUTHENTICATED, "invalid_token", "unknown bearer token")
        role = PERMISSIONS.get(method)
        if role is None:
            return Denial(
                grpc.StatusCode.PERMISSION_DENIED, "permission_denied", f"{method} is not in the permission table"
            )
        if role not in self._roles(name):
            return Denial(
                grpc.StatusCode.PERMISSION_DENIED,
                "permission_denied",
                f"caller {name!r} lacks role {role!r} required by {method}",
            )
        return name


def _split(method: str) -> tuple[str, str]:
    parts = method.split("/")
    return (parts[1], parts[2]) if len(parts) >= 3 else ("", method)


class AuthInterceptor(grpc.ServerInterceptor):
    """Refuses calls without a permitted token and runs permitted ones inside ``caller_scope``."""

    def __init__(self, authorizer: Authorizer) -> None:
        self.authorizer = authorizer

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        if _service_of(method) in OPEN_SERVICES:
            return handler
        decision = self.authorizer.decide(method, handler_call_details.invocation_metadata)
        service, name = _split(method)

        def deny(context: grpc.ServicerContext, denial: Denial) -> None:
            AUTH_FAILURES.labels(service, name, denial.reason).inc()
            log.warning(
                "call refused",
                extra={"method": method, "reason": denial.reason, "peer": context.peer(), "detail": denial.message},
            )
            context.abort(denial.code, denial.message)

        def wrap_unary(fn: Callable[[Any, grpc.ServicerContext], Any]) -> Callable[..., Any]:
            def wrapped(request: Any, context: grpc.ServicerContext) -> Any:
                if isinstance(decision, Denial):
                    deny(context, decision)
                with caller_scope(str(decision)):
                    return fn(request, context)

            return wrapped

        def wrap_stream(fn: Callable[[Any, grpc.ServicerContext], Iterator[Any]]) -> Callable[..., Any]:
            def wrapped(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
                if isinstance(decision, Denial):
                    deny(context, decision)
                # The generator body runs on the thread that iterates it: set the caller there.
                with caller_scope(str(decision)):
                    yield from fn(request, context)

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
