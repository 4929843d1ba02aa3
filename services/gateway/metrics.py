"""Gateway-specific Prometheus metrics (the RED metrics per RPC come from libs.common)."""

from __future__ import annotations

from prometheus_client import Counter, Histogram

RECOMMENDATIONS = Counter(
    "stylerec_gateway_recommendations_total",
    "GetRecommendations answers, by strategy and whether the answer was degraded.",
    ["strategy", "degraded"],
)
DEGRADED_PARTS = Counter(
    "stylerec_gateway_degraded_parts_total",
    "Parts missing from an answer (the answer was still given), by dependency.",
    ["dependency"],
)
DOWNSTREAM_SECONDS = Histogram(
    "stylerec_gateway_downstream_seconds",
    "Latency of one downstream call made while answering a request.",
    ["dependency", "operation"],
    buckets=(0.0002, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
)
ITEM_CACHE = Counter(
    "stylerec_gateway_item_cache_total",
    "Item-metadata lookups, by result (near_hit in process, hit in Redis, miss filled from MongoDB, absent).",
    ["result"],
)
ITEM_CACHE_AGE = Histogram(
    "stylerec_gateway_item_cache_age_seconds",
    "Staleness of the in-process item-metadata cache: per lookup, the age of the oldest entry it served.",
    buckets=(1, 5, 15, 30, 60, 120, 300, 600),
)
ITEM_CACHE_EVICTIONS = Counter(
    "stylerec_gateway_item_cache_evictions_total",
    "In-process item-metadata entries dropped, by reason (update from item-updates, expired, full).",
    ["reason"],
)
STYLIZE_JOBS = Counter(
    "stylerec_gateway_stylize_jobs_total",
    "Stylized-image requests, by outcome (ready, enqueued, deduplicated, rate_limited, no_photo, failed).",
    ["outcome"],
)
STYLIZED_BYTES = Counter(
    "stylerec_gateway_stylized_image_bytes_total",
    "Bytes of stylized images streamed to callers.",
)
PARSE_MEMO = Counter(
    "stylerec_gateway_parse_memo_total",
    "Parsed Redis replies (style profile, recs) and impression bodies served from content-addressed memos, "
    "by kind and result.",
    ["kind", "result"],
)
ANSWER_CACHE = Counter(
    "stylerec_gateway_answer_cache_total",
    "GetRecommendations answers by whether the kept answer was served (hit), served with its PENDING "
    "stylized images asked again (restyle), built (miss), rebuilt because a popularity list or the "
    "embedding index it was built from moved (outdated) or, once built, not kept (not_kept: degraded, "
    "shorter than asked, or its user changed meanwhile).",
    ["result"],
)
ANSWER_CACHE_INVALIDATIONS = Counter(
    "stylerec_gateway_answer_cache_invalidations_total",
    "Kept answers dropped, by reason: user (scoring's user-changes message, per user), item (item-updates), "
    "resubscribed / unsubscribed (the user-changes subscription came back or was lost: everything); "
    "stylized_ready counts kept answers marked for a restyle by the style worker's announcement (not dropped).",
    ["reason"],
)
IMPRESSIONS = Counter(
    "stylerec_gateway_impressions_total",
    "Impressions (one per GetRecommendations answer) the broker acknowledged, by experiment, arm and strategy.",
    ["experiment", "arm", "strategy"],
)
IMPRESSIONS_DROPPED = Counter(
    "stylerec_gateway_impressions_dropped_total",
    "Impressions not published, by reason (queue_full: buffer full; broker: send failed). Never waited on.",
    ["reason"],
)
