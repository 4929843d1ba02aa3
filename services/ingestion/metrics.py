"""Ingestion metrics (names are listed in docs/ingestion.md for the dashboards).

Archiver lag is the shared ``stylerec_kafka_consumer_lag_messages{group="archiver"}``
exported by libs.common.kafka.ProtoConsumerLoop, so it is not redefined here.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

EVENTS = Counter(
    "stylerec_ingestion_events_total",
    "Events received, by type and outcome (accepted, duplicate, rejected, in_progress, failed).",
    ["type", "outcome"],
)
BATCH_SIZE = Histogram(
    "stylerec_ingestion_batch_size",
    "Events per IngestEvents call or StreamEvents chunk.",
    ["rpc"],
    buckets=(1, 5, 10, 50, 100, 500, 1000, 5000, 10000, 50000),
)
PRODUCE_SECONDS = Histogram(
    "stylerec_ingestion_produce_seconds",
    "Time from handing a batch to the producer until the broker acknowledged all of it (acks=all).",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
BROKER_ERRORS = Counter(
    "stylerec_ingestion_broker_errors_total",
    "Publishing failures, by kind (timeout, unavailable, error).",
    ["kind"],
)
DEDUP_HITS = Counter(
    "stylerec_ingestion_dedup_hits_total",
    "Events reported as duplicates, by where the duplicate was found (batch, window).",
    ["scope"],
)
INFLIGHT_EVENTS = Gauge(
    "stylerec_ingestion_inflight_events",
    "Events handed to the producer and not yet acknowledged.",
)
ADMISSION_REJECTS = Counter(
    "stylerec_ingestion_admission_rejects_total",
    "Calls refused because the in-flight budget or the broker circuit was exhausted, by reason.",
    ["reason"],
)
REQUEST_REJECTS = Counter(
    "stylerec_ingestion_request_rejects_total",
    "Whole requests refused (too_many, too_large, all_invalid), by rpc.",
    ["rpc", "reason"],
)
RATE_LIMITED = Counter(
    "stylerec_ingestion_rate_limited_total",
    "Calls (or stream chunks) refused by the per-caller event rate limit, by caller (configured names only).",
    ["caller"],
)
ITEMS = Counter(
    "stylerec_ingestion_items_total",
    "Catalog items received, by outcome (upserted, rejected, failed).",
    ["outcome"],
)
IMAGE_BYTES = Histogram(
    "stylerec_ingestion_image_bytes",
    "Size of accepted item photos.",
    buckets=(1e3, 1e4, 5e4, 1e5, 5e5, 1e6, 2e6, 4e6, 8e6, 16e6),
)
IMAGE_FETCH_SECONDS = Histogram(
    "stylerec_ingestion_image_fetch_seconds",
    "Time to download an item photo given by URL, by outcome.",
    ["outcome"],
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
ARCHIVED = Counter(
    "stylerec_ingestion_archived_events_total",
    "Events written to MongoDB by the archiver.",
)
ARCHIVE_WRITE_SECONDS = Histogram(
    "stylerec_ingestion_archive_write_seconds",
    "Duration of one archiver bulk write (insert, then upsert of the ids already there).",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
IMPRESSIONS_ARCHIVED = Counter(
    "stylerec_ingestion_archived_impressions_total",
    "Impressions upserted into MongoDB by the impression archiver.",
)
ATTRIBUTED = Counter(
    "stylerec_ingestion_attributed_total",
    "Outcomes attributed to an impression item (first time only: replays and duplicates are not counted), "
    "by experiment, arm, strategy and outcome (click, cart, purchase).",
    ["experiment", "arm", "strategy", "outcome"],
)
ATTRIBUTION_EXPIRED = Counter(
    "stylerec_ingestion_attribution_expired_total",
    "Documents the expiry sweep deleted, by collection (impressions, attributions, attribution_pending).",
    ["collection"],
)
ATTRIBUTION_SKIPPED = Counter(
    "stylerec_ingestion_attribution_skipped_total",
    "Outcome events carrying a recommendation_id that cannot count for it, by reason "
    "(other_user, item_not_shown, outside_window).",
    ["reason"],
)
