"""Redis key layout: namespaced, versioned, every key with a TTL or an owner.

Writers (scoring, style worker) and readers (gateway) import these functions so
that a key's shape is defined exactly once.
"""

from __future__ import annotations

NS = "stylerec"
SCHEMA = "v1"


def recs(user: str) -> str:
    """Per-user top-N as a hash {item_id: score}; owner: scoring (TTL recs_ttl)."""
    return f"{NS}:{SCHEMA}:recs:{user}"


def recs_meta(user: str) -> str:
    """Model version and write time of recs(user)."""
    return f"{NS}:{SCHEMA}:recs-meta:{user}"


def popular(category: str = "") -> str:
    """Sorted set of time-decayed item popularity (global or per category); owner: scoring."""
    return f"{NS}:{SCHEMA}:popular:{category}" if category else f"{NS}:{SCHEMA}:popular"


def user_seen(user: str) -> str:
    """Set of item ids the user interacted with; owner: scoring (TTL)."""
    return f"{NS}:{SCHEMA}:seen:{user}"


def user_known(user: str) -> str:
    """Marker ("1") that scoring holds state for the user; owner: scoring, written with every recs write
    (TTL known_user_ttl, longer than the recs'). No recs and no marker: a shopper scoring has
    never seen, whom the gateway answers from popularity without asking scoring's TopN."""
    return f"{NS}:{SCHEMA}:known:{user}"


def model_version() -> str:
    return f"{NS}:{SCHEMA}:model-version"


def item_meta(item_id: str) -> str:
    """Cached item metadata (hash); filled by the gateway from MongoDB on a miss (TTL)."""
    return f"{NS}:{SCHEMA}:item:{item_id}"


def item_embedding(item_id: str) -> str:
    """Style embedding of an item's photo (float32 bytes); owner: style worker."""
    return f"{NS}:{SCHEMA}:emb:{item_id}"


def item_embeddings_version() -> str:
    """Counter the style worker increments whenever it writes or deletes an ``item_embedding``:
    a reader that remembered which items had none knows when to ask again (scoring's profiles),
    and the gateway's embedding index rescans only when it moved; owner: style worker (anything
    else that writes embeddings, a benchmark or a test seeding a catalog, increments it too)."""
    return f"{NS}:{SCHEMA}:emb-version"


def user_changes_channel() -> str:
    """Pub/sub channel: space-separated pseudonyms whose recs, seen set or profile scoring just
    rewrote or deleted (published in the same MULTI/EXEC); the gateway drops their kept answers."""
    return f"{NS}:{SCHEMA}:user-changes"


def stylized_ready_channel() -> str:
    """Pub/sub channel: ``["content", "style"]`` (JSON) of a stylized image the style worker just stored (published
    in the same MULTI/EXEC as its ``stylized`` reference); the gateway restyles kept answers that
    showed that image PENDING, instead of asking again on a timer."""
    return f"{NS}:{SCHEMA}:stylized-ready"


def style_profile(user: str) -> str:
    """User style profile hash {vector, confidence, anchor}; owner: scoring (TTL)."""
    return f"{NS}:{SCHEMA}:style-profile:{user}"


def stylized(content_item: str, style_item: str) -> str:
    """Reference to a stylized image (GridFS id) with TTL; owner: style worker."""
    return f"{NS}:{SCHEMA}:stylized:{content_item}:{style_item}"


def stylize_pending(content_item: str, style_item: str) -> str:
    """Dedup marker for an enqueued stylize job (SET NX with TTL); owner: gateway."""
    return f"{NS}:{SCHEMA}:stylize-pending:{content_item}:{style_item}"


def dedup_event(event_id: str) -> str:
    """Idempotency marker for an ingested event id (SET NX with TTL); owner: ingestion."""
    return f"{NS}:{SCHEMA}:dedup:{event_id}"


def stylize_rate(user: str) -> str:
    """Per-user counter of stylize jobs enqueued in the current window (INCR + EXPIRE); owner: gateway."""
    return f"{NS}:{SCHEMA}:stylize-rate:{user}"


def train_lock() -> str:
    """Cluster-wide training lock (SET NX EX) so one scoring replica trains at a time; owner: scoring."""
    return f"{NS}:{SCHEMA}:scoring-train-lock"


def style_centroid() -> str:
    """Catalog style centroid hash {vector, items, updated_at} (libs/common/style_math.py); owner: scoring."""
    return f"{NS}:{SCHEMA}:style-centroid"


def per_user(user: str) -> list[str]:
    """Every key named after one (pseudonymized) user: what AdminService.ForgetUser and the
    scoring replicas delete when the user is forgotten. A new per-user key belongs here too."""
    return [recs(user), recs_meta(user), user_seen(user), user_known(user), style_profile(user), stylize_rate(user)]
