"""Per-event validation: returns a reason string, or None when the event is acceptable."""

from __future__ import annotations

import re
import time

from stylerec.v1 import common_pb2

ID_RE = re.compile(r"^[A-Za-z0-9_.:@/+=-]+$")
KNOWN_TYPES = {t for t in common_pb2.EventType.values() if t != common_pb2.EVENT_TYPE_UNSPECIFIED}


def _check_id(name: str, value: str, max_len: int) -> str | None:
    if not value:
        return f"{name} is required"
    if len(value) > max_len:
        return f"{name} longer than {max_len} characters"
    if not ID_RE.match(value):
        return f"{name} has characters outside [A-Za-z0-9_.:@/+=-]"
    return None


def validate_event(
    event: common_pb2.Event,
    *,
    max_id_length: int,
    max_past_days: float,
    max_future_s: float,
    now: float | None = None,
) -> str | None:
    for name, value in (("user_id", event.user_id), ("item_id", event.item_id)):
        problem = _check_id(name, value, max_id_length)
        if problem:
            return problem
    if event.event_id:
        problem = _check_id("event_id", event.event_id, max_id_length)
        if problem:
            return problem
    if event.type not in KNOWN_TYPES:
        return f"type {event.type} is not one of VIEW, CLICK, FAVORITE, ADD_TO_CART, PURCHASE"
    now = time.time() if now is None else now
    if not event.HasField("timestamp"):
        return "timestamp is required"
    ts = event.timestamp.seconds + event.timestamp.nanos / 1e9
    if ts > now + max_future_s:
        return f"timestamp is more than {max_future_s:.0f}s in the future"
    if ts < now - max_past_days * 86400:
        return f"timestamp is older than {max_past_days:.0f} days"
    if event.value != event.value or abs(event.value) > 1e9:  # NaN or absurd
        return "value must be a finite number with |value| <= 1e9"
    return None
