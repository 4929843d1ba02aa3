"""Scoring-specific Prometheus metrics (shared RED/Kafka metrics live in libs/common/metrics.py)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

EVENTS_APPLIED = Counter(
    "stylerec_scoring_events_applied_total",
    "Events applied to the interaction state, by source (kafka, archive) and outcome (new, duplicate).",
    ["source", "outcome"],
)
FOLDIN_SECONDS = Histogram(
    "stylerec_scoring_foldin_seconds",
    "Time to recompute one user's top-N (fold-in) from their history, by source of the answer"
    " (a batch's time divided by its users).",
    ["source"],
    buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1),
)
FOLDIN_BATCH_USERS = Histogram(
    "stylerec_scoring_foldin_batch_users",
    "Users folded in together by one batched model call (a consumer poll's distinct users, a rewrite chunk).",
    buckets=(1, 2, 5, 10, 25, 50, 100, 250, 500, 1000),
)
FRESHNESS_SECONDS = Histogram(
    "stylerec_scoring_event_to_redis_seconds",
    "From the Kafka record timestamp of an event to its user's top-N being rewritten in Redis.",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
TRAIN_SECONDS = Histogram(
    "stylerec_scoring_train_seconds",
    "Wall time of one training run (archive read + fit + publish).",
    ["algorithm"],
    buckets=(0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600),
)
TRAIN_RUNS = Counter(
    "stylerec_scoring_train_runs_total",
    "Training runs by algorithm, trigger (rpc, schedule, events, start, trainer) and outcome (ok, error, skipped).",
    ["algorithm", "trigger", "outcome"],
)
MODEL_SWAPS = Counter("stylerec_scoring_model_swaps_total", "Models hot-loaded by this replica.")
MODEL_TRAINED_AT = Gauge(
    "stylerec_scoring_model_trained_timestamp_seconds",
    "Unix time the serving model was trained (alert on now - this = model age).",
)
MODEL_ITEMS = Gauge("stylerec_scoring_model_items", "Items known to the serving model.")
STATE_USERS = Gauge("stylerec_scoring_state_users", "Users in the interaction state.")
STATE_ITEMS = Gauge("stylerec_scoring_state_items", "Items in the interaction state.")
# The two entries the state's memory grows with by design (docs/scoring.md); a load run reads them
# to tell that growth from a leak.
STATE_PAIRS = Gauge("stylerec_scoring_state_pairs", "(user, item) pairs in the interaction state.")
STATE_APPLIED_IDS = Gauge(
    "stylerec_scoring_state_applied_ids", "Event ids kept for de-duplication (bounded by max_event_ids)."
)
SEEN_WRITES = Counter(
    "stylerec_scoring_seen_writes_total",
    "Seen-set writes by how: added (a batch's new items, size checked in Redis) or whole (deleted and rewritten).",
    ["how"],
)
EMBEDDING_CACHE = Counter(
    "stylerec_scoring_embedding_cache_total",
    "Item embeddings a style profile needed, by result: hit (in-process cache), absent (remembered as having "
    "none while the embeddings version stands), miss (asked Redis), recheck (remembered absent, asked again "
    "because the version moved).",
    ["result"],
)
EMBEDDING_BACKFILL = Counter(
    "stylerec_scoring_embedding_backfill_total",
    "Items Redis had no embedding for, as the background MongoDB fallback answered: found (kept in process) "
    "or absent (asked again after the negative-answer TTL).",
    ["result"],
)
PROFILES_WRITTEN = Counter(
    "stylerec_scoring_style_profiles_written_total", "Style profiles written, by outcome (written, none).", ["outcome"]
)
ARCHIVE_SYNC_READ = Counter(
    "stylerec_scoring_archive_sync_read_total",
    "Documents the archive sync read back (new or already applied), by how the read chose its start"
    " (progress: the archivers' published bounds; slack: the time-window fallback; full).",
    ["mode"],
)
USER_SUMS = Counter(
    "stylerec_scoring_user_sums_total",
    "Heavy shoppers' kept score sums (services/scoring/user_sums.py) a fold-in used, by outcome: reused (only the "
    "items new since the last fold-in added) or built (summed over the whole history).",
    ["outcome"],
)
USER_SUMS_USERS = Gauge("stylerec_scoring_user_sums_users", "Users whose score sums are kept (bounded by the setting).")
USER_SUMS_BYTES = Gauge(
    "stylerec_scoring_user_sums_bytes",
    "Bytes of the kept score sums' arrays and id tuples: bounded by design (a load run subtracts it, as it does"
    " the state's pairs).",
)
