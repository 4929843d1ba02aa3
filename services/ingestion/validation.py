"""Per-event and per-item validation: each returns a reason string, or None when acceptable.

Reasons start with the offending field name so callers (and the CLI) can show
them next to the input; they never echo the raw user id back into logs.
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass

from stylerec.v1 import common_pb2

ID_RE = re.compile(r"^[A-Za-z0-9_.:@/+=-]+$")
PSEUDONYM_RE = re.compile(r"^u_[0-9a-f]{32}$")
RECOMMENDATION_ID_RE = re.compile(r"^rec_[0-9a-f]{32}$")
KNOWN_TYPES = {t for t in common_pb2.EventType.values() if t != common_pb2.EVENT_TYPE_UNSPECIFIED}
TYPE_NAMES = "VIEW, CLICK, FAVORITE, ADD_TO_CART, PURCHASE"


@dataclass(frozen=True)
class EventLimits:
    max_id_length: int = 128
    max_context_length: int = 256
    max_past_days: float = 3650 * 2
    max_future_s: float = 300
    max_value: float = 1e9


def check_id(name: str, value: str, max_len: int) -> str | None:
    if not value:
        return f"{name} is required"
    if len(value) > max_len:
        return f"{name} longer than {max_len} characters"
    if not ID_RE.match(value):
        return f"{name} has characters outside [A-Za-z0-9_.:@/+=-]"
    return None


def _printable(value: str) -> bool:
    return value.isprintable()


def validate_event(
    event: common_pb2.Event,
    limits: EventLimits | None = None,
    *,
    now: float | None = None,
    pseudonymized: bool = False,
) -> str | None:
    """Why ``event`` may not be ingested, or None.

    ``pseudonymized=True`` checks an event as it must look on Kafka (user id is
    an HMAC pseudonym, event id present); the archiver and tests use it.
    """
    lim = limits or EventLimits()
    if pseudonymized:
        if not PSEUDONYM_RE.match(event.user_id):
            return "user_id is not a pseudonym"
    else:
        problem = check_id("user_id", event.user_id, lim.max_id_length)
        if problem:
            return problem
    problem = check_id("item_id", event.item_id, lim.max_id_length)
    if problem:
        return problem
    if event.event_id or pseudonymized:
        problem = check_id("event_id", event.event_id, lim.max_id_length)
        if problem:
            return problem
    if event.type not in KNOWN_TYPES:
        return f"type {event.type} is not one of {TYPE_NAMES}"
    if event.recommendation_id and not RECOMMENDATION_ID_RE.match(event.recommendation_id):
        return "recommendation_id must be the id a GetRecommendations answer returned (rec_ + 32 hex) or empty"
    if not event.HasField("timestamp"):
        return "timestamp is required"
    if not 0 <= event.timestamp.nanos < 1_000_000_000:
        return "timestamp.nanos must be in [0, 1e9)"
    now = time.time() if now is None else now
    ts = event.timestamp.seconds + event.timestamp.nanos / 1e9
    if ts > now + lim.max_future_s:
        return f"timestamp is more than {lim.max_future_s:.0f}s in the future"
    if ts < now - lim.max_past_days * 86400:
        return f"timestamp is older than {lim.max_past_days:.0f} days"
    if not math.isfinite(event.value) or event.value < 0 or event.value > lim.max_value:
        return f"value must be a finite number in [0, {lim.max_value:g}]"
    ctx = event.context
    for name, value in (("session_id", ctx.session_id), ("device", ctx.device), ("page", ctx.page)):
        if len(value) > lim.max_context_length:
            return f"context.{name} longer than {lim.max_context_length} characters"
        if value and not _printable(value):
            return f"context.{name} has control characters"
    return None


@dataclass(frozen=True)
class ItemLimits:
    max_id_length: int = 128
    max_title_length: int = 512
    max_field_length: int = 128
    max_attributes: int = 64
    max_attribute_length: int = 256
    max_price: float = 1e9
    max_image_bytes: int = 8 * 1024 * 1024


def validate_item(item: common_pb2.Item, lim: ItemLimits) -> str | None:
    """Field checks that need no I/O; image content is checked by services.ingestion.images."""
    problem = check_id("item_id", item.item_id, lim.max_id_length)
    if problem:
        return problem
    if not item.title.strip():
        return "title is required"
    for name, value, max_len in (
        ("title", item.title, lim.max_title_length),
        ("category", item.category, lim.max_field_length),
        ("brand", item.brand, lim.max_field_length),
    ):
        if len(value) > max_len:
            return f"{name} longer than {max_len} characters"
        if value and not _printable(value):
            return f"{name} has control characters"
    if not math.isfinite(item.price) or item.price < 0 or item.price > lim.max_price:
        return f"price must be a finite number in [0, {lim.max_price:g}]"
    if len(item.attributes) > lim.max_attributes:
        return f"attributes: more than {lim.max_attributes} entries"
    for key, value in item.attributes.items():
        if not key or len(key) > lim.max_attribute_length or not _printable(key):
            return f"attributes: key {key[:40]!r} is empty, too long or has control characters"
        if len(value) > lim.max_attribute_length or not _printable(value):
            return f"attributes[{key[:40]}]: value too long or has control characters"
    if item.image_ref:
        return "image_ref is set by the catalog, not by callers"
    source = item.image.WhichOneof("source") if item.HasField("image") else None
    if source == "data" and len(item.image.data) > lim.max_image_bytes:
        return f"image.data larger than {lim.max_image_bytes} bytes"
    if source == "data" and not item.image.data:
        return "image.data is empty"
    if source == "url":
        url = item.image.url
        if len(url) > 2048:
            return "image.url longer than 2048 characters"
        if not (url.startswith("http://") or url.startswith("https://")):
            return "image.url must be http:// or https://"
    return None
