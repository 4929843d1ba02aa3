"""One validated settings object per service, read only from environment variables.

Every service subclasses :class:`ServiceSettings`; the fields here are the ones
all four share (addresses of the backbone, ports, mode). Validation happens at
start-up so a typo in an env var stops the process with a clear message
instead of surfacing as a timeout minutes later.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEV_PSEUDONYM_SECRET = "stylerec-dev-secret-do-not-use-in-production"


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
    redis_url: str = Field("redis://127.0.0.1:6379/0", description="Redis URL.")
    mongo_uri: str = Field("mongodb://127.0.0.1:27017", description="MongoDB URI.")
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

    @field_validator("kafka_bootstrap")
    @classmethod
    def _bootstrap_has_port(cls, v: str) -> str:
        for part in v.split(","):
            host, sep, port = part.strip().rpartition(":")
            if not sep or not host or not port.isdigit():
                raise ValueError(f"expected host:port[,host:port], got {v!r}")
        return v

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
