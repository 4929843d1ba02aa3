"""`stylerec bench ingest [--quick] --json`: ingestion throughput against a bare producer.

It starts its own broker, Redis and Mongo-protocol server and one ingestion
process (role ``api``, so the archiver does not compete for the CPU), then,
against that same broker and in one run:

* the service: unary ``IngestEvents`` with batches of 1, 100 and 1000 events
  (one call at a time, each answered only after acks=all) and ``StreamEvents``
  with 1000-event chunks and at most 4 unacknowledged chunks (client flow control);
* the baseline: a bare kafka-python ``KafkaProducer`` with the service's own
  producer settings sending the *same pre-serialized messages* (pseudonymized
  exactly like the service does), once per batch size with the same "wait for
  every ack before the next batch" rule, and once fully pipelined (send all,
  flush) for the stream.

Ratios are service/baseline events/s. The events are synthetic (generated ids)
and labelled so in the JSON. No timing is asserted anywhere: this is a command.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from stylerec.v1 import common_pb2, ingestion_pb2, ingestion_pb2_grpc
from tqdm import tqdm

from cli.errors import UsageError
from cli.localstack.stack import REPO, Stack
from libs.common.kafka import ensure_topics
from libs.common.pseudonym import Pseudonymizer
from libs.common.settings import DEV_PSEUDONYM_SECRET

TOPIC = "bench-user-events"
STREAM_CHUNK = 1000
STREAM_WINDOW = 4
FULL = {"batch_1": 2_000, "batch_100": 30_000, "batch_1000": 60_000, "stream": 60_000}
QUICK = {"batch_1": 300, "batch_100": 5_000, "batch_1000": 10_000, "stream": 10_000}


def register_bench(bsub: Any) -> None:
    p = bsub.add_parser("ingest", help="ingestion events/s and ack latency vs a bare kafka-python producer")
    p.add_argument("--quick", action="store_true", help="fewer events, one round (about 30 s)")
    p.add_argument("--rounds", type=int, help="interleaved baseline/service rounds (default 3, --quick 1)")
    p.add_argument("--json", action="store_true", help="print the result JSON on stdout")
    p.add_argument("--out", type=Path, default=REPO / "out" / "bench" / "ingest.json")
    p.set_defaults(func=cmd_bench_ingest)


def synthetic_events(n: int, tag: str) -> list[common_pb2.Event]:
    """Synthetic shop events: 500 users, 2000 items, unique ids so nothing is deduplicated."""
    now = time.time()
    types = [common_pb2.VIEW, common_pb2.VIEW, common_pb2.VIEW, common_pb2.CLICK, common_pb2.ADD_TO_CART]
    out = []
    for i in range(n):
        e = common_pb2.Event(
            event_id=f"bench-{tag}-{i}",
            user_id=f"shopper-{i % 500}",
            item_id=f"sku-{(i * 7919) % 2000}",
            type=types[i % len(types)],
        )
        e.timestamp.FromNanoseconds(int((now - (n - i) * 0.001) * 1e9))
        e.context.device = "web"
        out.append(e)
    return out


def published_form(events: list[common_pb2.Event], pseudonymize: Pseudonymizer) -> list[tuple[bytes, bytes]]:
    """The exact (key, value) records the service publishes for ``events``."""
    records = []
    for e in events:
        out = common_pb2.Event()
        out.CopyFrom(e)
        out.user_id = pseudonymize(e.user_id)
        records.append((out.user_id.encode(), out.SerializeToString()))
    return records


def percentiles(samples: list[float]) -> dict[str, float]:
    if not samples:
        return {"p50_ms": 0.0, "p99_ms": 0.0}
    s = sorted(samples)
    return {
        "p50_ms": round(statistics.median(s) * 1000, 3),
        "p99_ms": round(s[min(len(s) - 1, int(len(s) * 0.99))] * 1000, 3),
    }


def _result(n: int, elapsed: float, latencies: list[float]) -> dict[str, Any]:
    return {"events": n, "seconds": elapsed, "events_per_s": n / elapsed, "latencies": latencies}


def summarize(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Median events/s over the rounds; latency percentiles over every call of every round."""
    latencies = [x for r in rounds for x in r["latencies"]]
    out: dict[str, Any] = {
        "events_per_round": rounds[0]["events"],
        "rounds": len(rounds),
        "events_per_s": round(statistics.median(r["events_per_s"] for r in rounds), 1),
        "events_per_s_rounds": [round(r["events_per_s"], 1) for r in rounds],
        **percentiles(latencies),
    }
    if "accepted" in rounds[0]:
        out["accepted"] = sum(r["accepted"] for r in rounds)
    return out


def bench_baseline_batches(producer: Any, records: list[tuple[bytes, bytes]], batch: int) -> dict[str, Any]:
    latencies = []
    start = time.perf_counter()
    for i in range(0, len(records), batch):
        t0 = time.perf_counter()
        futures = [producer.send(TOPIC, key=k, value=v) for k, v in records[i : i + batch]]
        for f in futures:
            f.get(timeout=30)
        latencies.append(time.perf_counter() - t0)
    return _result(len(records), time.perf_counter() - start, latencies)


def bench_baseline_pipelined(producer: Any, records: list[tuple[bytes, bytes]]) -> dict[str, Any]:
    start = time.perf_counter()
    futures = [producer.send(TOPIC, key=k, value=v) for k, v in records]
    producer.flush(timeout=60)
    for f in futures:
        f.get(timeout=1)
    return _result(len(records), time.perf_counter() - start, [])


def bench_unary(stub: Any, events: list[common_pb2.Event], batch: int) -> dict[str, Any]:
    latencies = []
    requests = [ingestion_pb2.IngestEventsRequest(events=events[i : i + batch]) for i in range(0, len(events), batch)]
    start = time.perf_counter()
    accepted = 0
    for req in requests:
        t0 = time.perf_counter()
        resp = stub.IngestEvents(req, timeout=60)
        latencies.append(time.perf_counter() - t0)
        accepted += resp.accepted
    res = _result(len(events), time.perf_counter() - start, latencies)
    res["accepted"] = accepted
    return res


def bench_stream(stub: Any, events: list[common_pb2.Event]) -> dict[str, Any]:
    chunks = [events[i : i + STREAM_CHUNK] for i in range(0, len(events), STREAM_CHUNK)]
    window = threading.Semaphore(STREAM_WINDOW)
    sent_at: dict[int, float] = {}

    def requests() -> Iterator[ingestion_pb2.IngestEventsRequest]:
        for seq, chunk in enumerate(chunks, 1):
            window.acquire()  # client-side flow control: at most STREAM_WINDOW chunks unacknowledged
            sent_at[seq] = time.perf_counter()
            yield ingestion_pb2.IngestEventsRequest(events=chunk, sequence=seq)

    latencies = []
    accepted = 0
    start = time.perf_counter()
    for ack in stub.StreamEvents(requests(), timeout=300):
        latencies.append(time.perf_counter() - sent_at[ack.sequence])
        accepted += ack.accepted
        window.release()
    res = _result(len(events), time.perf_counter() - start, latencies)
    res["accepted"] = accepted
    return res


def peak_rss_of(pid: int) -> float:
    """VmHWM of the service process: in-flight data is bounded, so this must not grow with the load."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return 0.0


def cmd_bench_ingest(args: argparse.Namespace) -> int:
    from kafka import KafkaProducer

    from services.ingestion.config import IngestionSettings
    from services.ingestion.publisher import producer_config

    sizes = QUICK if args.quick else FULL
    if args.rounds is None:
        args.rounds = 1 if args.quick else 3
    if args.rounds < 1:
        raise UsageError("--rounds must be at least 1")
    run_id = uuid.uuid4().hex[:8]
    # A fresh clone has no out/ yet: mkdtemp does not make parents.
    (REPO / "out").mkdir(exist_ok=True)
    stack_dir = Path(tempfile.mkdtemp(prefix="bench-ingest-", dir=REPO / "out"))
    stack = Stack(dir=stack_dir)
    pseudonymize = Pseudonymizer(DEV_PSEUDONYM_SECRET)
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {"service": {}, "baseline": {}}
    peak_rss_mb = 0.0
    try:
        print("starting broker, redis, mongo and ingestion ...", flush=True)
        stack.start_infra()
        ensure_topics([stack.kafka_bootstrap], {TOPIC: 6})
        env = {
            "STYLEREC_ROLE": "api",
            "STYLEREC_EVENTS_TOPIC": TOPIC,
            "STYLEREC_LOG_LEVEL": "WARNING",
            "STYLEREC_PSEUDONYM_SECRET": DEV_PSEUDONYM_SECRET,
            # The per-caller rate limit would cap what is measured here: the bench is one caller.
            "STYLEREC_INGEST_RATE_LIMIT_EPS": "0",
        }
        stack.start_service("ingestion", instance="ingestion-bench", extra_env=env)
        stack.wait_serving(["ingestion-bench"], 60)
        # The baseline producer lingers as the service does on this stack (EMBEDDED_BROKER_ENV).
        linger = int(stack.service_env("ingestion", 0, 0)["STYLEREC_KAFKA_LINGER_MS"])
        settings = IngestionSettings(kafka_bootstrap=stack.kafka_bootstrap, kafka_linger_ms=linger)
        producer = KafkaProducer(**producer_config(settings, client_id="bench-baseline"))
        channel = stack.channel("ingestion-bench", options=[("grpc.max_send_message_length", 64 * 1024 * 1024)])
        stub = ingestion_pb2_grpc.IngestionServiceStub(channel)
        # Warm-up: metadata, connections, code paths.
        bench_unary(stub, synthetic_events(2000, f"{run_id}-warm"), 1000)
        bench_baseline_batches(producer, published_form(synthetic_events(2000, f"{run_id}-warmb"), pseudonymize), 1000)

        # Rounds interleave baseline and service so background load on the box hits both alike.
        for rnd in range(args.rounds):
            plan: list[tuple[str, str, Callable[[], dict[str, Any]]]] = []
            for name, batch in (("batch_1", 1), ("batch_100", 100), ("batch_1000", 1000)):
                ev = synthetic_events(sizes[name], f"{run_id}-{rnd}-{name}")
                recs = published_form(ev, pseudonymize)
                plan.append(("baseline", name, lambda r=recs, b=batch: bench_baseline_batches(producer, r, b)))  # type: ignore[misc]
                plan.append(("service", name, lambda e=ev, b=batch: bench_unary(stub, e, b)))  # type: ignore[misc]
            sev = synthetic_events(sizes["stream"], f"{run_id}-{rnd}-stream")
            srecs = published_form(sev, pseudonymize)
            plan.append(("baseline", "pipelined", lambda r=srecs: bench_baseline_pipelined(producer, r)))  # type: ignore[misc]
            plan.append(("service", "stream", lambda e=sev: bench_stream(stub, e)))  # type: ignore[misc]
            for side, name, fn in tqdm(plan, desc=f"bench ingest round {rnd + 1}/{args.rounds}", unit="run"):
                runs[side].setdefault(name, []).append(fn())
        producer.close(timeout=5)
        channel.close()
        peak_rss_mb = peak_rss_of(stack.components["ingestion-bench"].pid)
    finally:
        stack.down()
        shutil.rmtree(stack_dir, ignore_errors=True)
    svc = {name: summarize(r) for name, r in runs["service"].items()}
    base = {name: summarize(r) for name, r in runs["baseline"].items()}
    pairs = {
        "batch_1": ("batch_1", "batch_1"),
        "batch_100": ("batch_100", "batch_100"),
        "batch_1000": ("batch_1000", "batch_1000"),
        "stream_vs_pipelined": ("stream", "pipelined"),
        "stream_vs_batch_1000": ("stream", "batch_1000"),
    }
    ratios = {
        key: round(
            statistics.median(
                s["events_per_s"] / b["events_per_s"]
                for s, b in zip(runs["service"][sv], runs["baseline"][bl], strict=True)
            ),
            3,
        )
        for key, (sv, bl) in pairs.items()
    }
    report = {
        "benchmark": "ingest",
        "data": "synthetic events (generated ids, 500 users, 2000 items)",
        "quick": bool(args.quick),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()},
        "broker": "tansu (embedded, memory storage), same broker for service and baseline",
        "notes": (
            "service = one client, calls in sequence, each answered after acks=all; baseline = bare kafka-python "
            "KafkaProducer with the service's producer settings sending the same pre-serialized records; "
            "batch_N baseline waits for every ack of a batch before the next; pipelined = send all then flush; "
            "events_per_s = median over rounds; ratio = median of per-round service/baseline; "
            "p50/p99 = per call (unary) or per chunk from send to ack (stream), all rounds"
        ),
        "service": svc,
        "baseline": base,
        "ratio_service_over_baseline": ratios,
        "service_peak_rss_mb": peak_rss_mb,
        "goal": {"batch_1000": 0.8, "stream": 0.8},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        for name in ("batch_1", "batch_100", "batch_1000"):
            print(
                f"{name:>10}: service {svc[name]['events_per_s']:>9.0f} ev/s  baseline "
                f"{base[name]['events_per_s']:>9.0f} ev/s  ratio {ratios[name]:.2f}  "
                f"p50 {svc[name]['p50_ms']} ms p99 {svc[name]['p99_ms']} ms"
            )
        print(
            f"    stream: service {svc['stream']['events_per_s']:>9.0f} ev/s  pipelined baseline "
            f"{base['pipelined']['events_per_s']:>9.0f} ev/s  ratio {ratios['stream_vs_pipelined']:.2f}"
        )
        print(f"service peak RSS {peak_rss_mb} MiB; wrote {args.out}")
    return 0
