"""Scoring settings (env prefix STYLEREC_)."""

from __future__ import annotations

from pydantic import Field

from libs.common.settings import ServiceSettings


class ScoringSettings(ServiceSettings):
    service_name: str = "scoring"
    grpc_port: int = Field(50052, ge=0, le=65535, description="gRPC port of scoring.")
    metrics_port: int = Field(9102, ge=0, le=65535, description="Metrics port of scoring.")
    consumer_group: str = Field("scoring", description="Kafka consumer group of the serving replicas.")
    top_n: int = Field(50, ge=1, le=1000, description="Recommendations written per user to Redis.")
    half_life_days: float = Field(30.0, gt=0, description="Half-life of the time decay of interactions.")
    weight_view: float = Field(1.0, ge=0, description="Weight of a VIEW event.")
    weight_click: float = Field(2.0, ge=0, description="Weight of a CLICK event.")
    weight_favorite: float = Field(4.0, ge=0, description="Weight of a FAVORITE event.")
    weight_add_to_cart: float = Field(6.0, ge=0, description="Weight of an ADD_TO_CART event.")
    weight_purchase: float = Field(10.0, ge=0, description="Weight of a PURCHASE event.")
    recs_ttl_s: int = Field(7 * 86400, ge=60, description="TTL of per-user keys in Redis.")
