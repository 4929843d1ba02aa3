"""One validated settings object per service, read only from environment variables.

Every service subclasses :class:`ServiceSettings`; the fields here are the ones
all four share (addresses of the backbone, ports, mode). Validation happens at
start-up so a typo in an env var stops the process with a clear message
instead of surfacing as a timeout minutes later.
"""

from __future__ import annotations

import os
import re
from typing import Literal, Self

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEV_PSEUDONYM_SECRET = "stylerec-dev-secret-do-not-use-in-production"

# Caller roles (libs/common/authz.py maps every RPC to one of them; docs/security.md).
Role = Literal["ingest", "read", "style", "admin"]
_SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")


class AuthCaller(BaseModel):
    """One entry of STYLEREC_AUTH_CALLERS: who a bearer token belongs to and what it may do.

    Only the SHA-256 of the token is configured, so a leaked ConfigMap or
    Secret dump does not hand out working tokens; it is a SecretStr anyway so
    settings reprs and logs never show it.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.:@-]+$")
    token_sha256: SecretStr
    roles: tuple[Role, ...] = Field(min_length=1)

    @field_validator("token_sha256")
    @classmethod
    def _hex_digest(cls, v: SecretStr) -> SecretStr:
        text = v.get_secret_value().strip().lower()
        if not _SHA256_HEX.match(text):
            raise ValueError("token_sha256 must be the 64-character hex SHA-256 of the token (sha256sum)")
        return SecretStr(text)


class ServiceSettings(BaseSettings):
    """Fields shared by every service. Env vars use the ``STYLEREC_`` prefix."""

    model_config = SettingsConfigDict(env_prefix="STYLEREC_", extra="ignore", frozen=True)

    service_name: str = Field("stylerec", description="Name used in logs and metrics.")
    mode: Literal["dev", "prod"] = Field("dev", description="prod refuses insecure defaults.")
    grpc_host: str = Field("0.0.0.0", description="Interface the gRPC server binds to.")
    grpc_port: int = Field(50051, ge=0, le=65535, description="gRPC port (0 = pick a free one).")
    metrics_port: int = Field(9100, ge=0, le=65535, description="Prometheus /metrics HTTP port.")
    grpc_workers: int = Field(16, ge=1, le=512, description="Thread-pool size of the gRPC server.")
    # Transport-level caps: a larger message is refused with RESOURCE_EXHAUSTED before it is
    # buffered, so a client cannot make a replica allocate more. Each service sets tight defaults
    # for its own payloads (services/*/config.py); these base values are gRPC's own 4 MiB.
    grpc_max_receive_bytes: int = Field(
        4 * 1024 * 1024, ge=1024, le=256 * 1024 * 1024, description="Largest gRPC message this service accepts."
    )
    grpc_max_send_bytes: int = Field(
        4 * 1024 * 1024, ge=1024, le=256 * 1024 * 1024, description="Largest gRPC message this service sends."
    )
    kafka_bootstrap: str = Field("127.0.0.1:9092", description="Kafka bootstrap servers, comma separated.")
    # repr=False: a URL may carry a password (redis://:pw@host, mongodb://user:pw@host); log
    # them only through libs.common.stores.redact_url.
    redis_url: str = Field(
        "redis://127.0.0.1:6379/0", repr=False, description="Redis URL (rediss:// = TLS; may carry a password)."
    )
    mongo_uri: str = Field("mongodb://127.0.0.1:27017", repr=False, description="MongoDB URI.")
    mongo_db: str = Field("stylerec", description="MongoDB database name.")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field("INFO", description="Log level.")
    shutdown_grace_s: float = Field(10.0, gt=0, le=300, description="Time in-flight RPCs get on SIGTERM.")
    health_interval_s: float = Field(2.0, gt=0, le=60, description="How often dependencies are probed.")
    store_timeout_s: float = Field(2.0, gt=0, le=60, description="Socket timeout for Redis/Mongo calls.")
    store_retries: int = Field(3, ge=0, le=10, description="Bounded retries for Redis/Mongo calls.")
    pseudonym_secret: str = Field("", description="HMAC key for user-id pseudonymization (required in prod).")
    kafka_max_poll_interval_ms: int = Field(
        30000, ge=1000, description="Consumer max.poll.interval.ms (short for the embedded broker)."
    )
    kafka_session_timeout_ms: int = Field(10000, ge=1000, description="Consumer session timeout.")

    # --- store credentials (libs/common/stores.py, libs/common/kafka.py kafka_security; docs/security.md) ---
    # Secrets are SecretStr so settings reprs, logs and tracebacks show '**********'; in Kubernetes
    # they come from the stylerec-store-credentials Secret (deploy/k8s, docs/deploy.md).
    redis_password: SecretStr = Field(
        SecretStr(""), description="Redis AUTH password ('' = none, or the one in STYLEREC_REDIS_URL)."
    )
    redis_username: str = Field("", description="Redis ACL user name ('' = the default user).")
    redis_tls_ca_file: str = Field(
        "", description="PEM CA bundle verifying the Redis server certificate (needs a rediss:// URL)."
    )
    mongo_username: str = Field("", description="MongoDB user ('' = none, or the one in STYLEREC_MONGO_URI).")
    mongo_password: SecretStr = Field(SecretStr(""), description="MongoDB password of mongo_username.")
    mongo_auth_source: str = Field("", description="MongoDB database holding the user ('' = the driver's admin).")
    mongo_tls_ca_file: str = Field("", description="PEM CA bundle verifying MongoDB; setting it turns TLS on.")
    kafka_security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = Field(
        "PLAINTEXT", description="Kafka security.protocol of every producer, consumer and admin client."
    )
    kafka_sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] = Field(
        "SCRAM-SHA-512", description="Kafka SASL mechanism (SASL_* protocols only)."
    )
    kafka_sasl_username: str = Field("", description="Kafka SASL user (SASL_* protocols only).")
    kafka_sasl_password: SecretStr = Field(SecretStr(""), description="Kafka SASL password.")
    kafka_ssl_cafile: str = Field("", description="PEM CA bundle verifying the brokers (SSL/SASL_SSL; '' = system).")

    @model_validator(mode="after")
    def _store_credentials_consistent(self) -> Self:
        # Checked at start-up: a half-configured credential otherwise shows up as an
        # authentication timeout on the first request, far from its cause.
        if self.kafka_security_protocol.startswith("SASL_") and not (
            self.kafka_sasl_username and self.kafka_sasl_password.get_secret_value()
        ):
            raise ValueError(
                f"STYLEREC_KAFKA_SECURITY_PROTOCOL={self.kafka_security_protocol} needs "
                "STYLEREC_KAFKA_SASL_USERNAME and STYLEREC_KAFKA_SASL_PASSWORD"
            )
        if self.kafka_ssl_cafile and "SSL" not in self.kafka_security_protocol:
            raise ValueError("STYLEREC_KAFKA_SSL_CAFILE needs STYLEREC_KAFKA_SECURITY_PROTOCOL=SSL or SASL_SSL")
        if bool(self.mongo_username) != bool(self.mongo_password.get_secret_value()):
            raise ValueError("STYLEREC_MONGO_USERNAME and STYLEREC_MONGO_PASSWORD must be set together")
        if self.redis_tls_ca_file and not self.redis_url.startswith("rediss://"):
            raise ValueError("STYLEREC_REDIS_TLS_CA_FILE needs a rediss:// STYLEREC_REDIS_URL")
        for name in ("redis_tls_ca_file", "mongo_tls_ca_file", "kafka_ssl_cafile"):
            path = getattr(self, name)
            if path and not os.path.isfile(path):
                raise ValueError(f"STYLEREC_{name.upper()}={path!r} is not a readable file")
        return self

    # --- transport security and callers (libs/common/tls.py, channels.py, authz.py; docs/security.md) ---
    tls_cert_file: str = Field(
        "",
        description="PEM certificate of this process: server cert, and client cert under mTLS ('' = plaintext).",
    )
    tls_key_file: str = Field("", description="PEM private key of tls_cert_file.")
    tls_ca_file: str = Field(
        "", description="PEM CA bundle that verifies peers: client certs (server side), server certs (client side)."
    )
    tls_client_auth: bool = Field(False, description="Require client certificates signed by tls_ca_file (mTLS).")
    tls_server_name: str = Field(
        "", description="Name checked in the certificates of the services this process calls ('' = their host)."
    )
    auth_required: bool = Field(
        False, description="Reject RPCs without a valid bearer token (always on in prod; health stays open)."
    )
    auth_callers: tuple[AuthCaller, ...] = Field(
        (), description='JSON list of {"name", "token_sha256", "roles"}: the callers this server accepts.'
    )
    auth_token: SecretStr = Field(
        SecretStr(""), description="Bearer token this process presents to the services it calls ('' = none)."
    )

    @field_validator("kafka_bootstrap")
    @classmethod
    def _bootstrap_has_port(cls, v: str) -> str:
        for part in v.split(","):
            host, sep, port = part.strip().rpartition(":")
            if not sep or not host or not port.isdigit():
                raise ValueError(f"expected host:port[,host:port], got {v!r}")
        return v

    @field_validator("auth_callers")
    @classmethod
    def _callers_unique(cls, v: tuple[AuthCaller, ...]) -> tuple[AuthCaller, ...]:
        names = [c.name for c in v]
        digests = [c.token_sha256.get_secret_value() for c in v]
        if len(set(names)) != len(names):
            raise ValueError(f"caller names must be unique, got {sorted(names)}")
        if len(set(digests)) != len(digests):
            raise ValueError("two callers share one token_sha256: each caller needs its own token")
        return v

    @property
    def tls_enabled(self) -> bool:
        """The gRPC server of this process speaks TLS."""
        return bool(self.tls_cert_file or self.tls_key_file)

    def security_problems(self) -> list[str]:
        """Why this TLS/auth configuration cannot start (empty = it can); prod refuses plaintext and open access."""
        problems = []
        if bool(self.tls_cert_file) != bool(self.tls_key_file):
            problems.append("STYLEREC_TLS_CERT_FILE and STYLEREC_TLS_KEY_FILE must be set together")
        if self.tls_client_auth and not self.tls_ca_file:
            problems.append("STYLEREC_TLS_CLIENT_AUTH=true needs STYLEREC_TLS_CA_FILE to verify client certificates")
        if self.tls_client_auth and not self.tls_enabled:
            problems.append("STYLEREC_TLS_CLIENT_AUTH=true needs STYLEREC_TLS_CERT_FILE/KEY_FILE (mTLS is TLS first)")
        if self.auth_required and not self.auth_callers:
            problems.append("STYLEREC_AUTH_REQUIRED=true but STYLEREC_AUTH_CALLERS is empty: nobody could call")
        if self.mode == "prod":
            if not self.tls_enabled:
                problems.append(
                    "STYLEREC_MODE=prod refuses plaintext gRPC: set STYLEREC_TLS_CERT_FILE and STYLEREC_TLS_KEY_FILE"
                )
            if not self.auth_callers:
                problems.append("STYLEREC_MODE=prod refuses unauthenticated access: set STYLEREC_AUTH_CALLERS")
        return problems

    @property
    def auth_enforced(self) -> bool:
        """Every RPC (health and reflection aside) needs a valid token: configured, or prod."""
        return self.auth_required or self.mode == "prod"

    @property
    def kafka_servers(self) -> list[str]:
        return [p.strip() for p in self.kafka_bootstrap.split(",")]

    def effective_pseudonym_secret(self) -> str:
        """The HMAC key; prod refuses to run without one, dev falls back loudly."""
        if self.pseudonym_secret:
            return self.pseudonym_secret
        if self.mode == "prod":
            raise ValueError("STYLEREC_PSEUDONYM_SECRET must be set when STYLEREC_MODE=prod")
        return DEV_PSEUDONYM_SECRET
