"""Request budgets and circuit breakers.

Every downstream call of the gateway is optional in the sense that a missing
part degrades the answer instead of failing it. Two things make that true in
practice: each call gets a timeout that fits inside what is left of the caller's
deadline (:class:`Deadline`), and a dependency that just failed is skipped for a
moment (:class:`Breaker`) so that a dead Redis costs one timeout, not one per
request.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

# A remaining time above this (about 11 days) means the caller set no deadline.
NO_DEADLINE_S = 1e6


class DependencyUnavailable(Exception):
    """A downstream part could not answer in time (or its breaker is open)."""

    def __init__(self, dependency: str, reason: str) -> None:
        super().__init__(f"{dependency}: {reason}")
        self.dependency = dependency
        self.reason = reason


def describe(exc: Exception) -> str:
    """Short reason text; gRPC errors as CODE: details rather than their multi-line repr."""
    code = getattr(exc, "code", None)
    details = getattr(exc, "details", None)
    if callable(code) and callable(details):
        try:
            return f"{code().name}: {details()}"
        except Exception:
            pass
    return f"{type(exc).__name__}: {exc}"[:300]


class Deadline:
    """What is left of one request's time budget, on the monotonic clock."""

    def __init__(self, budget_s: float, reserve_s: float = 0.0) -> None:
        self._end = time.monotonic() + max(0.0, budget_s - reserve_s)

    @classmethod
    def from_context(cls, time_remaining: float | None, default_s: float, reserve_s: float) -> Deadline:
        """Use the caller's deadline when it set one, else the configured default budget.

        grpcio reports "no deadline" as None or as an effectively infinite remainder.
        """
        no_deadline = time_remaining is None or time_remaining > NO_DEADLINE_S
        return cls(default_s if no_deadline or time_remaining is None else time_remaining, reserve_s)

    def remaining(self) -> float:
        return max(0.0, self._end - time.monotonic())

    def expired(self) -> bool:
        return self.remaining() <= 0.0

    def timeout(self, cap_s: float) -> float:
        """A timeout for one downstream call: its own cap, never past the request's end."""
        return min(cap_s, self.remaining())


class Breaker:
    """Open for ``open_s`` after a failure; while open, calls fail fast.

    One half-open probe is let through after the window, so recovery is noticed
    by the first request after the dependency comes back.
    """

    def __init__(self, name: str, open_s: float) -> None:
        self.name = name
        self.open_s = open_s
        self._open_until = 0.0
        self._lock = threading.Lock()
        self.last_error = ""

    def is_open(self) -> bool:
        return time.monotonic() < self._open_until

    def call(
        self,
        fn: Callable[[], T],
        deadline: Deadline,
        min_budget_s: float = 0.002,
        is_failure: Callable[[Exception], bool] | None = None,
    ) -> T:
        """Run ``fn`` unless the breaker is open. ``is_failure`` tells a broken dependency from one
        that answered with an error (e.g. NOT_FOUND): only the former opens the breaker."""
        if self.is_open():
            raise DependencyUnavailable(self.name, f"skipped after recent failure ({self.last_error})")
        if deadline.remaining() < min_budget_s:
            raise DependencyUnavailable(self.name, "no time left in the request deadline")
        try:
            result = fn()
        except DependencyUnavailable:
            raise
        except Exception as exc:
            if is_failure is None or is_failure(exc):
                self.trip(f"{type(exc).__name__}: {exc}")
            raise DependencyUnavailable(self.name, describe(exc)) from exc
        return result

    def trip(self, error: str) -> None:
        with self._lock:
            self.last_error = error[:200]
            self._open_until = time.monotonic() + self.open_s
