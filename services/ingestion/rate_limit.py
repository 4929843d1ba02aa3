"""Per-caller token buckets on ingested events: one noisy shop integration cannot starve the rest.

Why events and not calls: one IngestEvents call may carry 1 or 10 000 events, and
it is events that cost broker bandwidth, dedup round trips and scoring work.
Each authenticated caller (``libs.common.auth.current_caller()``; "anonymous"
without authentication) has a bucket of ``burst`` tokens refilled at ``rate``
tokens per second. A call takes as many tokens as it has events, all or none:
a refused call changes nothing (no event of it is published, no token is
spent), so the client simply retries it after the ``retry_after_s`` it is told,
which is exactly when enough tokens will have accumulated.

Limits are per replica: N ingestion replicas behind a load balancer admit up to
N x rate per caller. That keeps the limiter free of any shared store on the hot
path; size ``rate`` for one replica (docs/security.md).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass
class _Bucket:
    tokens: float
    updated: float


@dataclass(frozen=True)
class Decision:
    """``allowed``; otherwise how long until the call would fit (``retry_after_s``)."""

    allowed: bool
    retry_after_s: float = 0.0


class CallerRateLimiter:
    """Token bucket per caller name. Thread-safe; ``rate_eps <= 0`` turns limiting off."""

    def __init__(self, rate_eps: float, burst: int, clock: Callable[[], float] = time.monotonic) -> None:
        if rate_eps > 0 and burst < 1:
            raise ValueError("burst must be at least 1 when rate limiting is on")
        self.rate = float(rate_eps)
        self.burst = int(burst)
        self._clock = clock
        self._buckets: dict[str, _Bucket] = {}
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return self.rate > 0

    def fits(self, n: int) -> bool:
        """Whether a call of ``n`` events can ever be admitted (a full bucket holds ``burst``)."""
        return not self.enabled or n <= self.burst

    def acquire(self, caller: str, n: int) -> Decision:
        """Take ``n`` tokens from ``caller``'s bucket, or none and say when they will be there."""
        if not self.enabled or n <= 0:
            return Decision(True)
        if n > self.burst:
            raise ValueError(f"{n} events can never fit a bucket of {self.burst}; check fits() first")
        now = self._clock()
        with self._lock:
            bucket = self._buckets.get(caller)
            if bucket is None:
                bucket = self._buckets[caller] = _Bucket(float(self.burst), now)
            else:
                bucket.tokens = min(float(self.burst), bucket.tokens + (now - bucket.updated) * self.rate)
                bucket.updated = now
            if bucket.tokens >= n:
                bucket.tokens -= n
                return Decision(True)
            return Decision(False, (n - bucket.tokens) / self.rate)
