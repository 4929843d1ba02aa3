"""The one way to open a gRPC channel to a StyleRec service: TLS/mTLS and the bearer token.

Every client (the gateway calling scoring, the CLI, the health checks, the
benchmarks) goes through :func:`make_channel`, so switching a deployment to
TLS + tokens is a matter of env vars, never of finding the one call site that
still opens ``insecure_channel``.

The token is added by a client interceptor rather than gRPC call credentials:
gRPC refuses call credentials on a plaintext channel, and a dev stack with
tokens but without certificates is a legitimate way to try authorization.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import grpc
from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from libs.common.settings import ServiceSettings
from libs.common.tls import KeyPair, TLSConfigError, read_ca

ChannelOption = tuple[str, Any]
S = TypeVar("S", bound=BaseSettings)


def settings_from_env(cls: type[S], env: Mapping[str, str]) -> S:
    """``cls`` validated from the STYLEREC_ variables of ``env`` instead of this process's environment
    (the Stack knows the env it started a service with; its health checks need that service's view)."""
    fields = set(cls.model_fields)
    values: dict[str, Any] = {k[len("STYLEREC_") :].lower(): v for k, v in env.items() if k.startswith("STYLEREC_")}
    values = {k: v for k, v in values.items() if k in fields}
    # An env prefix nothing uses, so only the given mapping counts.
    values["_env_prefix"] = "STYLEREC_IGNORED_ENV_"
    return cls(**values)


class ClientSettings(BaseSettings):
    """The client half of the security settings, for processes that only call (the CLI, benchmarks).

    Same env var names as :class:`ServiceSettings`, so one set of exports serves
    a service and the CLI run next to it.
    """

    model_config = SettingsConfigDict(env_prefix="STYLEREC_", extra="ignore", frozen=True)

    tls_ca_file: str = Field("", description="CA that verifies the server's certificate ('' = plaintext).")
    tls_cert_file: str = Field("", description="Client certificate presented under mTLS.")
    tls_key_file: str = Field("", description="Private key of tls_cert_file.")
    tls_server_name: str = Field("", description="Name checked in the server's certificate ('' = the host).")
    auth_token: SecretStr = Field(SecretStr(""), description="Bearer token sent with every call.")


@dataclass(frozen=True)
class ClientSecurity:
    """What a client needs to reach a server: trust roots (TLS on when set), an optional client
    cert for mTLS, the name to check in the server's cert, and the bearer token."""

    root_pem: bytes | None = None
    cert_pem: bytes | None = None
    key_pem: bytes | None = None
    server_name: str = ""
    token: SecretStr = field(default_factory=lambda: SecretStr(""))

    @property
    def tls(self) -> bool:
        return self.root_pem is not None

    @classmethod
    def plaintext(cls) -> ClientSecurity:
        return cls()

    @classmethod
    def from_settings(cls, settings: ServiceSettings | ClientSettings) -> ClientSecurity:
        """TLS when a CA is configured; the process's own cert/key doubles as its client cert."""
        if bool(settings.tls_cert_file) != bool(settings.tls_key_file):
            raise TLSConfigError("STYLEREC_TLS_CERT_FILE and STYLEREC_TLS_KEY_FILE must be set together")
        if not settings.tls_ca_file:
            return cls(token=settings.auth_token)
        cert = key = None
        if settings.tls_cert_file:
            pair = KeyPair.load(settings.tls_cert_file, settings.tls_key_file)
            cert, key = pair.cert_pem, pair.key_pem
        return cls(read_ca(settings.tls_ca_file), cert, key, settings.tls_server_name, settings.auth_token)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> ClientSecurity:
        """From STYLEREC_TLS_* / STYLEREC_AUTH_TOKEN in ``env`` (default: this process's environment)."""
        return cls.from_settings(ClientSettings() if env is None else settings_from_env(ClientSettings, env))

    @classmethod
    def for_own_server(cls, settings: ServiceSettings) -> ClientSecurity:
        """How to reach the server these settings configure (health checks of a service or a stack).

        TLS iff the server has a certificate; trust its CA (or the certificate
        itself when no CA is set: self-signed); present its own cert when it
        demands client certs; check the first name in its own certificate, since
        the probe dials 127.0.0.1 while the cert names the service.
        """
        if not settings.tls_enabled:
            return cls(token=settings.auth_token)
        pair = KeyPair.load(settings.tls_cert_file, settings.tls_key_file)
        roots = read_ca(settings.tls_ca_file) if settings.tls_ca_file else pair.cert_pem
        names = pair.names()
        cert, key = (pair.cert_pem, pair.key_pem) if settings.tls_client_auth else (None, None)
        return cls(roots, cert, key, names[0] if names else "", settings.auth_token)

    def channel_credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=self.root_pem, private_key=self.key_pem, certificate_chain=self.cert_pem
        )


class _TokenInterceptor(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """Adds ``authorization: Bearer <token>`` to every call's metadata."""

    def __init__(self, token: str) -> None:
        self._header = ("authorization", f"Bearer {token}")

    def _details(self, details: grpc.ClientCallDetails) -> grpc.ClientCallDetails:
        metadata = [*(details.metadata or ()), self._header]
        return _CallDetails(
            details.method,
            details.timeout,
            metadata,
            details.credentials,
            getattr(details, "wait_for_ready", None),
            getattr(details, "compression", None),
        )

    def intercept_unary_unary(
        self, continuation: Callable[..., Any], details: grpc.ClientCallDetails, request: Any
    ) -> Any:
        return continuation(self._details(details), request)

    def intercept_unary_stream(
        self, continuation: Callable[..., Any], details: grpc.ClientCallDetails, request: Any
    ) -> Any:
        return continuation(self._details(details), request)

    def intercept_stream_unary(
        self, continuation: Callable[..., Any], details: grpc.ClientCallDetails, request_iterator: Iterator[Any]
    ) -> Any:
        return continuation(self._details(details), request_iterator)

    def intercept_stream_stream(
        self, continuation: Callable[..., Any], details: grpc.ClientCallDetails, request_iterator: Iterator[Any]
    ) -> Any:
        return continuation(self._details(details), request_iterator)


class _CallDetails(grpc.ClientCallDetails):
    def __init__(
        self,
        method: str,
        timeout: float | None,
        metadata: Sequence[tuple[str, str | bytes]] | None,
        credentials: grpc.CallCredentials | None,
        wait_for_ready: bool | None,
        compression: grpc.Compression | None,
    ) -> None:
        self.method = method
        self.timeout = timeout
        self.metadata = metadata
        self.credentials = credentials
        self.wait_for_ready = wait_for_ready
        self.compression = compression


def make_channel(
    address: str, security: ClientSecurity | None = None, options: Sequence[ChannelOption] = ()
) -> grpc.Channel:
    """A channel to ``address``: TLS/mTLS when ``security`` has trust roots, plaintext otherwise;
    the bearer token (if any) on every call. ``None`` = plaintext without a token."""
    security = security or ClientSecurity.plaintext()
    opts = list(options)
    if security.tls:
        if security.server_name:
            opts.append(("grpc.ssl_target_name_override", security.server_name))
        channel = grpc.secure_channel(address, security.channel_credentials(), options=opts)
    else:
        channel = grpc.insecure_channel(address, options=opts)
    token = security.token.get_secret_value()
    if token:
        return grpc.intercept_channel(channel, _TokenInterceptor(token))
    return channel


def env_channel(address: str, options: Sequence[ChannelOption] = ()) -> grpc.Channel:
    """A channel configured from this process's STYLEREC_TLS_* / STYLEREC_AUTH_TOKEN (CLI clients)."""
    return make_channel(address, ClientSecurity.from_env(), options)


def describe_rpc_error(exc: grpc.RpcError) -> str:
    """``CODE: details`` plus what to set when the failure is about credentials."""
    code = exc.code() if callable(getattr(exc, "code", None)) else None
    details = exc.details() if callable(getattr(exc, "details", None)) else str(exc)
    text = f"{code.name if code else 'error'}: {details}"
    if code == grpc.StatusCode.UNAUTHENTICATED:
        text += " (set STYLEREC_AUTH_TOKEN to a token the server accepts)"
    elif code == grpc.StatusCode.PERMISSION_DENIED:
        text += " (the token's caller lacks the role this call needs; see docs/security.md)"
    elif code == grpc.StatusCode.UNAVAILABLE and not os.environ.get("STYLEREC_TLS_CA_FILE"):
        text += " (if the server uses TLS, set STYLEREC_TLS_CA_FILE to its CA)"
    elif code == grpc.StatusCode.UNAVAILABLE:
        text += " (with TLS: check STYLEREC_TLS_CA_FILE, STYLEREC_TLS_CERT_FILE/KEY_FILE, STYLEREC_TLS_SERVER_NAME)"
    return text
