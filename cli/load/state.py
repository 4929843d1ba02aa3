"""Telling the scorer's designed growth from a leak during a load run.

Scoring holds one entry per (user, item) pair it has seen and the ids of recently applied
events (docs/scoring.md): both grow with a soak's writes by design, and a real shop's stream keeps
adding pairs (new visitors, new items). So its RSS is judged after taking out what those two
entries account for: their counts come from the service's own gauges, sampled with its RSS, and
their cost in bytes is measured in this process, in the same run, on the same ``InteractionState``
code fed by the same workload generator. Whatever scoring keeps beyond them (a cache that never
evicts, a per-event list) still counts against it. Both the raw and the adjusted series are
reported.

A third entry is bounded by design and reports its own size: heavy shoppers' kept score sums
(services/scoring/user_sums.py, at most ``STYLEREC_FOLDIN_SUMS_USERS`` of them) fill during a
soak as shoppers pass the history length that earns one. The service's gauge of their array bytes
is taken out too (exact, not estimated; the few hundred bytes of Python objects per entry stay in).
"""

from __future__ import annotations

import gc
import time
import tracemalloc
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from cli.load.driver import Workload
from cli.localstack.stack import metric_sum, scrape_metrics
from services.ingestion.config import IngestionSettings
from services.scoring.interactions import EventRecord, InteractionState

PAIRS = "stylerec_scoring_state_pairs"
IDS = "stylerec_scoring_state_applied_ids"
SUMS = "stylerec_scoring_user_sums_bytes"
APPLIED = "stylerec_scoring_events_applied_total"  # summed over sources, outcome="new" only
MIB = 1024.0 * 1024.0


def scrape_scoring(metrics_addr: str, timeout_s: float = 2.0) -> dict[str, float]:
    """The state-size gauges and the count of events applied (each event is "new" exactly once,
    whether Kafka or the archive sync brought it) from scoring's Prometheus endpoint."""
    samples = scrape_metrics(metrics_addr, timeout_s)
    return {
        PAIRS: metric_sum(samples, PAIRS),
        IDS: metric_sum(samples, IDS),
        SUMS: metric_sum(samples, SUMS),
        APPLIED: metric_sum(samples, APPLIED, outcome="new"),
    }


def pipeline_applied(metrics_addrs: Sequence[str]) -> float:
    """How far scoring has got through what ingestion accepted. One replica: the events it applied
    (each is "new" exactly once, from Kafka or the archive sync). Several replicas: the records
    their Kafka consumers took from user-events (new or duplicate), summed. Each event reaches
    exactly one replica's consumer, the owner of its user, which is the one that writes that
    user's recommendations; every replica also applies the others' events from the archive, so a
    sum of "new" would count each event once per replica."""
    if len(metrics_addrs) == 1:
        return scrape_scoring(metrics_addrs[0])[APPLIED]
    return sum(metric_sum(scrape_metrics(a, 2.0), APPLIED, source="kafka") for a in metrics_addrs)


EVENT_TO_REDIS = "stylerec_scoring_event_to_redis_seconds"


def event_to_redis_buckets(metrics_addrs: Sequence[str]) -> dict[float, float]:
    """Scoring's own view of freshness: cumulative ``le`` -> count of its event-to-Redis histogram
    (Kafka record timestamp -> the user's top-N rewritten), summed over the replicas."""
    out: dict[float, float] = {}
    for addr in metrics_addrs:
        for (name, labels), v in scrape_metrics(addr, 2.0).items():
            if name == f"{EVENT_TO_REDIS}_bucket":
                le = float(dict(labels)["le"])
                out[le] = out.get(le, 0.0) + v
    return out


def measure_entry_costs(workload: Workload, events: int = 200_000, checkpoints: int = 20) -> dict[str, Any]:
    """Bytes per pair and per applied id of a fresh ``InteractionState``, by least squares over
    checkpoints of two phases: the workload's own events (pairs and ids grow together), then the
    same events again under new ids (ids grow alone), which is what separates the two costs.
    ``workload`` is consumed (its generator state advances)."""
    weights = {1: 1.0, 2: 2.0, 3: 4.0, 4: 6.0, 5: 10.0}
    evs: list[tuple[str, str, int]] = []
    while len(evs) < events:
        evs.extend((e.user_id, e.item_id, int(e.type)) for e in workload.write(0.0).events)
    state = InteractionState(weights, half_life_s=30 * 86400.0)
    rows: list[tuple[int, int, int]] = []
    step = max(1, events // checkpoints)
    gc.collect()
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        for phase in ("c", "r"):
            for n, (u, i, t) in enumerate(evs, 1):
                state.apply(EventRecord(f"{phase}{n}", u, i, t, 1.8e9))
                if n % step == 0:
                    rows.append((state.n_pairs, state.n_applied_ids, tracemalloc.get_traced_memory()[0] - base))
    finally:
        tracemalloc.stop()
    a = np.array([[p, i, 1.0] for p, i, _b in rows])
    b = np.array([float(x) for _p, _i, x in rows])
    (per_pair, per_id, _c), *_ = np.linalg.lstsq(a, b, rcond=None)
    return {
        "bytes_per_pair": round(float(per_pair), 1),
        "bytes_per_applied_id": round(float(per_id), 1),
        "measured_with": (
            f"tracemalloc over a fresh InteractionState in the load process: {events} workload events, then "
            f"the same {len(evs)} again under new ids; least squares over {len(rows)} checkpoints"
        ),
        "pairs_measured": rows[-1][0],
    }


def _complete(gauges: list[tuple[float, dict[str, float]]]) -> list[tuple[float, dict[str, float]]]:
    return [(t, g) for t, g in gauges if PAIRS in g and IDS in g]


def adjusted_series(
    rss: list[tuple[float, float]], gauges: list[tuple[float, dict[str, float]]], costs: dict[str, Any]
) -> list[tuple[float, float]]:
    """RSS (MiB) minus the MiB the state's pairs and ids and the kept score sums added since the
    first gauge sample.

    Each RSS sample is paired with the gauge sample nearest in time; RSS samples before the
    first complete gauge sample are dropped."""
    full = _complete(gauges)
    if not full:
        return []
    t_g = np.array([t for t, _g in full])
    p0, i0, s0 = full[0][1][PAIRS], full[0][1][IDS], full[0][1].get(SUMS, 0.0)
    out = []
    for t, mib in rss:
        if t < t_g[0]:
            continue
        g = full[int(np.abs(t_g - t).argmin())][1]
        designed = (g[PAIRS] - p0) * costs["bytes_per_pair"] + (g[IDS] - i0) * costs["bytes_per_applied_id"]
        designed += g.get(SUMS, 0.0) - s0
        out.append((t, round(mib - designed / MIB, 2)))
    return out


def state_growth(gauges: list[tuple[float, dict[str, float]]], soak_s: float) -> dict[str, Any]:
    """Pairs and ids at the soak's start and end (gauge samples nearest 0 and ``soak_s``)."""
    full = _complete(gauges)
    if not full:
        return {"samples": 0}
    start = min(full, key=lambda x: abs(x[0]))[1]
    end = min(full, key=lambda x: abs(x[0] - soak_s))[1]
    return {
        "samples": len(full),
        "pairs_start": int(start[PAIRS]),
        "pairs_end": int(end[PAIRS]),
        "applied_ids_start": int(start[IDS]),
        "applied_ids_end": int(end[IDS]),
        "user_sums_bytes_start": int(start.get(SUMS, 0.0)),
        "user_sums_bytes_end": int(end.get(SUMS, 0.0)),
    }


class PipelineWatch:
    """Whether scoring keeps up with the writes: events ingestion accepted (counted by the load
    client from its answers) against events scoring applied (its own counter), both since
    ``mark()``. Answers alone cannot show this: ingestion acknowledges once Kafka has an event,
    and a scorer that falls behind keeps every RPC green while recommendations go stale."""

    def __init__(self, metrics_addrs: Sequence[str], accepted: Callable[[], int]) -> None:
        self.metrics_addrs = list(metrics_addrs)  # one per scoring replica
        self.accepted = accepted
        self.base_applied = 0.0
        self.base_accepted = 0

    def applied(self) -> float:
        return pipeline_applied(self.metrics_addrs)

    def mark(self) -> None:
        self.base_applied, self.base_accepted = self.applied(), self.accepted()

    def backlog(self) -> int:
        """Events accepted since ``mark()`` that scoring has not applied yet."""
        return int((self.accepted() - self.base_accepted) - (self.applied() - self.base_applied))

    def drain(self, timeout_s: float, poll_s: float = 0.5) -> float | None:
        """Seconds until the backlog reached 0; None when it did not within ``timeout_s``."""
        t0 = time.monotonic()
        while True:
            if self.backlog() <= 0:
                return round(time.monotonic() - t0, 2)
            if time.monotonic() - t0 > timeout_s:
                return None
            time.sleep(poll_s)


PRODUCED = "stylerec_kafka_messages_produced_total"
CONSUMED = "stylerec_kafka_messages_consumed_total"
TAKEN = ("ok", "dead_letter", "skipped")  # a record taken for good ("error" ones are taken again)


def archive_groups() -> dict[str, str]:
    """Ingestion's system-of-record consumer groups and the topic each reads (their defaults)."""
    f = IngestionSettings.model_fields
    events, impressions = f["events_topic"].default, f["impressions_topic"].default
    return {
        f["archiver_group"].default: events,
        f["attribution_group"].default: events,
        f["impressions_group"].default: impressions,
    }


class ArchiveWatch:
    """Whether ingestion's system-of-record consumers (the event archive, attribution, the impression
    archive) keep up: records produced to each topic (the producers' own counters: ingestion's for
    user-events, the gateway's for impressions) against the records each group took, since
    ``mark()``. They share the machine with everything else, and a rate at which scoring keeps up
    while the archive falls minutes behind is not one the stack sustains: in a 6-minute soak at
    613 requests/s the event archiver ended 400,000 events behind and attribution 460,000 while
    every answer stayed green and scoring kept up (docs/load.md)."""

    def __init__(self, producer_addrs: Sequence[str], consumer_addrs: Sequence[str]) -> None:
        self.producer_addrs = list(producer_addrs)
        self.consumer_addrs = list(consumer_addrs)
        self.groups = archive_groups()
        zero = dict.fromkeys(self.groups, 0.0)
        self._base: tuple[dict[str, float], dict[str, float]] = (zero, zero)

    def _counts(self) -> tuple[dict[str, float], dict[str, float]]:
        """(records produced to each group's topic, records each group took), one scrape per endpoint."""
        scraped = {a: scrape_metrics(a, 2.0) for a in {*self.producer_addrs, *self.consumer_addrs}}
        topics = {
            t: sum(metric_sum(scraped[a], PRODUCED, topic=t, outcome="ok") for a in self.producer_addrs)
            for t in set(self.groups.values())
        }
        taken = {
            g: sum(metric_sum(scraped[a], CONSUMED, group=g, outcome=o) for a in self.consumer_addrs for o in TAKEN)
            for g in self.groups
        }
        return {g: topics[t] for g, t in self.groups.items()}, taken

    def mark(self) -> None:
        self._base = self._counts()

    def since_mark(self) -> tuple[dict[str, int], dict[str, int]]:
        """(records produced since ``mark()`` that each group has not taken yet, records produced to
        its topic since then), from one reading."""
        (produced, taken), (produced0, taken0) = self._counts(), self._base
        new = {g: int(produced[g] - produced0[g]) for g in self.groups}
        return {g: int(new[g] - (taken[g] - taken0[g])) for g in self.groups}, new

    def drain(self, timeout_s: float, poll_s: float = 0.5) -> float | None:
        """Seconds until every group's backlog reached 0; None when one did not within ``timeout_s``."""
        t0 = time.monotonic()
        while True:
            if max(self.since_mark()[0].values(), default=0) <= 0:
                return round(time.monotonic() - t0, 2)
            if time.monotonic() - t0 > timeout_s:
                return None
            time.sleep(poll_s)


def seconds_of_writes(backlog: dict[str, int], produced: dict[str, int], seconds: float) -> dict[str, float]:
    """Each backlog in seconds of its topic's writes over ``seconds`` (those writes: ``produced``)."""
    return {g: round(n * seconds / max(1, produced[g]), 1) for g, n in backlog.items()}
