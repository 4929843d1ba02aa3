"""Reading event files (CSV or JSONL) for `stylerec ingest events`.

Malformed input raises :class:`EventFileError` naming the line, so the CLI can
exit 2 with a message a person can act on.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from stylerec.v1 import common_pb2

REQUIRED = ("user_id", "item_id", "type", "timestamp")


class EventFileError(ValueError):
    pass


def parse_timestamp(value: Any) -> float:
    """Unix seconds (int/float/str) or ISO-8601; naive times are UTC."""
    if isinstance(value, int | float):
        return float(value)
    text = str(value).strip()
    try:
        return float(text)
    except ValueError:
        pass
    try:
        dt = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError as exc:
        raise ValueError(f"timestamp {text!r} is neither unix seconds nor ISO-8601") from exc
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return dt.timestamp()


def to_event(row: dict[str, Any]) -> common_pb2.Event:
    missing = [c for c in REQUIRED if row.get(c) in (None, "")]
    if missing:
        raise ValueError(f"missing {', '.join(missing)}")
    type_name = str(row["type"]).strip().upper()
    if type_name not in common_pb2.EventType.keys() or type_name == "EVENT_TYPE_UNSPECIFIED":  # noqa: SIM118
        raise ValueError(f"unknown type {row['type']!r} (VIEW, CLICK, FAVORITE, ADD_TO_CART, PURCHASE)")
    ts = parse_timestamp(row["timestamp"])
    event = common_pb2.Event(
        user_id=str(row["user_id"]).strip(),
        item_id=str(row["item_id"]).strip(),
        type=common_pb2.EventType.Value(type_name),
        event_id=str(row.get("event_id") or "").strip(),
    )
    event.timestamp.FromNanoseconds(int(ts * 1e9))
    if row.get("value") not in (None, ""):
        event.value = float(row["value"])
    return event


def read_events(path: Path) -> Iterator[common_pb2.Event]:
    if not path.exists():
        raise EventFileError(f"{path}: no such file")
    with open(path, newline="", encoding="utf-8") as f:
        first = f.readline()
        f.seek(0)
        if first.lstrip().startswith("{"):
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                    if not isinstance(row, dict):
                        raise ValueError("not a JSON object")
                    yield to_event(row)
                except (ValueError, TypeError) as exc:
                    raise EventFileError(f"{path}:{n}: {exc}") from exc
        else:
            reader = csv.DictReader(f)
            header = reader.fieldnames or []
            missing = [c for c in REQUIRED if c not in header]
            if missing:
                raise EventFileError(
                    f"{path}:1: CSV header lacks {', '.join(missing)} (need {','.join(REQUIRED)}[,event_id,value])"
                )
            for n, row in enumerate(reader, 2):
                try:
                    yield to_event(row)
                except (ValueError, TypeError) as exc:
                    raise EventFileError(f"{path}:{n}: {exc}") from exc
