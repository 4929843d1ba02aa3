"""Freshness under load: how long a shopper waits, while the stack is loaded, until the event they
just sent has reached their recommendations in Redis.

The idle figure (`stylerec bench scoring`, ~25 ms) says nothing about a loaded scorer: a replica
that applies events more slowly than ingestion accepts them keeps answering every RPC while its
users' lists go minutes stale. So the soak of `stylerec bench load` runs a :class:`FreshnessProbe`
beside its open-loop traffic: once per ``interval_s`` one PURCHASE of a known (seeded) customer,
of an item that customer has not interacted with yet, goes through the ingestion API, and the
probe polls that user's seen set in Redis until the item is in it. Scoring writes a user's
top-N, meta and seen set in one MULTI/EXEC after folding the user in (services/scoring/foldin.py
``RecsWriter``), so the item's presence means the whole answer reflects the event: the time from
the send to that moment is event -> recommendations in Redis, ingestion, broker and scoring's
queue included. A probe not seen within ``timeout_s`` counts as a timeout, and a timeout is
slower than every measured probe in the percentiles (never dropped).

The probe events go through the same client counter as the load's writes, so the keep-up check
(applied vs accepted) still balances.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
import redis.asyncio as aioredis
from stylerec.v1 import common_pb2, ingestion_pb2

from cli.load.driver import Client
from libs.common import keys
from libs.common.pseudonym import Pseudonymizer

POLL_S = 0.01  # resolution of the measurement; far below the 1 s goal
GOAL_P95_S = 1.0  # the product's promise: event -> new recommendations within a second


@dataclass
class ProbeResults:
    sent: int = 0
    latencies_s: list[float] = field(default_factory=list)  # (seconds from the soak start, latency)
    at_s: list[float] = field(default_factory=list)
    # Send -> ingestion's answer (the event is in the broker): the part of each latency that is not
    # scoring's, to tell a slow scorer from a slow front door or a busy load generator.
    accept_s: list[float] = field(default_factory=list)
    timeouts: int = 0
    not_accepted: int = 0  # ingestion refused or failed the probe: nothing to wait for (an error of the run)
    skipped_seen: int = 0  # every candidate item was already in the user's seen set

    def summary(self, timeout_s: float, goal_p95_s: float) -> dict[str, Any]:
        # Timeouts rank above every measured latency: a stale answer is never left out of the tail.
        ranked = sorted(self.latencies_s) + [float("inf")] * self.timeouts
        measured = len(ranked)

        def q(p: float) -> float | None:
            # Nearest rank, as pct_ms; None when that rank is a timeout.
            if not ranked:
                return None
            v = ranked[min(measured - 1, max(0, math.ceil(p * measured) - 1))]
            return None if v == float("inf") else round(v * 1000, 1)

        p95 = q(0.95)
        met = bool(ranked) and p95 is not None and p95 <= goal_p95_s * 1000
        return {
            "definition": (
                "one PURCHASE per interval by a known customer of an item not in their seen set, sent through "
                "ingestion; latency = send -> the item is in that user's seen set in Redis (written with the "
                "top-N in one MULTI/EXEC); a timeout ranks above every measured probe (p = null means timed out)"
            ),
            "probes_sent": self.sent,
            "probes_measured": len(self.latencies_s),
            "timeouts": self.timeouts,
            "timeout_s": timeout_s,
            "not_accepted": self.not_accepted,
            "skipped_all_items_seen": self.skipped_seen,
            "p50_ms": q(0.50),
            "p95_ms": p95,
            "p99_ms": q(0.99),
            "max_ms": q(1.0),
            "mean_ms": round(1000 * sum(self.latencies_s) / len(self.latencies_s), 1) if self.latencies_s else None,
            "goal_p95_ms": goal_p95_s * 1000,
            "met": met,
            "accept": nearest_rank_ms(self.accept_s),
            "after_accept": nearest_rank_ms([v - a for v, a in zip(self.latencies_s, self.accept_s, strict=True)]),
            "series": [[round(t, 2), round(v * 1000, 1)] for t, v in zip(self.at_s, self.latencies_s, strict=True)],
        }


def nearest_rank_ms(values: Sequence[float]) -> dict[str, float | None]:
    """p50/p95/p99 in ms of measured probes only (for the breakdown; timeouts have no parts)."""
    ranked = sorted(values)

    def q(p: float) -> float | None:
        if not ranked:
            return None
        return round(ranked[min(len(ranked) - 1, max(0, math.ceil(p * len(ranked)) - 1))] * 1000, 1)

    return {"p50_ms": q(0.50), "p95_ms": q(0.95), "p99_ms": q(0.99)}


def histogram_quantile(q: float, buckets: Sequence[tuple[float, float]]) -> float | None:
    """Prometheus's ``histogram_quantile``: cumulative ``(upper bound, count)`` buckets, linear
    inside the bucket that holds the rank; None without observations, the last finite bound when the
    rank falls in +Inf."""
    ordered = sorted(buckets)
    if not ordered or ordered[-1][1] <= 0:
        return None
    rank = q * ordered[-1][1]
    lower, below = 0.0, 0.0
    for upper, count in ordered:
        if count >= rank:
            if math.isinf(upper):
                return lower
            return lower + (upper - lower) * ((rank - below) / (count - below) if count > below else 1.0)
        lower, below = upper, count
    return lower


class FreshnessProbe:
    """Sends one probe per ``interval_s`` and times each until scoring has written it (see module doc)."""

    def __init__(
        self,
        client: Client,  # its ingestion stub and metadata; probes count in its accepted events
        redis_url: str,
        pseudonymize: Pseudonymizer,
        users: Sequence[str],
        items: Sequence[str],
        run_id: str,
        interval_s: float = 1.0,
        timeout_s: float = 30.0,
        seed: int = 11,
    ) -> None:
        self.client = client
        self.redis = aioredis.from_url(redis_url)
        self.pseudonymize = pseudonymize
        self.users, self.items = list(users), list(items)
        self.run_id = run_id
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self.rng = random.Random(seed)
        self.results = ProbeResults()

    async def _one(self, n: int, t0: float) -> None:
        user = self.rng.choice(self.users)
        seen_key = keys.user_seen(self.pseudonymize(user))
        members = await self.redis.smembers(seen_key)
        seen = {m.decode() if isinstance(m, bytes) else m for m in members}
        item = next((i for i in (self.rng.choice(self.items) for _ in range(20)) if i not in seen), None)
        if item is None:
            self.results.skipped_seen += 1
            return
        event = common_pb2.Event(
            event_id=f"load-probe-{self.run_id}-{n}", user_id=user, item_id=item, type=common_pb2.PURCHASE, value=1.0
        )
        event.timestamp.FromNanoseconds(time.time_ns())
        self.results.sent += 1
        start = time.monotonic()
        try:
            resp = await self.client.ing.IngestEvents(
                ingestion_pb2.IngestEventsRequest(events=[event]), timeout=10.0, metadata=self.client.ing_md
            )
        except grpc.aio.AioRpcError:
            self.results.not_accepted += 1
            return
        if resp.accepted != 1:
            self.results.not_accepted += 1
            return
        self.client.events_accepted += 1
        accepted = time.monotonic() - start
        while time.monotonic() - start < self.timeout_s:
            if await self.redis.sismember(seen_key, item):
                self.results.latencies_s.append(time.monotonic() - start)
                self.results.accept_s.append(accepted)
                self.results.at_s.append(start - t0)
                return
            await asyncio.sleep(POLL_S)
        self.results.timeouts += 1

    async def run(self, seconds: float) -> ProbeResults:
        """Probes for ``seconds``, then waits for the ones in flight (each bounded by ``timeout_s``)."""
        t0 = time.monotonic()
        tasks: list[asyncio.Task[None]] = []
        n = 0
        while time.monotonic() - t0 < seconds:
            n += 1
            tasks.append(asyncio.create_task(self._one(n, t0)))
            await asyncio.sleep(self.interval_s)
        await asyncio.gather(*tasks)
        await self.redis.aclose()
        return self.results
