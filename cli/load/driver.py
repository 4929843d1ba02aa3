"""The load generator behind `stylerec bench load`: an asyncio gRPC client (grpc.aio) that drives a
mix of recommendation reads and event writes, closed-loop (to find the maximum) or open-loop (to soak).

Open loop matters for the soak: arrivals follow a Poisson schedule that does not wait for answers,
and each latency is measured from the request's *scheduled* time, so a slow server shows up as
queueing delay instead of silently lowering the offered rate (coordinated omission).
"""

from __future__ import annotations

import asyncio
import random
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
from stylerec.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc, ingestion_pb2, ingestion_pb2_grpc

from cli.measure.machine import pct_ms
from libs.common.channels import ClientSecurity

KINDS = ("read_known", "read_unknown", "write")
RPC_OF = {
    "read_known": "gateway GetRecommendations, known user",
    "read_unknown": "gateway GetRecommendations, unknown (cold-start) user",
    "write": "ingestion IngestEvents batch",
}
# A shop front-end's event stream: mostly views, some clicks, few carts and purchases.
EVENT_TYPES = (common_pb2.VIEW, common_pb2.CLICK, common_pb2.ADD_TO_CART, common_pb2.PURCHASE)
EVENT_WEIGHTS = (70, 20, 7, 3)
CLIENT_OVERLOAD = "CLIENT_OVERLOAD"
RECENT_PER_USER = 20  # items a user's clicks, carts, purchases and second looks are drawn from


@dataclass(frozen=True)
class Mix:
    read_fraction: float = 0.8
    unknown_fraction: float = 0.1  # share of reads for users the system has never seen
    batch_events: int = 20
    k: int = 10
    read_timeout_s: float = 2.0
    write_timeout_s: float = 10.0
    session_events: float = 10.0  # mean events of one user's session (geometric)
    review_fraction: float = 0.4  # views that are a second look at an item the user viewed before


class Workload:
    """Draws operations: users and items are the seeded ones, weighted by how often they were bought.

    Writes are shopping sessions, not independent (user, item) draws: a session is one user's
    run of events; a view is of a fresh item (popularity-weighted) or, ``review_fraction`` of the
    time, a second look at one of the user's recent items; clicks, carts and purchases are of items
    the user has viewed (nobody buys what they never saw). Independent draws made about three
    events in four a (user, item) pair never seen before, which no shop's stream does and which
    the scorer's state grows with by design (docs/load.md).
    """

    def __init__(
        self,
        users: Sequence[str],
        user_weights: Sequence[float],
        items: Sequence[str],
        item_weights: Sequence[float],
        mix: Mix,
        run_id: str,
        seed: int = 1,
    ) -> None:
        self.users, self.user_weights = list(users), list(user_weights)
        self.items, self.item_weights = list(items), list(item_weights)
        self.mix = mix
        self.run_id = run_id
        self.rng = random.Random(seed)
        self._n = 0
        self._recent: dict[str, deque[str]] = {}  # user -> items they viewed in this run, newest last

    def pick(self) -> str:
        r = self.rng.random()
        if r >= self.mix.read_fraction:
            return "write"
        return "read_unknown" if r < self.mix.read_fraction * self.mix.unknown_fraction else "read_known"

    def read(self, kind: str) -> gateway_pb2.GetRecommendationsRequest:
        self._n += 1
        if kind == "read_unknown":
            user = f"load-newcomer-{self.run_id}-{self._n}"
        else:
            user = self.rng.choices(self.users, self.user_weights)[0]
        return gateway_pb2.GetRecommendationsRequest(user_id=user, k=self.mix.k, want_stylized=True)

    def _item_for(self, user: str, etype: int) -> str:
        recent = self._recent.setdefault(user, deque(maxlen=RECENT_PER_USER))
        revisit = etype != common_pb2.VIEW or self.rng.random() < self.mix.review_fraction
        if revisit and recent:
            return self.rng.choice(recent)
        item = self.rng.choices(self.items, self.item_weights)[0]
        recent.append(item)
        return item

    def write(self, now_s: float) -> ingestion_pb2.IngestEventsRequest:
        events = []
        user = ""
        for _ in range(self.mix.batch_events):
            if not user or self.rng.random() < 1.0 / self.mix.session_events:
                user = self.rng.choices(self.users, self.user_weights)[0]
            t = self.rng.choices(EVENT_TYPES, EVENT_WEIGHTS)[0]
            self._n += 1
            e = common_pb2.Event(
                event_id=f"load-{self.run_id}-{self._n}", user_id=user, item_id=self._item_for(user, t), type=t
            )
            if t == common_pb2.PURCHASE:
                e.value = 1.0
            e.timestamp.FromNanoseconds(int(now_s * 1e9))
            e.context.device = "web"
            events.append(e)
        return ingestion_pb2.IngestEventsRequest(events=events)


@dataclass
class Outcome:
    ok: bool
    code: str = "OK"
    degraded: bool = False


def aio_channel(address: str, security: ClientSecurity) -> tuple[grpc.aio.Channel, tuple[tuple[str, str], ...]]:
    """An asyncio channel with the stack's transport security, and the metadata every call carries.

    ``make_channel`` is synchronous-only (its token interceptor is a sync one), so the async client
    applies the same ClientSecurity itself: TLS/mTLS when it has roots, the bearer token as metadata.
    """
    if security.tls:
        opts = [("grpc.ssl_target_name_override", security.server_name)] if security.server_name else []
        channel = grpc.aio.secure_channel(address, security.channel_credentials(), options=opts)
    else:
        channel = grpc.aio.insecure_channel(address)
    token = security.token.get_secret_value()
    return channel, ((("authorization", f"Bearer {token}"),) if token else ())


class Client:
    """One grpc.aio channel per service, shared by every in-flight request (as a web tier would)."""

    def __init__(
        self,
        gateway: tuple[str, ClientSecurity],
        ingestion: tuple[str, ClientSecurity],
        workload: Workload,
        wall_clock: Callable[[], float],
    ) -> None:
        self.gw_channel, self.gw_md = aio_channel(*gateway)
        self.ing_channel, self.ing_md = aio_channel(*ingestion)
        self.gw = gateway_pb2_grpc.GatewayServiceStub(self.gw_channel)
        self.ing = ingestion_pb2_grpc.IngestionServiceStub(self.ing_channel)
        self.workload = workload
        self.wall_clock = wall_clock
        self.events_accepted = 0  # what ingestion acknowledged: the scorer must apply as many

    async def call(self, kind: str) -> Outcome:
        mix = self.workload.mix
        try:
            if kind == "write":
                resp = await self.ing.IngestEvents(
                    self.workload.write(self.wall_clock()), timeout=mix.write_timeout_s, metadata=self.ing_md
                )
                self.events_accepted += resp.accepted
                if len(resp.rejected):
                    return Outcome(False, "EVENTS_REJECTED")
                return Outcome(True)
            r = await self.gw.GetRecommendations(
                self.workload.read(kind), timeout=mix.read_timeout_s, metadata=self.gw_md
            )
            return Outcome(True, degraded=bool(r.degraded))
        except grpc.aio.AioRpcError as exc:
            return Outcome(False, exc.code().name)

    async def close(self) -> None:
        await self.gw_channel.close()
        await self.ing_channel.close()


@dataclass
class Recorder:
    """Latencies and outcomes per kind, with completion times (seconds from the phase start)."""

    lat: dict[str, list[float]] = field(default_factory=lambda: {k: [] for k in KINDS})
    done: dict[str, list[float]] = field(default_factory=lambda: {k: [] for k in KINDS})
    errors: Counter[tuple[str, str]] = field(default_factory=Counter)
    error_times: list[float] = field(default_factory=list)
    degraded: Counter[str] = field(default_factory=Counter)

    def add(self, kind: str, latency_s: float, done_at: float, outcome: Outcome) -> None:
        if outcome.ok:
            self.lat[kind].append(latency_s)
            self.done[kind].append(done_at)
            if outcome.degraded:
                self.degraded[kind] += 1
        else:
            self.errors[(kind, outcome.code)] += 1
            self.error_times.append(done_at)

    def count(self) -> int:
        return sum(len(v) for v in self.lat.values())

    def error_count(self) -> int:
        return sum(self.errors.values())

    def stats(self, seconds: float) -> dict[str, Any]:
        per_kind: dict[str, Any] = {}
        for kind in KINDS:
            s = sorted(self.lat[kind])
            per_kind[kind] = {
                "rpc": RPC_OF[kind],
                "ok": len(s),
                "errors": sum(n for (k, _c), n in self.errors.items() if k == kind),
                "degraded_answers": self.degraded[kind],
                "requests_per_s": round(sum(1 for t in self.done[kind] if t <= seconds) / seconds, 2),
                "p50_ms": pct_ms(s, 50),
                "p95_ms": pct_ms(s, 95),
                "p99_ms": pct_ms(s, 99),
                "max_ms": round(s[-1] * 1000, 3) if s else 0.0,
            }
        codes: Counter[str] = Counter()
        for (_k, code), n in self.errors.items():
            codes[code] += n
        ok_in_window = sum(1 for k in KINDS for t in self.done[k] if t <= seconds)
        return {
            "seconds": round(seconds, 2),
            "requests_ok": self.count(),
            "requests_per_s": round(ok_in_window / seconds, 2),
            "errors": self.error_count(),
            "errors_by_status": dict(codes),
            "errors_by_kind_and_status": {f"{k}/{c}": n for (k, c), n in sorted(self.errors.items())},
            "by_kind": per_kind,
        }

    def timeline(self, seconds: float, window_s: float) -> list[dict[str, Any]]:
        """Per-window throughput and latency percentiles, for the plots and for spotting drift."""
        n = max(1, int(seconds / window_s + 0.999))
        buckets: list[dict[str, list[float]]] = [{k: [] for k in KINDS} for _ in range(n)]
        for kind in KINDS:
            for lat, t in zip(self.lat[kind], self.done[kind], strict=True):
                buckets[min(n - 1, int(t / window_s))][kind].append(lat)
        errs = [0] * n
        for t in self.error_times:
            errs[min(n - 1, int(t / window_s))] += 1
        out = []
        for i, b in enumerate(buckets):
            row: dict[str, Any] = {
                "t_s": round(i * window_s, 2),
                "requests_per_s": round(sum(len(v) for v in b.values()) / window_s, 2),
                "errors": errs[i],
            }
            for kind in KINDS:
                s = sorted(b[kind])
                row[kind] = {"n": len(s), "p50_ms": pct_ms(s, 50), "p99_ms": pct_ms(s, 99)}
            out.append(row)
        return out


async def closed_loop(client: Client, concurrency: int, seconds: float, warmup_s: float) -> Recorder:
    """``concurrency`` workers, each sending its next request when the last one is answered."""
    loop = asyncio.get_running_loop()
    rec = Recorder()
    start = loop.time() + warmup_s
    stop = start + seconds

    async def worker() -> None:
        while (t0 := loop.time()) < stop:
            kind = client.workload.pick()
            outcome = await client.call(kind)
            t1 = loop.time()
            if t0 >= start:
                rec.add(kind, t1 - t0, t1 - start, outcome)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return rec


@dataclass
class OpenLoopState:
    """What the progress printer reads while the open loop runs."""

    rec: Recorder = field(default_factory=Recorder)
    offered: int = 0
    inflight: int = 0
    max_inflight_seen: int = 0
    max_schedule_lag_s: float = 0.0


async def open_loop(
    client: Client,
    rate_per_s: float,
    seconds: float,
    max_inflight: int,
    seed: int,
    state: OpenLoopState,
    on_start: Callable[[], Awaitable[None]] | None = None,
) -> OpenLoopState:
    """Poisson arrivals at ``rate_per_s``; latency from the scheduled send time, so queueing counts.

    More than ``max_inflight`` outstanding requests means the system (or this client) cannot keep
    up; the arrival is then recorded as a CLIENT_OVERLOAD error instead of growing memory forever.
    """
    loop = asyncio.get_running_loop()
    rng = random.Random(seed)
    tasks: set[asyncio.Task[None]] = set()
    if on_start is not None:
        await on_start()
    t_start = loop.time()
    next_t = t_start

    async def one(kind: str, scheduled: float) -> None:
        outcome = await client.call(kind)
        t1 = loop.time()
        state.rec.add(kind, t1 - scheduled, t1 - t_start, outcome)
        state.inflight -= 1

    while True:
        next_t += rng.expovariate(rate_per_s)
        if next_t - t_start >= seconds:
            break
        delay = next_t - loop.time()
        await asyncio.sleep(max(0.0, delay))
        state.max_schedule_lag_s = max(state.max_schedule_lag_s, -delay)
        kind = client.workload.pick()
        state.offered += 1
        if state.inflight >= max_inflight:
            state.rec.add(kind, 0.0, loop.time() - t_start, Outcome(False, CLIENT_OVERLOAD))
            continue
        state.inflight += 1
        state.max_inflight_seen = max(state.max_inflight_seen, state.inflight)
        task = asyncio.create_task(one(kind, next_t))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    if tasks:
        await asyncio.gather(*list(tasks))
    return state
