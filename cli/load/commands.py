"""`stylerec bench load --minutes N [--json]`: find the stack's maximum sustainable throughput, then soak it.

1. A stack: a running ``stylerec up`` stack when one is healthy (``--stack auto``, the default),
   else its own in ``<out-dir>/stack`` (``cli/localstack/stack.py`` ``Stack``, exactly as ``stylerec up``).
2. Seed: the most recent ``--seed-purchases`` REAL Online Retail purchases (the demo's loader;
   a generated, labelled-synthetic sample without ../shared/data) go through ingestion, their
   stock codes into the catalog, and the model is trained once, so reads hit real recommendations.
3. Phase a, max search: closed loop at increasing concurrency with the configured mix (default
   80% GetRecommendations reads, 10% of them for never-seen users, 20% IngestEvents batches).
   "Max" = the highest requests/s of a step with zero errors and every kind's p99 within
   ``--p99-limit-ms``; the ramp stops at the first failing step or after two steps that add
   less than 5% over the best.
4. Phase b, soak: open-loop Poisson arrivals at ``--rate-fraction`` (0.7) x max for ``--minutes``;
   latency counts from each request's scheduled time, so queueing shows. Beside it, one freshness
   probe a second (cli/load/freshness.py): a known customer's purchase through ingestion, timed until
   scoring has written it to that user's answer in Redis (event -> recommendations under load).
5. RSS of every component's process group sampled from /proc throughout; a memory verdict over
   the soak (cli/load/report.py); ``load.json``, ``rss.png`` and ``latency.png`` in ``--out-dir``.

Exit 1 when the soak had any error, the memory of a service was not flat, scoring or ingestion's
archive consumers (event archive, attribution, impression archive) fell behind, the freshness p95
under load was over ``--freshness-p95-ms``, or no step qualified as a maximum; the reason is
printed. Nothing is asserted about speed: the numbers go to JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import signal
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cli.errors import UsageError
from cli.load.driver import KINDS, Client, Mix, OpenLoopState, Workload, closed_loop, open_loop
from cli.load.freshness import GOAL_P95_S, FreshnessProbe, histogram_quantile
from cli.load.report import (
    MAX_GROWTH_PCT,
    MAX_SLOPE_MIB_PER_MIN,
    MIN_SOAK_MINUTES_FOR_VERDICT,
    memory_verdict,
    plot_latency,
    plot_rss,
)
from cli.load.state import (
    MIB,
    ArchiveWatch,
    PipelineWatch,
    adjusted_series,
    event_to_redis_buckets,
    measure_entry_costs,
    pipeline_applied,
    scrape_scoring,
    seconds_of_writes,
    state_growth,
)
from cli.localstack.seeding import ingest, train_model, upsert
from cli.localstack.stack import REPO, Stack, StackError, pid_alive, stack_dir
from cli.measure.machine import OtherLoad, machine_info, rss_by_group, snapshot

OUT = REPO / "out" / "load"
PLATEAU_GAIN = 1.05  # a step must add 5% over the best so far to count as progress
PLATEAU_STEPS = 2
# Scoring keeps up when, once the writes stop, what ingestion accepted but scoring has not applied
# yet is applied within this many seconds. A backlog at one instant says little: scoring applies
# in bursts (its consumer and archive sync share one write lock) and at 880 events/s its backlog
# swung between 3 and 20 s of writes; a scorer behind for good has minutes of writes to catch up.
KEEP_UP_S = 30.0
# A max-search step lasts seconds, so a drain within KEEP_UP_S passes an archive consumer that took
# a fraction of the step's writes (the event archive, 25,000 records behind after 12 s at 724
# requests/s, still caught up within 30 s once the writes stopped). Each step holds them to this
# backlog in seconds of the step's writes instead: a consumer that keeps up is behind by at most
# its 1 s tick and one cycle.
STEP_ARCHIVE_BACKLOG_S = 3.0
# ... and when the soak's final backlog is at most this many seconds of its writes: once writes
# stop, scoring catches up fast (195,000 events in 17 s once), so the drain alone let a soak pass
# whose recommendations were 93 s behind.
MAX_BACKLOG_S = 60.0
# A probe not seen within this counts as a timeout. A step lasts seconds, so its probes may not hold it
# for the soak's 30 s: a timeout fails the step anyway.
STEP_PROBE_TIMEOUT_S = 10.0
SOAK_PROBE_TIMEOUT_S = 30.0
DRAIN_S = 90.0  # how long the seeding and the end of each phase may wait for scoring to catch up


def register_bench(bsub: Any) -> None:
    p = bsub.add_parser(
        "load",
        help="max sustainable requests/s (closed-loop ramp), then an open-loop soak at a fraction of it",
    )
    p.add_argument("--minutes", type=float, default=10.0, help="soak length in minutes (default 10)")
    p.add_argument("--rate-fraction", type=float, default=0.7, help="soak rate as a fraction of the max found")
    p.add_argument("--rate", type=float, default=0.0, help="soak at this many requests/s and skip the max search")
    p.add_argument("--read-fraction", type=float, default=0.8, help="share of GetRecommendations in the mix")
    p.add_argument("--unknown-fraction", type=float, default=0.1, help="share of reads for never-seen users")
    p.add_argument("--batch-events", type=int, default=20, help="events per IngestEvents call")
    p.add_argument("--session-events", type=float, default=10.0, help="mean events of one user's shopping session")
    p.add_argument(
        "--review-fraction", type=float, default=0.4, help="share of views that look again at an item the user viewed"
    )
    p.add_argument("--concurrency", default="1,2,4,8,16,32,64", help="closed-loop steps of the max search")
    p.add_argument("--step-seconds", type=float, default=10.0, help="measured seconds per max-search step")
    p.add_argument("--p99-limit-ms", type=float, default=300.0, help="a max-search step qualifies under this p99")
    p.add_argument(
        "--step-archive-backlog-s",
        type=float,
        default=STEP_ARCHIVE_BACKLOG_S,
        help="a max-search step qualifies when each archive consumer is at most this many seconds of the "
        "step's writes behind at its end",
    )
    p.add_argument("--seed-purchases", type=int, default=20_000, help="Online Retail purchases seeded first")
    p.add_argument("--max-inflight", type=int, default=2000, help="open-loop cap on outstanding requests")
    p.add_argument("--probe-interval", type=float, default=1.0, help="seconds between freshness probes during the soak")
    p.add_argument(
        "--step-probe-interval",
        type=float,
        default=0.25,
        help="seconds between freshness probes during each max-search step (its p95 must meet the goal too)",
    )
    p.add_argument(
        "--freshness-p95-ms",
        type=float,
        default=GOAL_P95_S * 1000,
        help="the soak fails when event -> recommendations in Redis p95 is above this (default 1000)",
    )
    p.add_argument(
        "--scoring-replicas",
        type=int,
        default=1,
        help="scoring replicas sharing user-events' partitions (needs --stack own; the scale-out figure)",
    )
    p.add_argument("--max-slope", type=float, default=MAX_SLOPE_MIB_PER_MIN, help="flat: RSS slope, MiB/min")
    p.add_argument("--max-growth-pct", type=float, default=MAX_GROWTH_PCT, help="flat: quarter-to-quarter growth, %%")
    p.add_argument(
        "--stack",
        choices=("auto", "own", "running"),
        default="auto",
        help="auto: use a healthy `stylerec up` stack if there is one, else start one; own: always start one",
    )
    p.add_argument("--json", action="store_true", help="print load.json on stdout (progress goes to stderr)")
    p.add_argument("--out-dir", type=Path, default=OUT, help="where load.json, rss.png, latency.png go")
    p.set_defaults(func=cmd_bench_load)


def progress(msg: str) -> None:
    print(f"[load {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def parse_concurrency(text: str) -> list[int]:
    try:
        steps = [int(c) for c in text.split(",") if c.strip()]
    except ValueError as exc:
        raise UsageError(f"--concurrency must be comma-separated integers: {exc}") from exc
    if not steps or any(c < 1 or c > 1024 for c in steps):
        raise UsageError("--concurrency values must be between 1 and 1024")
    return sorted(set(steps))


def validate(args: argparse.Namespace) -> None:
    checks = [
        (args.minutes > 0, "--minutes must be > 0"),
        (0 < args.rate_fraction <= 1.5, "--rate-fraction must be in (0, 1.5]"),
        (args.rate >= 0, "--rate must not be negative"),
        (0 <= args.read_fraction <= 1, "--read-fraction must be in [0, 1]"),
        (0 <= args.unknown_fraction <= 1, "--unknown-fraction must be in [0, 1]"),
        (1 <= args.batch_events <= 10_000, "--batch-events must be in [1, 10000]"),
        (args.session_events >= 1, "--session-events must be at least 1"),
        (0 <= args.review_fraction <= 1, "--review-fraction must be in [0, 1]"),
        (args.step_seconds > 0, "--step-seconds must be > 0"),
        (args.p99_limit_ms > 0, "--p99-limit-ms must be > 0"),
        (args.step_archive_backlog_s > 0, "--step-archive-backlog-s must be > 0"),
        (args.seed_purchases >= 100, "--seed-purchases must be at least 100"),
        (args.max_inflight >= 1, "--max-inflight must be at least 1"),
        (0.05 <= args.probe_interval <= 60, "--probe-interval must be in [0.05, 60] seconds"),
        (0.05 <= args.step_probe_interval <= 60, "--step-probe-interval must be in [0.05, 60] seconds"),
        (args.freshness_p95_ms > 0, "--freshness-p95-ms must be > 0"),
        (1 <= args.scoring_replicas <= 4, "--scoring-replicas must be in [1, 4]"),
        (args.scoring_replicas == 1 or args.stack == "own", "--scoring-replicas above 1 needs --stack own"),
    ]
    for ok, msg in checks:
        if not ok:
            raise UsageError(msg)


def running_stack() -> Stack | None:
    """The `stylerec up` stack, when every component of it is alive and healthy."""
    stack = Stack.load(stack_dir())
    if not stack.components or not all(pid_alive(c.pid) for c in stack.components.values()):
        return None
    if not all(stack.component_healthy(n) for n in ("ingestion", "gateway", "scoring", "redis", "mongo", "kafka")):
        return None
    return stack


def scoring_metrics_addrs(stack: Stack) -> list[str]:
    """/metrics of every scoring replica of the stack (``scoring``, ``scoring-2``, ...)."""
    names = [n for n in stack.components if n == "scoring" or n.startswith("scoring-")]
    return [a for a in (stack.metrics_addr_of(n) for n in names) if a]


def seed(stack: Stack, n_purchases: int, mix: Mix) -> tuple[Workload, dict[str, Any]]:
    """Catalog + purchases through ingestion, one training run; returns the workload over those users/items."""
    from cli.datasets.retail import SHARED_DATA, gift_items, load_purchases, to_events

    t0 = time.monotonic()
    purchases, label = load_purchases(n_purchases, SHARED_DATA)
    progress(label)
    upserted, rejected_items = upsert(stack, gift_items(purchases), "load catalog", 500)
    replicas = scoring_metrics_addrs(stack)
    applied_before = pipeline_applied(replicas) if replicas else 0.0
    accepted, dups, rejected = ingest(stack, to_events(purchases), "load seed purchases")
    progress(f"seeded {upserted} items, {accepted} purchases ({dups} duplicates, {rejected} rejected); training ...")
    version = train_model(stack, accepted)
    users = Counter(p.customer for p in purchases)
    items = Counter(p.stock_code for p in purchases)
    info = {
        "data": label,
        "items": upserted,
        "items_rejected": rejected_items,
        "purchases_accepted": accepted,
        "purchases_duplicate": dups,
        "purchases_rejected": rejected,
        "users": len(users),
        "model_version": version,
        "seconds": round(time.monotonic() - t0, 1),
        "scoring_applied_before": applied_before,
    }
    progress(f"model {version} serving; {len(users)} known users, {len(items)} items ({info['seconds']} s)")
    workload = Workload(list(users), list(users.values()), list(items), list(items.values()), mix, uuid.uuid4().hex[:8])
    return workload, info


class RssSampler:
    """RSS of each component's process group, plus CPU used by everything else, every ``interval_s``."""

    def __init__(self, stack: Stack, interval_s: float) -> None:
        self.groups = {name: comp.pid for name, comp in stack.components.items()}
        self.interval_s = interval_s
        self.series: dict[str, list[tuple[float, float]]] = {name: [] for name in self.groups}
        self.other = OtherLoad()
        self.other.own([os.getpgrp(), *self.groups.values()])
        self.scoring_metrics = stack.metrics_addr_of("scoring")
        self.gauges: list[tuple[float, dict[str, float]]] = []  # scoring's state-size gauges and applied count
        self.accepted: Callable[[], int] = lambda: 0  # the load client's accepted-event count, once it exists
        self.applied: Callable[[], float] = lambda: 0.0  # scoring's applied count as PipelineWatch reads it

    def sample_once(self, t: float) -> None:
        snap = snapshot()
        rss = rss_by_group(self.groups.values(), snap)
        for name, pgid in self.groups.items():
            if rss[pgid] > 0:
                self.series[name].append((t, rss[pgid]))
        self.other.sample(snap)
        if self.scoring_metrics:
            # Restarting or busy: the adjusted series pairs each RSS sample with the nearest gauge sample.
            with contextlib.suppress(OSError):
                accepted = self.accepted()
                applied = self.applied()
                gauges = scrape_scoring(self.scoring_metrics)
                self.gauges.append((t, {**gauges, "accepted": accepted, "pipeline_applied": applied}))

    async def run(self, clock: Any) -> None:
        while True:
            await asyncio.to_thread(self.sample_once, clock())
            await asyncio.sleep(self.interval_s)

    def latest(self) -> dict[str, float]:
        return {n: pts[-1][1] for n, pts in self.series.items() if pts}


def step_passes(stats: dict[str, Any], p99_limit_ms: float) -> tuple[bool, str]:
    if stats["errors"]:
        return False, f"{stats['errors']} errors {stats['errors_by_status']}"
    over = [f"{k} p99 {v['p99_ms']} ms" for k, v in stats["by_kind"].items() if v["ok"] and v["p99_ms"] > p99_limit_ms]
    if over:
        return False, "over the p99 limit: " + ", ".join(over)
    return True, ""


def caught_up(behind: str, too_long: str | None, drained_after_s: float | None) -> tuple[bool, str]:
    """The keep-up rule of scoring and of the archive consumers: a backlog no longer than its limit
    (``too_long`` says by how much it was over, else None), drained within ``KEEP_UP_S``.
    ``behind``: what was not done when the writes stopped, the start of the reason."""
    if too_long is not None:
        return False, f"{behind} ({too_long})"
    if drained_after_s is None or drained_after_s > KEEP_UP_S:
        return False, f"{behind}, not caught up within {KEEP_UP_S:g} s"
    return True, ""


def keeps_up(backlog: int, drained_after_s: float | None, backlog_s: float | None = None) -> tuple[bool, str]:
    """``backlog_s``: the backlog in seconds of writes (the soak's); None for a max-search step,
    which is shorter than ``MAX_BACKLOG_S`` and so is judged by its drain alone."""
    too_long = None
    if backlog_s is not None and backlog_s > MAX_BACKLOG_S:
        too_long = f"{backlog_s:g} s of writes > {MAX_BACKLOG_S:g} s"
    behind = f"scoring fell behind: {backlog} accepted events not applied when the writes stopped"
    return caught_up(behind, too_long, drained_after_s)


def archive_keeps_up(
    backlog: dict[str, int],
    drained_after_s: float | None,
    backlog_s: dict[str, float] | None = None,
    limit_s: float = MAX_BACKLOG_S,
) -> tuple[bool, str]:
    """As ``keeps_up``, for ingestion's system-of-record consumers (cli/load/state.py ArchiveWatch);
    ``backlog_s`` is each group's backlog in seconds of its topic's writes, held to ``limit_s``."""
    slow = ", ".join(f"{g} {s:g} s" for g, s in (backlog_s or {}).items() if s > limit_s)
    too_long = f"{slow} of writes > {limit_s:g} s" if slow else None
    behind = f"ingestion's archive consumers fell behind: {backlog} records not taken when the writes stopped"
    return caught_up(behind, too_long, drained_after_s)


def fresh_enough(fresh: dict[str, Any]) -> tuple[bool, str]:
    """A step's probes: the same promise the soak is held to (event -> recommendations p95)."""
    if fresh["not_accepted"]:
        return False, f"{fresh['not_accepted']} freshness probes were not accepted"
    if not fresh["met"]:
        p95 = "a timeout" if fresh["p95_ms"] is None else f"{fresh['p95_ms']} ms"
        return False, f"freshness p95 {p95} > {fresh['goal_p95_ms']:g} ms ({fresh['probes_measured']} probes)"
    return True, ""


async def max_search(
    client: Client,
    args: argparse.Namespace,
    watch: PipelineWatch | None,
    new_probe: Callable[[float, float], FreshnessProbe],
    archive: ArchiveWatch | None = None,
) -> dict[str, Any]:
    """``new_probe(interval_s, timeout_s)``: a freshness probe for one step. A rate at which the
    answers are quick but the shoppers' recommendations are seconds stale is not one the stack
    sustains, so every step is probed like the soak and held to the same goal."""
    steps: list[dict[str, Any]] = []
    best: dict[str, Any] | None = None
    stale = 0
    stopped = "all steps run"
    for c in parse_concurrency(args.concurrency):
        warmup_s = min(2.0, args.step_seconds / 2)
        probe = new_probe(args.step_probe_interval, STEP_PROBE_TIMEOUT_S)

        async def probed(p: FreshnessProbe = probe, w: float = warmup_s) -> None:
            await asyncio.sleep(w)  # probes during the measured part only
            await p.run(args.step_seconds)

        if archive is not None:
            await asyncio.to_thread(archive.mark)
        step_started = time.monotonic()
        rec, _ = await asyncio.gather(closed_loop(client, c, args.step_seconds, warmup_s=warmup_s), probed())
        step_s = time.monotonic() - step_started
        st = rec.stats(args.step_seconds)
        fresh = probe.results.summary(probe.timeout_s, args.freshness_p95_ms / 1000)
        st["freshness"] = {k: v for k, v in fresh.items() if k not in ("definition", "series")}
        ok, why = step_passes(st, args.p99_limit_ms)
        if ok:
            ok, why = fresh_enough(fresh)
        if watch is not None:
            # Drained after every step, so each starts level and none inherits the last one's backlog.
            st["scoring_backlog_events"] = backlog = await asyncio.to_thread(watch.backlog)
            st["scoring_drained_after_s"] = drained = await asyncio.to_thread(watch.drain, KEEP_UP_S)
            if ok:
                ok, why = keeps_up(backlog, drained)
        if archive is not None:
            archived, produced = await asyncio.to_thread(archive.since_mark)
            st["archive_backlog_records"] = archived
            st["archive_backlog_seconds_of_writes"] = behind_s = seconds_of_writes(archived, produced, step_s)
            st["archive_drained_after_s"] = adrained = await asyncio.to_thread(archive.drain, KEEP_UP_S)
            if ok:
                ok, why = archive_keeps_up(archived, adrained, behind_s, args.step_archive_backlog_s)
        st.update({"concurrency": c, "qualifies": ok, "why_not": why})
        steps.append(st)
        kinds = " ".join(f"{k} p99 {st['by_kind'][k]['p99_ms']:.0f}ms" for k in KINDS)
        lag = f", scoring backlog {st['scoring_backlog_events']}" if watch is not None else ""
        if archive is not None:
            lag += f", archive backlog {st['archive_backlog_records']} ({st['archive_backlog_seconds_of_writes']} s)"
        p95 = fresh["p95_ms"]
        fr = f", freshness p95 {p95:.0f} ms" if p95 is not None else ", freshness p95 timed out"
        progress(f"max search c={c}: {st['requests_per_s']:.1f} req/s, {kinds}{fr}{lag}, errors {st['errors']} {why}")
        if not ok:
            stopped = f"concurrency {c} did not qualify ({why})"
            break
        if best is None or st["requests_per_s"] >= best["requests_per_s"] * PLATEAU_GAIN:
            stale = 0
        else:
            stale += 1
        if best is None or st["requests_per_s"] > best["requests_per_s"]:
            best = st
        if stale >= PLATEAU_STEPS:
            stopped = f"plateau: {PLATEAU_STEPS} steps without {round((PLATEAU_GAIN - 1) * 100)}% more than the best"
            break
    return {
        "definition": (
            "closed loop, one step per concurrency, each step measured for step_seconds after a warm-up; "
            "max = the highest requests/s (all kinds, OK answers) of a step with zero errors, every kind's "
            f"p99 <= {args.p99_limit_ms} ms, scoring keeping up (every event accepted during the step "
            f"applied within {KEEP_UP_S:g} s of the step's end), ingestion's archive consumers keeping up "
            f"(the event archive, attribution and the impression archive each at most "
            f"{args.step_archive_backlog_s:g} s of the step's writes behind at its end and caught up within "
            f"{KEEP_UP_S:g} s) and "
            f"freshness probes (one every {args.step_probe_interval:g} s during the step) with event -> "
            f"recommendations in Redis p95 <= {args.freshness_p95_ms:g} ms, the soak's goal; the ramp "
            "stops at the first step that fails that, or after "
            f"{PLATEAU_STEPS} steps that add less than {round((PLATEAU_GAIN - 1) * 100)}% over the best"
        ),
        "steps": steps,
        "max_requests_per_s": best["requests_per_s"] if best else None,
        "max_at_concurrency": best["concurrency"] if best else None,
        "stopped_because": stopped,
    }


async def soak(
    client: Client,
    rate: float,
    seconds: float,
    args: argparse.Namespace,
    sampler: RssSampler,
    watch: PipelineWatch | None,
    probe: FreshnessProbe,
) -> Any:
    state = OpenLoopState()
    every = max(5.0, min(30.0, seconds / 10))

    async def report() -> None:
        last_ok, last_t = 0, 0.0
        t0 = time.monotonic()
        while True:
            await asyncio.sleep(every)
            t = time.monotonic() - t0
            ok = state.rec.count()
            rss = " ".join(f"{n} {m:.0f}" for n, m in sampler.latest().items())
            lag = f", scoring backlog {await asyncio.to_thread(watch.backlog)}" if watch is not None else ""
            recent = sorted(probe.results.latencies_s[-30:])
            fresh = f", freshness last {len(recent)} p50 {recent[len(recent) // 2] * 1000:.0f} ms" if recent else ""
            progress(
                f"soak {t / 60:5.2f}/{seconds / 60:.2f} min: offered {rate:.1f}/s, "
                f"ok {(ok - last_ok) / (t - last_t):.1f}/s, in flight {state.inflight}, "
                f"errors {state.rec.error_count()}{lag}{fresh} (timeouts {probe.results.timeouts}); RSS MiB: {rss}"
            )
            last_ok, last_t = ok, t

    reporter = asyncio.create_task(report())
    probing = asyncio.create_task(probe.run(seconds))
    try:
        await open_loop(client, rate, seconds, args.max_inflight, seed=7, state=state)
        await probing  # the last probes are in flight at most probe.timeout_s more
    finally:
        reporter.cancel()
        probing.cancel()
    return state


async def drive(
    stack: Stack, workload: Workload, seed_info: dict[str, Any], args: argparse.Namespace
) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    soak_s = args.minutes * 60
    sampler = RssSampler(stack, interval_s=min(5.0, max(0.5, soak_s / 120)))
    origin = {"t": loop.time()}  # sampler times are relative to this; re-based to the soak start later
    sampling = asyncio.create_task(sampler.run(lambda: loop.time() - origin["t"]))
    client = Client(
        (stack.addr_of("gateway"), stack.client_security("gateway")),
        (stack.addr_of("ingestion"), stack.client_security("ingestion")),
        workload,
        time.time,
    )
    watch = None
    replicas = scoring_metrics_addrs(stack)
    if replicas:
        watch = PipelineWatch(replicas, lambda: client.events_accepted)
        sampler.accepted, sampler.applied = watch.accepted, watch.applied
    ingestion_addr, gateway_addr = stack.metrics_addr_of("ingestion"), stack.metrics_addr_of("gateway")
    archive = (
        ArchiveWatch([ingestion_addr, gateway_addr], [ingestion_addr]) if ingestion_addr and gateway_addr else None
    )
    pipeline: dict[str, Any] = {"keep_up_s": KEEP_UP_S, "max_backlog_s": MAX_BACKLOG_S, "drain_timeout_s": DRAIN_S}
    probes = itertools.count()

    def new_probe(interval_s: float, timeout_s: float) -> FreshnessProbe:
        # Event ids are run id + probe number, so each probe of the run needs its own prefix.
        return FreshnessProbe(
            client,
            stack.redis_url,
            stack.pseudonymizer(),
            workload.users,
            workload.items,
            f"{workload.run_id}-{next(probes)}",
            interval_s=interval_s,
            timeout_s=timeout_s,
        )

    try:
        if watch is not None:
            # The seed purchases first: a backlog left from seeding would be charged to the first step.
            watch.base_applied = seed_info["scoring_applied_before"]
            watch.base_accepted = -seed_info["purchases_accepted"]
            pipeline["seed_drained_after_s"] = await asyncio.to_thread(watch.drain, DRAIN_S)
            watch.mark()
        if archive is not None:
            # Counted since each process started; on a reused stack the first drain may not reach 0.
            pipeline["archive_seed_drained_after_s"] = await asyncio.to_thread(archive.drain, DRAIN_S)
            archive.mark()
        if args.rate:
            search: dict[str, Any] = {"skipped": f"--rate {args.rate} given", "steps": []}
            rate = args.rate
        else:
            progress(f"phase a: max search, concurrency {args.concurrency}, {args.step_seconds} s per step")
            search = await max_search(client, args, watch, new_probe, archive)
            if search["max_requests_per_s"] is None:
                return {"max_search": search, "soak": None, "rss": sampler.series, "sampler": sampler}
            rate = search["max_requests_per_s"] * args.rate_fraction
            progress(f"max {search['max_requests_per_s']} req/s at c={search['max_at_concurrency']}")
        if watch is not None:
            pipeline["search_drained_after_s"] = await asyncio.to_thread(watch.drain, DRAIN_S)
            watch.mark()
        if archive is not None:
            pipeline["archive_search_drained_after_s"] = await asyncio.to_thread(archive.drain, DRAIN_S)
            archive.mark()
        progress(
            f"phase b: open-loop soak at {rate:.1f} req/s for {args.minutes} min, "
            f"a freshness probe every {args.probe_interval:g} s"
        )
        probe = new_probe(args.probe_interval, SOAK_PROBE_TIMEOUT_S)
        soak_start = loop.time() - origin["t"]
        buckets_before = await asyncio.to_thread(event_to_redis_buckets, replicas) if replicas else {}
        state = await soak(client, rate, soak_s, args, sampler, watch, probe)
        buckets_after = await asyncio.to_thread(event_to_redis_buckets, replicas) if replicas else {}
        await asyncio.to_thread(sampler.sample_once, loop.time() - origin["t"])
        if watch is not None:
            pipeline.update(await asyncio.to_thread(soak_pipeline, watch, soak_s, sampler))
        if archive is not None:
            pipeline["archive"] = await asyncio.to_thread(soak_archive, archive, soak_s)
    finally:
        sampling.cancel()
        await client.close()
    window = max(1.0, soak_s / 120)
    series = {n: [(round(t - soak_start, 2), m) for t, m in pts] for n, pts in sampler.series.items()}
    gauges = [(round(t - soak_start, 2), g) for t, g in sampler.gauges]
    return {
        "max_search": search,
        "soak": {
            "target_rate_per_s": round(rate, 2),
            "rate_fraction": None if args.rate else args.rate_fraction,
            "minutes": args.minutes,
            "arrivals": "open loop, Poisson; latency measured from each request's scheduled send time",
            "offered": state.offered,
            "max_inflight_seen": state.max_inflight_seen,
            "max_schedule_lag_ms": round(state.max_schedule_lag_s * 1000, 1),
            "stats": state.rec.stats(soak_s),
            "timeline_window_s": window,
            "timeline": state.rec.timeline(soak_s, window),
            "pipeline": pipeline if watch is not None else {"note": "scoring's metrics were not reachable"},
            "freshness": {
                **probe.results.summary(probe.timeout_s, args.freshness_p95_ms / 1000),
                "scoring_event_to_redis": scoring_side(buckets_before, buckets_after),
            },
        },
        "rss": series,
        "scoring_gauges": gauges,
        "sampler": sampler,
    }


def scoring_side(before: dict[float, float], after: dict[float, float]) -> dict[str, Any]:
    """Every event of the soak as scoring saw it (its histogram's increase over the soak), beside
    the probes: if these are low while the probes are high, the time went before scoring."""
    delta = [(le, after[le] - before.get(le, 0.0)) for le in after]
    count = max((c for _le, c in delta), default=0.0)

    def q(p: float) -> float | None:
        v = histogram_quantile(p, delta)
        return None if v is None else round(v * 1000, 1)

    return {
        "definition": "scoring's stylerec_scoring_event_to_redis_seconds over the soak (Kafka record timestamp -> "
        "the user's top-N rewritten), every event, quantiles interpolated in the histogram's buckets",
        "events": int(count),
        "p50_ms": q(0.50),
        "p95_ms": q(0.95),
        "p99_ms": q(0.99),
    }


def soak_pipeline(watch: PipelineWatch, soak_s: float, sampler: RssSampler) -> dict[str, Any]:
    """Did scoring apply what ingestion accepted during the soak, and how long did the rest take?"""
    backlog = watch.backlog()
    # The backlog at every RSS sample of the soak (the sampler read both counts together).
    during = [
        int((g["accepted"] - watch.base_accepted) - (g["pipeline_applied"] - watch.base_applied))
        for _t, g in sampler.gauges
        if "accepted" in g and g["accepted"] >= watch.base_accepted and g["pipeline_applied"] >= watch.base_applied
    ]
    accepted = watch.accepted() - watch.base_accepted
    per_s = max(1.0, accepted / soak_s)  # the soak's write rate in events/s, for backlogs in seconds of writes
    drained = watch.drain(DRAIN_S)
    backlog_s = round(backlog / per_s, 1)
    ok, why = keeps_up(backlog, drained, backlog_s)
    return {
        "scoring_replicas": len(watch.metrics_addrs),
        "applied_counts": (
            "events applied (stylerec_scoring_events_applied_total, outcome=new)"
            if len(watch.metrics_addrs) == 1
            else "records the replicas' Kafka consumers took (source=kafka, new or duplicate), summed"
        ),
        "events_accepted": accepted,
        "events_applied_by_scoring_at_end": accepted - backlog,
        "backlog_at_end_events": backlog,
        "backlog_at_end_seconds_of_writes": backlog_s,
        "max_backlog_events": max(during, default=None),
        "max_backlog_seconds_of_writes": round(max(during) / per_s, 1) if during else None,
        "drained_after_s": drained,
        "kept_up": ok,
        "why_not": why,
        "base": {"applied": watch.base_applied, "accepted": watch.base_accepted},
    }


def soak_archive(archive: ArchiveWatch, soak_s: float) -> dict[str, Any]:
    """Did ingestion's archive consumers take what was produced during the soak, and how long did the
    rest take? Judged like scoring (backlog in seconds of the topic's writes, then the drain)."""
    backlog, produced = archive.since_mark()
    backlog_s = seconds_of_writes(backlog, produced, soak_s)
    drained = archive.drain(DRAIN_S)
    ok, why = archive_keeps_up(backlog, drained, backlog_s)
    return {
        "groups": archive.groups,
        "records_produced": produced,
        "backlog_at_end_records": backlog,
        "backlog_at_end_seconds_of_writes": backlog_s,
        "drained_after_s": drained,
        "kept_up": ok,
        "why_not": why,
    }


def designed_state(result: dict[str, Any], workload: Workload, soak_s: float) -> dict[str, Any]:
    """Scoring's pairs, ids and kept score sums over the soak, the bytes per entry, and its RSS less
    them (cli/load/state.py)."""
    gauges = result["scoring_gauges"]
    growth = state_growth(gauges, soak_s)
    if not growth["samples"]:
        return {"note": "scoring's state gauges were never read: judged on raw RSS", **growth}
    if soak_s / 60.0 < MIN_SOAK_MINUTES_FOR_VERDICT:
        # The costs only serve the memory verdict, which a soak this short does not get; measuring
        # them starts and fills a scoring state of its own (~30 s on the 2-core box).
        return {"note": "entry costs not measured: the soak is too short for a memory verdict", **growth}
    progress("measuring the bytes per (user, item) pair and per applied id of the scoring state ...")
    fresh = Workload(workload.users, workload.user_weights, workload.items, workload.item_weights, workload.mix, "cost")
    costs = measure_entry_costs(fresh)
    adjusted = adjusted_series(result["rss"].get("scoring", []), gauges, costs)
    designed_mib = (
        (growth["pairs_end"] - growth["pairs_start"]) * costs["bytes_per_pair"]
        + (growth["applied_ids_end"] - growth["applied_ids_start"]) * costs["bytes_per_applied_id"]
        + (growth["user_sums_bytes_end"] - growth["user_sums_bytes_start"])
    ) / MIB
    return {
        **growth,
        **costs,
        "designed_growth_over_soak_mib": round(designed_mib, 1),
        "adjusted_rss_mib": adjusted,
        "adjusted_rss_mib_series": [[t, m] for t, m in adjusted],
    }


def build_report(
    args: argparse.Namespace,
    stack_source: str,
    stack: Stack,
    seed_info: dict[str, Any],
    result: dict[str, Any],
    workload: Workload,
) -> dict[str, Any]:
    sampler: RssSampler = result["sampler"]
    soak_part = result["soak"]
    soak_s = args.minutes * 60
    scoring_state = designed_state(result, workload, soak_s) if soak_part else {}
    memory = memory_verdict(
        result["rss"] if soak_part else {},
        soak_s,
        args.max_slope,
        args.max_growth_pct,
        MIN_SOAK_MINUTES_FOR_VERDICT,
        adjusted={"scoring": scoring_state["adjusted_rss_mib"]} if scoring_state.get("adjusted_rss_mib") else None,
    )
    failures = []
    if result["max_search"].get("max_requests_per_s") is None and not args.rate:
        failures.append(f"no max-search step qualified: {result['max_search']['stopped_because']}")
    if soak_part and soak_part["stats"]["errors"]:
        failures.append(f"soak had {soak_part['stats']['errors']} errors: {soak_part['stats']['errors_by_status']}")
    pipe = soak_part.get("pipeline", {}) if soak_part else {}
    if pipe.get("kept_up") is False:
        failures.append(f"{pipe['why_not']} (soak end; drained after {pipe['drained_after_s']} s)")
    if pipe.get("archive", {}).get("kept_up") is False:
        failures.append(
            f"{pipe['archive']['why_not']} (soak end; drained after {pipe['archive']['drained_after_s']} s)"
        )
    fresh = soak_part.get("freshness") if soak_part else None
    if fresh is not None and not fresh["met"]:
        failures.append(
            f"freshness under load: event -> recommendations in Redis p95 "
            f"{'timed out' if fresh['p95_ms'] is None else str(fresh['p95_ms']) + ' ms'} > {fresh['goal_p95_ms']:g} ms "
            f"({fresh['probes_measured']} measured, {fresh['timeouts']} timeouts)"
        )
    if fresh is not None and fresh["not_accepted"]:
        failures.append(f"{fresh['not_accepted']} freshness probes were not accepted by ingestion")
    if memory["verdict"] == "NOT flat":
        failures.append(f"memory not flat: {memory['reason']}")
    other = sampler.other.summary()
    note = (
        "client (this process), the four services, broker, Redis and the Mongo-protocol server all share these "
        f"CPUs; other processes on the machine used on average {other.get('mean_cores_used_by_other_processes')} "
        f"cores during the run (up to {other.get('max_busy_other_processes')} busy processes at once)"
    )
    return {
        "benchmark": "load: max sustainable throughput (closed-loop ramp) then an open-loop soak",
        "machine": machine_info(note),
        "shared_machine": other,
        "stack": {
            "source": stack_source,
            "components": {n: {"address": c.address, "pid": c.pid} for n, c in stack.components.items()},
        },
        "config": {
            "minutes": args.minutes,
            "rate_fraction": args.rate_fraction,
            "rate": args.rate or None,
            "mix": {
                "read_fraction": args.read_fraction,
                "unknown_user_share_of_reads": args.unknown_fraction,
                "write_batch_events": args.batch_events,
                "reads": "GetRecommendations k=10 want_stylized=true, users drawn by purchase count",
                "writes": "IngestEvents of VIEW/CLICK/ADD_TO_CART/PURCHASE (70/20/7/3) in shopping sessions of seeded "
                f"users (mean {args.session_events} events; clicks, carts and purchases of items the user viewed; "
                f"{args.review_fraction:.0%} of views a second look) over popularity-weighted seeded items, "
                "timestamped now (SYNTHETIC events over REAL users and items when the Online Retail data is present)",
            },
            "concurrency_steps": args.concurrency,
            "step_seconds": args.step_seconds,
            "p99_limit_ms": args.p99_limit_ms,
            "max_inflight": args.max_inflight,
            "probe_interval_s": args.probe_interval,
            "step_probe_interval_s": args.step_probe_interval,
            "scoring_replicas": args.scoring_replicas,
            "freshness_p95_goal_ms": args.freshness_p95_ms,
            "rss_sample_interval_s": sampler.interval_s,
        },
        "seed": seed_info,
        "max_search": result["max_search"],
        "soak": soak_part,
        "rss_mib": {n: [[t, m] for t, m in pts] for n, pts in result["rss"].items()},
        "memory": memory,
        "scoring_state": {k: v for k, v in scoring_state.items() if k != "adjusted_rss_mib"},
        "passed": not failures,
        "failures": failures,
    }


def acquire_stack(mode: str, out: Path) -> tuple[Stack, bool, str]:
    """(stack, started here?, how to describe it in the output)."""
    found = running_stack() if mode in ("auto", "running") else None
    if found is not None:
        return found, False, f"the running `stylerec up` stack in {found.dir} (left running; seeded data stays)"
    if mode == "running":
        raise UsageError("--stack running: no healthy `stylerec up` stack found (run `stylerec up`)")
    stack = Stack.load(out / "stack")
    stack.down()  # leftovers of an interrupted run
    progress(f"starting an own stack in {stack.dir} ...")
    try:
        stack.up()
    except StackError as exc:
        stack.down()
        raise UsageError(f"could not start the stack: {exc}") from exc
    return stack, True, f"own stack started in {stack.dir} (cli/localstack/stack.py Stack, as `stylerec up`)"


def cmd_bench_load(args: argparse.Namespace) -> int:
    validate(args)
    parse_concurrency(args.concurrency)
    out: Path = args.out_dir
    out.mkdir(parents=True, exist_ok=True)
    stack, own, source = acquire_stack(args.stack, out)
    progress(f"using {source}")
    if args.scoring_replicas > 1:
        replicas = [f"scoring-{n}" for n in range(2, args.scoring_replicas + 1)]
        for name in replicas:
            stack.start_service("scoring", name)
        try:
            stack.wait_serving(replicas)
        except StackError as exc:
            stack.down()
            raise UsageError(f"could not start the extra scoring replicas: {exc}") from exc
        source += f", with {args.scoring_replicas} scoring replicas sharing user-events"
    # SIGTERM (a CI timeout, `kill`) unwinds like Ctrl-C, so an own stack is stopped, not orphaned.
    signal.signal(signal.SIGTERM, lambda _sig, _frame: sys.exit(143))
    try:
        mix = Mix(
            read_fraction=args.read_fraction,
            unknown_fraction=args.unknown_fraction,
            batch_events=args.batch_events,
            session_events=args.session_events,
            review_fraction=args.review_fraction,
        )
        workload, seed_info = seed(stack, args.seed_purchases, mix)
        result = asyncio.run(drive(stack, workload, seed_info, args))
        report = build_report(args, source, stack, seed_info, result, workload)
    finally:
        if own:
            progress("stopping the stack ...")
            stack.down()
    (out / "load.json").write_text(json.dumps(report, indent=2))
    title = f"RSS per process group; memory verdict: {report['memory']['verdict']}"
    adjusted = report["scoring_state"].get("adjusted_rss_mib_series")
    extra = {"scoring less designed state": [(t, m) for t, m in adjusted]} if adjusted else {}
    plot_rss({**result["rss"], **extra}, args.minutes * 60, out / "rss.png", title)
    plot_latency(report, out / "latency.png")
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(human(report, out))
    if report["failures"]:
        print("load: FAILED: " + "; ".join(report["failures"]), file=sys.stderr)
        return 1
    return 0


def human(report: dict[str, Any], out: Path) -> str:
    lines = [f"stack: {report['stack']['source']}", f"data: {report['seed']['data']}"]
    ms = report["max_search"]
    if ms.get("steps"):
        lines.append(
            f"max sustainable: {ms['max_requests_per_s']} req/s at c={ms['max_at_concurrency']} "
            f"({ms['stopped_because']})"
        )
    soak_part = report["soak"]
    if soak_part:
        st = soak_part["stats"]
        lines.append(
            f"soak: {soak_part['minutes']} min at {soak_part['target_rate_per_s']} req/s offered, "
            f"{st['requests_per_s']} ok/s, errors {st['errors']} {st['errors_by_status']}"
        )
        for kind, k in st["by_kind"].items():
            lines.append(
                f"  {kind:<13} {k['requests_per_s']:>8} /s  p50 {k['p50_ms']} ms  p95 {k['p95_ms']} ms  "
                f"p99 {k['p99_ms']} ms  errors {k['errors']}  degraded {k['degraded_answers']}"
            )
        pipe = soak_part["pipeline"]
        if "kept_up" in pipe:
            lines.append(
                f"scoring {'kept up' if pipe['kept_up'] else 'FELL BEHIND'}: applied "
                f"{pipe['events_applied_by_scoring_at_end']} of {pipe['events_accepted']} accepted events by the "
                f"soak's end (backlog {pipe['backlog_at_end_events']}, {pipe['backlog_at_end_seconds_of_writes']} s "
                f"of writes); drained after {pipe['drained_after_s']} s"
            )
        arch = pipe.get("archive")
        if arch:
            lines.append(
                f"ingestion's archive consumers {'kept up' if arch['kept_up'] else 'FELL BEHIND'}: records produced "
                f"{arch['records_produced']}, backlog at the soak's end {arch['backlog_at_end_records']} "
                f"(seconds of writes {arch['backlog_at_end_seconds_of_writes']}); drained after "
                f"{arch['drained_after_s']} s"
            )
        fr = soak_part.get("freshness")
        if fr:
            lines.append(
                f"freshness under load (event -> recs in Redis, {fr['probes_measured']} probes, "
                f"{fr['timeouts']} timeouts): p50 {fr['p50_ms']} ms  p95 {fr['p95_ms']} ms  p99 {fr['p99_ms']} ms  "
                f"max {fr['max_ms']} ms  ({'met' if fr['met'] else 'NOT met'}: p95 <= {fr['goal_p95_ms']:g} ms)"
            )
            acc, sc = fr.get("accept") or {}, fr.get("scoring_event_to_redis") or {}
            lines.append(
                f"  of which send -> ingestion's ack p50 {acc.get('p50_ms')} / p95 {acc.get('p95_ms')} ms; "
                f"scoring's own record -> Redis over all {sc.get('events')} events p50 {sc.get('p50_ms')} / "
                f"p95 {sc.get('p95_ms')} ms"
            )
    mem = report["memory"]
    lines.append(f"memory: {mem['verdict']} ({mem['reason']})")
    for name, p in mem["processes"].items():
        lines.append(
            f"  {name:<13} {p['rss_mib_start']:>7} -> {p['rss_mib_end']:>7} MiB, "
            f"slope {p['slope_second_half_mib_per_min']} MiB/min, growth "
            f"{p['growth_first_to_last_quarter_pct']}%{'' if p['judged'] else ' (not judged)'}"
        )
        if "less_designed_state" in p:
            a, ss = p["less_designed_state"], report["scoring_state"]
            sums_mib = (ss.get("user_sums_bytes_end", 0) - ss.get("user_sums_bytes_start", 0)) / MIB
            lines.append(
                f"  {'':<13} less designed state (+{ss['pairs_end'] - ss['pairs_start']} pairs x "
                f"{ss['bytes_per_pair']} B, +{ss['applied_ids_end'] - ss['applied_ids_start']} ids x "
                f"{ss['bytes_per_applied_id']} B, +{sums_mib:.1f} MiB of kept score sums): "
                f"slope {a['slope_second_half_mib_per_min']} MiB/min, "
                f"growth {a['growth_first_to_last_quarter_pct']}% (judged on this)"
            )
    lines.append(f"machine: {report['machine']['note']}")
    lines.append(f"written: {out / 'load.json'}, {out / 'rss.png'}, {out / 'latency.png'}")
    return "\n".join(lines)
