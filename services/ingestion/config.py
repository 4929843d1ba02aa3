"""Ingestion settings (env prefix STYLEREC_)."""

from __future__ import annotations

from pydantic import Field

from libs.common.settings import ServiceSettings


class IngestionSettings(ServiceSettings):
    service_name: str = "ingestion"
    grpc_port: int = Field(50051, ge=0, le=65535, description="gRPC port of ingestion.")
    metrics_port: int = Field(9101, ge=0, le=65535, description="Metrics port of ingestion.")
    max_batch_events: int = Field(10_000, ge=1, le=1_000_000, description="Max events per IngestEvents call.")
    max_id_length: int = Field(128, ge=8, le=1024, description="Max length of user/item/event ids.")
    max_past_days: float = Field(3650 * 2, gt=0, description="Oldest accepted event timestamp, in days.")
    max_future_s: float = Field(300, ge=0, description="How far in the future an event timestamp may be.")
    publish_timeout_s: float = Field(10, gt=0, le=120, description="Wait for broker acks before UNAVAILABLE.")
