"""Ingestion settings (env prefix STYLEREC_).

Every limit the front door enforces is a setting, because what is "too big" or
"too old" depends on the shop: the defaults are safe for a mid-size shop and the
tests shrink them to exercise the edges quickly.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from libs.common.kafka import IMPRESSIONS, USER_EVENTS
from libs.common.settings import ServiceSettings


class IngestionSettings(ServiceSettings):
    service_name: str = "ingestion"
    grpc_port: int = Field(50051, ge=0, le=65535, description="gRPC port of ingestion.")
    metrics_port: int = Field(9101, ge=0, le=65535, description="Metrics port of ingestion.")
    role: Literal["all", "api", "archiver"] = Field(
        "all", description="api = gRPC front door only; archiver = Mongo archiver only; all = both in one process."
    )

    # ---- events: whole-request limits ----
    max_batch_events: int = Field(10_000, ge=1, le=1_000_000, description="Max events per IngestEvents call/chunk.")
    max_request_bytes: int = Field(
        16 * 1024 * 1024, ge=1024, le=64 * 1024 * 1024, description="Larger requests get RESOURCE_EXHAUSTED."
    )
    # Transport caps: one MiB above max_request_bytes so a request between the two gets the
    # descriptive in-app answer (BadRequest details) and anything larger is refused unread.
    grpc_max_receive_bytes: int = Field(
        17 * 1024 * 1024,
        ge=1024,
        le=256 * 1024 * 1024,
        description="Largest gRPC message ingestion accepts (IngestEvents batches, UpsertItems with photos).",
    )
    grpc_max_send_bytes: int = Field(
        9 * 1024 * 1024,
        ge=1024,
        le=256 * 1024 * 1024,
        description="Largest gRPC message ingestion sends (GetItem with its photo: max_image_bytes plus metadata).",
    )
    # ---- events: per-event limits ----
    max_id_length: int = Field(128, ge=8, le=1024, description="Max length of user/item/event ids.")
    max_context_length: int = Field(256, ge=1, le=4096, description="Max length of each context field.")
    max_past_days: float = Field(3650 * 2, gt=0, description="Oldest accepted event timestamp, in days.")
    max_future_s: float = Field(300, ge=0, description="How far in the future an event timestamp may be.")
    max_value: float = Field(1e9, gt=0, description="Largest accepted event value (quantity or price).")

    # ---- idempotency ----
    dedup_window_s: int = Field(7 * 86400, ge=1, description="An event id seen within this window is a duplicate.")
    dedup_pending_s: int = Field(
        30, ge=1, le=3600, description="How long an id claimed by an unfinished request blocks others (crash safety)."
    )

    # ---- publishing ----
    events_topic: str = Field(USER_EVENTS, min_length=1, description="Topic events are published to.")
    publish_timeout_s: float = Field(10, gt=0, le=120, description="Wait for broker acks before UNAVAILABLE.")
    max_inflight_events: int = Field(
        50_000, ge=1, description="Events queued for the broker at once; beyond it callers get RESOURCE_EXHAUSTED."
    )
    admission_wait_s: float = Field(
        0.05, ge=0, le=10, description="How long a call may wait for in-flight capacity before RESOURCE_EXHAUSTED."
    )
    kafka_max_block_ms: int = Field(2000, ge=100, description="Producer max_block_ms (metadata wait when absent).")
    kafka_request_timeout_ms: int = Field(5000, ge=500, description="Producer request timeout.")
    kafka_linger_ms: int = Field(
        2,
        ge=0,
        le=1000,
        description=(
            "Producer linger: the records of concurrent calls wait up to this long to share one batch per"
            " partition, and an IngestEvents answer up to this much longer for its acks. The local stack"
            " sets 25 for its embedded broker, whose fetch cost grows with each partition's batch count"
            " (docs/load.md)."
        ),
    )
    kafka_batch_bytes: int = Field(256 * 1024, ge=1024, description="Producer per-partition batch size.")
    broker_cooldown_s: float = Field(
        1.0, ge=0, le=60, description="After a broker failure, calls fail fast with UNAVAILABLE for this long."
    )
    # ---- per-caller rate limit (services/ingestion/rate_limit.py; per replica) ----
    ingest_rate_limit_eps: float = Field(
        20_000,
        ge=0,
        description="Events per second each caller may ingest on this replica (token bucket refill; 0 = off).",
    )
    ingest_rate_limit_burst: int = Field(
        40_000,
        ge=1,
        description="Bucket size: events a caller may send at once after idling; larger calls are refused.",
    )
    stream_pipeline_chunks: int = Field(
        4, ge=1, le=64, description="StreamEvents chunks being published while earlier ones await acks."
    )

    # ---- archiver ----
    archiver_group: str = Field("archiver", min_length=1, description="Consumer group of the Mongo archiver.")
    events_collection: str = Field("events", min_length=1, description="MongoDB collection of archived events.")
    archive_progress_collection: str = Field(
        "archive_progress",
        min_length=1,
        description="MongoDB collection where each archiver publishes how far its writes are visible.",
    )
    archiver_max_poll_records: int = Field(1000, ge=1, le=100_000, description="Records per archiver bulk write.")
    archive_fetch_max_wait_ms: int = Field(
        1000,
        ge=1,
        le=10_000,
        description="Fetch long-poll of the archiver and attribution consumers when nothing is waiting.",
    )
    archive_poll_tick_ms: int = Field(
        1000,
        ge=0,
        le=10_000,
        description=(
            "The archiver and attribution consumers poll at most this often (0 = as fast as they can)."
            " They write the system of record and feed reports, so a second is free to them, and it"
            " spares the embedded broker, whose fetch cost grows with each partition's batch count"
            " (docs/load.md); a cycle that took longer, or whose poll came back full (a backlog), polls at"
            " once."
        ),
    )

    # ---- online experiments: impression archive and attribution (docs/experiments.md) ----
    experiments_enabled: bool = Field(
        True, description="The archiver role also archives impressions and attributes clicks/carts/purchases."
    )
    impressions_topic: str = Field(IMPRESSIONS, min_length=1, description="Topic the gateway publishes impressions to.")
    impressions_group: str = Field(
        "impressions-archiver", min_length=1, description="Consumer group that archives impressions."
    )
    attribution_group: str = Field(
        "attribution", min_length=1, description="Consumer group that attributes user-events to impressions."
    )
    impressions_collection: str = Field("impressions", min_length=1, description="MongoDB collection of impressions.")
    attributions_collection: str = Field(
        "attributions", min_length=1, description="MongoDB collection of attributed outcomes (one per impression item)."
    )
    attribution_pending_collection: str = Field(
        "attribution_pending",
        min_length=1,
        description="MongoDB collection of outcome events waiting for their impression (out-of-order arrival).",
    )
    impressions_ttl_s: int = Field(
        30 * 86400, ge=3600, description="How long impressions and attributions are kept (the expiry sweep)."
    )
    attribution_expire_every_s: float = Field(
        60.0,
        gt=0,
        le=86400,
        description="How often the archiver deletes expired impressions, attributions and parked events "
        "(one indexed range delete per collection).",
    )
    attribution_window_s: float = Field(
        86400.0,
        gt=0,
        le=30 * 86400,
        description="An event without recommendation_id is attributed to the user's latest impression of the item "
        "shown at most this long before it.",
    )
    attribution_settle_s: float = Field(
        10.0,
        ge=0,
        le=600,
        description="Events without recommendation_id are matched this long after their time plus the clock skew, "
        "so impressions archived up to this late still take part (last touch); an impression archived later "
        "re-examines parked events.",
    )
    attribution_clock_skew_s: float = Field(
        60.0,
        ge=0,
        le=3600,
        description="Event clocks may run this far behind the gateway's impression time; events without "
        "recommendation_id are matched this long (plus the settle time) after their time.",
    )

    # ---- catalog ----
    items_collection: str = Field("items", min_length=1, description="MongoDB collection of catalog items.")
    max_batch_items: int = Field(500, ge=1, le=100_000, description="Max items per UpsertItems call.")
    max_title_length: int = Field(512, ge=1, description="Max characters of an item title.")
    max_field_length: int = Field(128, ge=1, description="Max characters of category and brand.")
    max_attributes: int = Field(64, ge=0, description="Max attributes per item.")
    max_attribute_length: int = Field(256, ge=1, description="Max characters of an attribute key or value.")
    max_price: float = Field(1e9, gt=0, description="Largest accepted item price.")
    max_image_bytes: int = Field(8 * 1024 * 1024, ge=1024, description="Largest accepted item photo.")
    max_image_pixels: int = Field(40_000_000, ge=1, description="Larger photos are rejected before decoding.")
    image_fetch_timeout_s: float = Field(5.0, gt=0, le=120, description="Total time to fetch one image URL.")
    image_fetch_allow_private: bool = Field(
        False, description="Allow image URLs that resolve to loopback/private addresses (dev and tests only)."
    )
    image_fetch_workers: int = Field(4, ge=1, le=64, description="Concurrent image downloads per call.")

    @model_validator(mode="after")
    def _transport_fits_limits(self) -> IngestionSettings:
        # Below these the in-app limits could never be reached: callers would get a bare transport error.
        if self.grpc_max_receive_bytes < self.max_request_bytes:
            raise ValueError(
                f"grpc_max_receive_bytes ({self.grpc_max_receive_bytes}) must not be below max_request_bytes "
                f"({self.max_request_bytes})"
            )
        if self.grpc_max_send_bytes < self.max_image_bytes + 64 * 1024:
            raise ValueError(
                f"grpc_max_send_bytes ({self.grpc_max_send_bytes}) must leave room for a photo of max_image_bytes "
                f"({self.max_image_bytes}) plus 64 KiB of metadata"
            )
        return self

    @model_validator(mode="after")
    def _batch_fits_inflight(self) -> IngestionSettings:
        # A batch larger than the whole in-flight budget could never be admitted.
        if self.max_batch_events > self.max_inflight_events:
            raise ValueError(
                f"max_batch_events ({self.max_batch_events}) must not exceed max_inflight_events "
                f"({self.max_inflight_events})"
            )
        return self

    @model_validator(mode="after")
    def _window_fits_ttl(self) -> IngestionSettings:
        # An impression must outlive the window in which events are attributed to it.
        if self.attribution_window_s > self.impressions_ttl_s:
            raise ValueError(
                f"attribution_window_s ({self.attribution_window_s:g}) must not exceed impressions_ttl_s "
                f"({self.impressions_ttl_s})"
            )
        return self

    @property
    def runs_api(self) -> bool:
        return self.role in ("all", "api")

    @property
    def runs_archiver(self) -> bool:
        return self.role in ("all", "archiver")
