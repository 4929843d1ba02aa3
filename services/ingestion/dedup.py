"""Event-id idempotency in Redis: claim → publish → confirm (or release).

An id is first *claimed* with a short-lived "pending" marker (``SET NX GET EX``),
and only turned into a long-lived "done" marker after the broker acknowledged
the event. Why two states: if a process claims ids and then dies before
publishing, a retry must not be told "duplicate" for an event that was never
stored. A retry that finds "pending" is told to retry (the marker expires
after ``pending_s``); one that finds "done" is a real duplicate.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence

import redis

from libs.common import keys

PENDING = b"p"
DONE = b"1"


class Claim(enum.Enum):
    NEW = "new"
    DUPLICATE = "duplicate"
    IN_PROGRESS = "in_progress"


class DedupStore:
    """Redis-backed window of seen event ids; all calls are one pipelined round trip."""

    def __init__(self, client: redis.Redis, window_s: int, pending_s: int) -> None:
        self.redis = client
        self.window_s = window_s
        self.pending_s = pending_s

    def claim(self, event_ids: Sequence[str]) -> list[Claim]:
        if not event_ids:
            return []
        pipe = self.redis.pipeline(transaction=False)
        for eid in event_ids:
            pipe.set(keys.dedup_event(eid), PENDING, nx=True, get=True, ex=self.pending_s)
        out: list[Claim] = []
        for previous in pipe.execute():
            if previous is None:
                out.append(Claim.NEW)
            elif previous == PENDING:
                out.append(Claim.IN_PROGRESS)
            else:
                out.append(Claim.DUPLICATE)
        return out

    def settle(self, published: Sequence[str], failed: Sequence[str]) -> None:
        """Mark acknowledged ids as seen for the window; free the ids whose publish failed."""
        if not published and not failed:
            return
        pipe = self.redis.pipeline(transaction=False)
        for eid in published:
            pipe.set(keys.dedup_event(eid), DONE, ex=self.window_s)
        if failed:
            pipe.delete(*[keys.dedup_event(eid) for eid in failed])
        pipe.execute()
