"""Scoring settings (env prefix STYLEREC_); the only place scoring reads configuration."""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import Field, field_validator

from libs.common.settings import ServiceSettings

REPEAT_POLICIES = ("off", "decay")
PURCHASE = 5  # EventType.PURCHASE (common.proto)


class ScoringSettings(ServiceSettings):
    service_name: str = "scoring"
    grpc_port: int = Field(50052, ge=0, le=65535, description="gRPC port of scoring.")
    metrics_port: int = Field(9102, ge=0, le=65535, description="Metrics port of scoring.")
    role: Literal["serving", "trainer"] = Field(
        "serving", description="serving: consume, fold in, serve gRPC; trainer: train from the archive and publish."
    )
    replica_name: str = Field("", description="Name of this replica in logs/ModelInfo (default host:pid).")
    consumer_group: str = Field("scoring", description="Kafka consumer group of the serving replicas.")
    events_collection: str = Field("events", description="MongoDB collection of archived events.")
    items_collection: str = Field("items", description="MongoDB collection of catalog items.")
    models_collection: str = Field("models", description="MongoDB collection of the model registry.")
    top_n: int = Field(50, ge=1, le=1000, description="Recommendations written per user to Redis.")
    # The largest request is Score with 1000 ids of at most 512 characters; answers hold at most
    # 1000 scored items.
    grpc_max_receive_bytes: int = Field(
        1024 * 1024, ge=1024, le=256 * 1024 * 1024, description="Largest gRPC request scoring accepts."
    )
    grpc_max_send_bytes: int = Field(
        4 * 1024 * 1024, ge=1024, le=256 * 1024 * 1024, description="Largest gRPC message scoring sends."
    )
    half_life_days: float = Field(30.0, gt=0, description="Half-life of the time decay of interactions.")
    weight_view: float = Field(1.0, ge=0, description="Weight of a VIEW event.")
    weight_click: float = Field(2.0, ge=0, description="Weight of a CLICK event.")
    weight_favorite: float = Field(4.0, ge=0, description="Weight of a FAVORITE event.")
    weight_add_to_cart: float = Field(6.0, ge=0, description="Weight of an ADD_TO_CART event.")
    weight_purchase: float = Field(10.0, ge=0, description="Weight of a PURCHASE event.")
    recs_ttl_s: int = Field(7 * 86400, ge=60, description="TTL of per-user keys in Redis.")
    known_user_ttl_s: int = Field(
        90 * 86400,
        ge=60,
        description="TTL of the per-user 'scoring knows this user' marker (refreshed on every write). Past the recs' "
        "TTL it still sends the gateway to scoring's TopN for an idle shopper; without it the gateway serves "
        "popularity at once.",
    )
    recs_exclude_seen: bool = Field(True, description="Leave items the user already interacted with out of recs.")
    foldin_sums_users: int = Field(
        1024,
        ge=0,
        le=1_000_000,
        description=(
            "Heavy shoppers whose model score sums are kept between fold-ins (binary EASE), so an event adds its new"
            " items instead of redoing the product over the whole history; least recently used dropped first."
            " About 5 bytes per catalog item plus 8 per history item each. 0 turns it off."
        ),
    )
    foldin_sums_min_items: int = Field(
        64, ge=1, description="History length (items) from which a user's score sums are kept (foldin_sums_users)."
    )
    foldin_batch_max: int = Field(
        5000,
        ge=1,
        le=10000,
        description=(
            "Most user-events records one consumer poll hands to the fold-in (its micro-batch); a poll"
            " never waits to fill it, so a quiet stream is folded in one event at a time."
        ),
    )
    repeat_policy: str = Field(
        "off",
        description=(
            "Whether a user's own items come back in their list: off = never (seen items left out, as"
            " recs_exclude_seen says); decay = the list mixes the user's time-decayed history with CF"
            " using the weights the model learned offline, and marks those items as rebuys."
        ),
    )
    repeat_half_life_purchase_days: float = Field(
        365.0, gt=0, description="repeat_policy decay: half-life of a PURCHASE in a user's rebuy history."
    )
    repeat_half_life_view_days: float = Field(
        7.0,
        gt=0,
        description="repeat_policy decay: half-life of a VIEW, CLICK, FAVORITE or ADD_TO_CART in the rebuy history.",
    )
    popular_size: int = Field(200, ge=1, le=10000, description="Items kept in each popular zset.")
    popular_every_s: float = Field(1.0, ge=0, description="Minimum seconds between popularity rewrites.")
    new_item_slots: int = Field(2, ge=0, le=20, description="Top-N slots reserved for items newer than the model.")
    algorithm: str = Field("ease", description="Algorithm trained by default (popularity, itemknn, als, bpr, ease).")
    algorithm_params: str = Field("", description='JSON object of parameters for the algorithm, e.g. {"l2": 300}.')
    train_interval_s: float = Field(0.0, ge=0, description="Retrain every N seconds (0 = off).")
    train_after_events: int = Field(0, ge=0, description="Retrain after N new events (0 = off).")
    train_on_start: bool = Field(True, description="Train at start-up when the registry has no model yet.")
    min_train_events: int = Field(5, ge=1, description="Refuse to train on fewer archived events.")
    keep_models: int = Field(5, ge=1, le=100, description="Model versions kept in the registry/GridFS.")
    archive_sync_s: float = Field(5.0, ge=0, description="How often the archive is tailed (0 = only at start).")
    archive_slack_s: float = Field(
        30.0,
        ge=0,
        description=(
            "The archive tail re-reads documents archived up to this many seconds before the newest"
            " one it read (bulk writes visible out of order, clock skew between archiver replicas)."
        ),
    )
    archive_tail: Literal["progress", "slack"] = Field(
        "progress",
        description=(
            "How the archive sync chooses where each read starts: progress = from the bounds the"
            " archivers publish (re-reads at most the batches in flight); slack = the last"
            " archive_slack_s of documents every tick. progress falls back to slack while no"
            " archiver publishes."
        ),
    )
    archive_progress_collection: str = Field(
        "archive_progress", description="MongoDB collection of the archivers' progress documents."
    )
    model_poll_s: float = Field(30.0, ge=0, description="Registry check for missed model-updates (0 = off).")
    profile_half_confidence_weight: float = Field(
        20.0, gt=0, description="Decayed weight at which style-profile confidence reaches half its coherence."
    )
    kafka_fetch_max_wait_ms: int = Field(
        100,
        ge=1,
        le=5000,
        description=(
            "Consumer fetch long-poll when no event is waiting (on tansu a parked fetch is not woken,"
            " so it is also the most an idle stream adds per event)."
        ),
    )
    kafka_poll_tick_ms: int = Field(
        100,
        ge=0,
        le=5000,
        description=(
            "The apply loop polls at most this often (0 = as fast as it can): under a steady stream each"
            " cycle takes what arrived in one tick, not a trickle, so the embedded broker, whose fetch cost"
            " grows with each partition's batch count, is asked a few times a second; a cycle that took"
            " longer, or whose poll came back full (a backlog), polls at once."
        ),
    )
    embedding_dim: int = Field(100, ge=1, description="Length of item style embeddings.")
    embedding_cache_s: float = Field(
        10.0,
        ge=0,
        le=3600,
        description=(
            "Seconds an item embedding read from Redis is kept in process for style profiles (0 = off);"
            " a replaced or deleted embedding reaches profiles within this (a new one at once)."
        ),
    )
    style_centroid_refresh_s: float = Field(
        300.0,
        gt=0,
        description="How often the catalog style centroid (profiles' centring) is recomputed and published.",
    )

    @field_validator("algorithm")
    @classmethod
    def _known_algorithm(cls, v: str) -> str:
        from services.scoring.models import ALGORITHMS

        if v not in ALGORITHMS:
            raise ValueError(f"unknown algorithm {v!r}; known: {sorted(ALGORITHMS)}")
        return v

    @field_validator("repeat_policy")
    @classmethod
    def _known_repeat_policy(cls, v: str) -> str:
        if v not in REPEAT_POLICIES:
            raise ValueError(f"unknown repeat_policy {v!r}; allowed: {', '.join(REPEAT_POLICIES)}")
        return v

    @field_validator("algorithm_params")
    @classmethod
    def _json_object(cls, v: str) -> str:
        if v:
            try:
                parsed = json.loads(v)
            except json.JSONDecodeError as exc:
                raise ValueError(f"not JSON: {exc}") from exc
            if not isinstance(parsed, dict):
                raise ValueError("must be a JSON object")
        return v

    def params_for(self, algorithm: str) -> dict[str, Any]:
        """Configured parameters apply to the configured algorithm only."""
        if algorithm == self.algorithm and self.algorithm_params:
            return dict(json.loads(self.algorithm_params))
        return {}

    def event_weights(self) -> dict[int, float]:
        # EventType numbers (common.proto): VIEW=1 … PURCHASE=5.
        return {
            1: self.weight_view,
            2: self.weight_click,
            3: self.weight_favorite,
            4: self.weight_add_to_cart,
            5: self.weight_purchase,
        }

    def repeat_half_lives_s(self) -> dict[int, float] | None:
        """Per event type, the half-life of its weight in the rebuy history; None with policy off."""
        if self.repeat_policy == "off":
            return None
        view = self.repeat_half_life_view_days * 86400
        return {t: (self.repeat_half_life_purchase_days * 86400 if t == PURCHASE else view) for t in range(1, 6)}
