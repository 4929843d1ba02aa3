"""Gateway settings (env prefix STYLEREC_)."""

from __future__ import annotations

from pydantic import Field

from libs.common.settings import ServiceSettings


class GatewaySettings(ServiceSettings):
    service_name: str = "gateway"
    grpc_port: int = Field(50054, ge=0, le=65535, description="gRPC port of the gateway.")
    metrics_port: int = Field(9104, ge=0, le=65535, description="Metrics port of the gateway.")
    scoring_addr: str = Field("127.0.0.1:50052", description="host:port of the scoring service.")
    style_worker_addr: str = Field("127.0.0.1:50053", description="host:port of the style worker.")
    default_k: int = Field(10, ge=1, le=200, description="k when the caller sends 0.")
    max_k: int = Field(200, ge=1, le=1000, description="Largest k a caller may ask for.")
