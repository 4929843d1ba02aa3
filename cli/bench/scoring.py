"""`stylerec bench scoring [--quick] --json`: training time, TopN latency, event-to-Redis freshness.

In one run, on this machine:

* **training**: every algorithm (default parameters) fit on the whole of ML-100K and of
  Online Retail (real data, read by path; synthetic fallback labelled as such), with the
  ratio to item-kNN (the classic baseline) measured in the same run;
* **TopN latency**: a scoring replica of a private embedded stack answers TopN for known
  users; the baseline is grpc.health.v1 Check on the *same server* (same bootstrap,
  interceptors and thread pool, no work), so the ratio isolates the fold-in cost;
* **freshness**: an event sent through the ingestion gRPC API → Kafka → the scoring
  consumer → that user's top-N rewritten in Redis (recs_meta.updated_at changes), p50/p95;
  the baseline is a bare Kafka produce → consume hop on the same broker.

The events in the stack part are synthetic (generated users/items) and labelled so.
Nothing here is asserted: this is a command, not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import redis
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from pymongo import MongoClient
from stylerec.v1 import common_pb2, ingestion_pb2, ingestion_pb2_grpc, scoring_pb2, scoring_pb2_grpc
from tqdm import tqdm

from cli.bench.scoring_apply import bench_apply
from cli.bench.scoring_env import scoring_bench_env
from cli.errors import UsageError
from cli.localstack.stack import REPO, Stack, StackError, metric_sum
from libs.common import keys
from libs.common.kafka import ensure_topics
from libs.common.pseudonym import Pseudonymizer
from libs.common.settings import DEV_PSEUDONYM_SECRET

FULL = {"history_events": 6000, "users": 400, "items": 300, "topn_calls": 1000, "probes": 60, "apply_events": 200_000}
QUICK = {"history_events": 2000, "users": 150, "items": 120, "topn_calls": 200, "probes": 20, "apply_events": 30_000}


def register_bench(bsub: Any) -> None:
    p = bsub.add_parser("scoring", help="scoring training time, TopN latency and event-to-Redis freshness")
    p.add_argument("--quick", action="store_true", help="smaller run (about a minute)")
    p.add_argument("--skip-training", action="store_true", help="only the live-stack part")
    p.add_argument("--skip-apply", action="store_true", help="leave out the apply-throughput part")
    p.add_argument(
        "--apply-events",
        type=int,
        help=f"events pre-filled for the apply-throughput part (default {FULL['apply_events']:,}, --quick "
        f"{QUICK['apply_events']:,})",
    )
    p.add_argument("--json", action="store_true", help="print the result JSON on stdout")
    p.add_argument("--out", type=Path, default=REPO / "out" / "bench" / "scoring.json")
    p.set_defaults(func=cmd_bench_scoring)


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


def summary_ms(values_s: list[float]) -> dict[str, float]:
    ms = [v * 1000 for v in values_s]
    return {
        "n": len(ms),
        "p50_ms": round(pct(ms, 50), 3),
        "p95_ms": round(pct(ms, 95), 3),
        "mean_ms": round(statistics.fmean(ms), 3) if ms else float("nan"),
    }


# ---------------------------------------------------------------- training
def bench_training(progress: tqdm) -> dict[str, Any]:
    from services.scoring.evaluation import datasets, harness
    from services.scoring.models import ALGORITHMS, make_model

    out: dict[str, Any] = {}
    loaders = {
        "ml-100k": lambda: datasets.ml100k() if datasets.ml100k_path() else datasets.synthetic(),
        "online-retail": lambda: (
            datasets.online_retail() if datasets.ONLINE_RETAIL_DEFAULT.exists() else datasets.synthetic()
        ),
    }
    for name, load in loaders.items():
        data = load()
        X = harness.interaction_matrix(data, np.ones(len(data), dtype=bool))
        rows: dict[str, Any] = {}
        for algo in ALGORITHMS:
            model = make_model(algo)
            t0 = time.perf_counter()
            model.fit(X)
            rows[algo] = {"train_seconds": round(time.perf_counter() - t0, 4), "params": model.params}
            progress.set_postfix_str(f"{name} {algo}")
        base = rows["itemknn"]["train_seconds"]
        for r in rows.values():
            r["ratio_vs_itemknn"] = round(r["train_seconds"] / base, 3) if base > 0 else None
        out[name] = {
            "dataset": data.summary(),
            "matrix": {"users": X.shape[0], "items": X.shape[1], "nnz": X.nnz},
            "algorithms": rows,
        }
        progress.update(1)
    return out


# ---------------------------------------------------------------- live stack
def synthetic_history(n_events: int, users: int, items: int, rng: np.random.Generator) -> list[common_pb2.Event]:
    """Clustered synthetic shop history over the last few days (labelled synthetic)."""
    now = time.time()
    clusters = 6
    item_cluster = rng.integers(0, clusters, items)
    user_cluster = rng.integers(0, clusters, users)
    types = [common_pb2.VIEW, common_pb2.VIEW, common_pb2.CLICK, common_pb2.ADD_TO_CART, common_pb2.PURCHASE]
    out = []
    for n in range(n_events):
        u = int(rng.integers(0, users))
        same = np.flatnonzero(item_cluster == user_cluster[u])
        i = int(rng.choice(same)) if same.size and rng.random() < 0.8 else int(rng.integers(0, items))
        e = common_pb2.Event(
            event_id=f"bench-hist-{n}-{uuid.uuid4().hex[:6]}",
            user_id=f"bench-user-{u}",
            item_id=f"bench-item-{i}",
            type=types[n % len(types)],
        )
        e.timestamp.FromSeconds(int(now - 3 * 86400 + n * (3 * 86400 / n_events)))
        out.append(e)
    return out


def wait_until(check: Any, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.2)
    raise StackError(f"timed out waiting for {what}")


def scrape_histogram(stack: Stack, name: str) -> tuple[float, float]:
    """(sum, count) of a histogram on the scoring replica's /metrics endpoint."""
    samples = stack.scrape("scoring")
    return metric_sum(samples, f"{name}_sum"), metric_sum(samples, f"{name}_count")


def bench_kafka_hop(bootstrap: str, n: int) -> list[float]:
    """Baseline: produce one record (acks=all) → a bare consumer receives it."""
    topic = f"bench-scoring-hop-{uuid.uuid4().hex[:6]}"
    ensure_topics([bootstrap], {topic: 1})
    producer = KafkaProducer(bootstrap_servers=[bootstrap], acks="all", linger_ms=0)
    consumer = KafkaConsumer(bootstrap_servers=[bootstrap], group_id=None, enable_auto_commit=False)
    tp = TopicPartition(topic, 0)
    consumer.assign([tp])
    consumer.seek_to_end(tp)
    consumer.poll(timeout_ms=200)
    out = []
    try:
        for i in range(n):
            t0 = time.perf_counter()
            producer.send(topic, key=b"k", value=str(i).encode()).get(timeout=10)
            got = False
            while not got and time.perf_counter() - t0 < 10:
                for recs in consumer.poll(timeout_ms=100).values():
                    got = got or any(r.value == str(i).encode() for r in recs)
            out.append(time.perf_counter() - t0)
    finally:
        producer.close()
        consumer.close()
    return out


def bench_stack(sizes: dict[str, int], progress: tqdm) -> dict[str, Any]:
    rng = np.random.default_rng(42)
    pseudo = Pseudonymizer(DEV_PSEUDONYM_SECRET)
    with tempfile.TemporaryDirectory(prefix="stylerec-bench-scoring-") as tmp:
        stack = Stack(dir=Path(tmp))
        stack.env_overrides = scoring_bench_env(train_on_start=False, max_poll_interval_ms=10000)
        try:
            stack.start_infra()
            stack.start_service("ingestion")
            stack.start_service("scoring")
            stack.wait_serving(["ingestion", "scoring"], timeout_s=120)
            progress.update(1)
            history = synthetic_history(sizes["history_events"], sizes["users"], sizes["items"], rng)
            ing = ingestion_pb2_grpc.IngestionServiceStub(stack.channel("ingestion"))
            for start in range(0, len(history), 1000):
                ing.IngestEvents(ingestion_pb2.IngestEventsRequest(events=history[start : start + 1000]), timeout=60)
            mongo: MongoClient = MongoClient(stack.mongo_uri)
            events = mongo["stylerec"]["events"]
            wait_until(lambda: events.count_documents({}) >= len(history), 180, "the archiver")
            mongo.close()
            scoring = scoring_pb2_grpc.ScoringServiceStub(stack.channel("scoring"))
            t0 = time.perf_counter()
            trained = scoring.Train(scoring_pb2.TrainRequest(algorithm="ease", wait=True), timeout=300)
            train_rpc_s = time.perf_counter() - t0
            progress.update(1)
            users = sorted({e.user_id for e in history})
            r = redis.Redis(port=stack.components["redis"].port)
            wait_until(lambda: r.exists(keys.recs(pseudo(users[0]))), 60, "recs of a known user")

            # TopN latency vs health Check on the same server.
            health = health_pb2_grpc.HealthStub(stack.channel("scoring"))
            topn_s, base_s = [], []
            sources: dict[str, int] = {}
            for n in range(sizes["topn_calls"]):
                u = pseudo(users[n % len(users)])
                t = time.perf_counter()
                resp = scoring.TopN(scoring_pb2.TopNRequest(user_id=u, k=20, exclude_seen=True), timeout=10)
                topn_s.append(time.perf_counter() - t)
                sources[resp.source] = sources.get(resp.source, 0) + 1
                t = time.perf_counter()
                health.Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
                base_s.append(time.perf_counter() - t)
            progress.update(1)

            # Freshness: ingestion → Kafka → scoring → Redis.
            fresh_s: list[float] = []
            ingest_call_s: list[float] = []
            hist_before = scrape_histogram(stack, "stylerec_scoring_event_to_redis_seconds")
            changed = 0
            for n in range(sizes["probes"]):
                raw = users[(n * 37) % len(users)]
                u = pseudo(raw)
                before = r.hget(keys.recs_meta(u), "updated_at")
                recs_before = r.hgetall(keys.recs(u))
                ev = common_pb2.Event(
                    event_id=f"bench-probe-{n}-{uuid.uuid4().hex[:6]}",
                    user_id=raw,
                    item_id=f"bench-item-{int(rng.integers(0, sizes['items']))}",
                    type=common_pb2.PURCHASE,
                )
                ev.timestamp.GetCurrentTime()
                t = time.perf_counter()
                ing.IngestEvents(ingestion_pb2.IngestEventsRequest(events=[ev]), timeout=10)
                ingest_call_s.append(time.perf_counter() - t)
                while time.perf_counter() - t < 15:
                    if r.hget(keys.recs_meta(u), "updated_at") != before:
                        fresh_s.append(time.perf_counter() - t)
                        changed += int(r.hgetall(keys.recs(u)) != recs_before)
                        break
                    time.sleep(0.002)
                time.sleep(0.05)
            hist_after = scrape_histogram(stack, "stylerec_scoring_event_to_redis_seconds")
            hop_s = bench_kafka_hop(stack.kafka_bootstrap, sizes["probes"])
            progress.update(1)
            topn = summary_ms(topn_s)
            base = summary_ms(base_s)
            fresh = summary_ms(fresh_s)
            hop = summary_ms(hop_s)
            return {
                "data": f"SYNTHETIC: {len(history)} events, {len(users)} users, {sizes['items']} items",
                "train_rpc": {
                    "algorithm": "ease",
                    "model_version": trained.model_version,
                    "seconds_incl_archive_read_and_publish": round(train_rpc_s, 3),
                    "metrics": dict(trained.metrics),
                },
                "topn_latency": {
                    "service": topn,
                    "baseline_health_check_same_server": base,
                    "ratio_p50": round(topn["p50_ms"] / base["p50_ms"], 2) if base["p50_ms"] else None,
                    "sources": sources,
                },
                "freshness_event_to_redis": {
                    "service": fresh,
                    "probes_timed_out": sizes["probes"] - len(fresh_s),
                    "recs_content_changed": changed,
                    "baseline_bare_kafka_hop": hop,
                    "breakdown": {
                        "ingest_rpc_incl_kafka_ack": summary_ms(ingest_call_s),
                        "scoring_record_timestamp_to_redis_mean_ms": round(
                            1000 * (hist_after[0] - hist_before[0]) / max(1.0, hist_after[1] - hist_before[1]), 3
                        ),
                    },
                    "ratio_p50": round(fresh["p50_ms"] / hop["p50_ms"], 2) if hop["p50_ms"] else None,
                    "target_p95_ms": 1000,
                },
            }
        finally:
            stack.down()


def cmd_bench_scoring(args: argparse.Namespace) -> int:
    sizes = QUICK if args.quick else FULL
    result: dict[str, Any] = {
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "torch_device": "cuda" if torch.cuda.is_available() else "cpu",
        },
        "quick": bool(args.quick),
    }
    apply_events = args.apply_events if args.apply_events is not None else sizes["apply_events"]
    if apply_events < 1000 and not args.skip_apply:
        raise UsageError(f"--apply-events must be at least 1000, got {apply_events}")
    steps = (0 if args.skip_training else 2) + 4 + (0 if args.skip_apply else 5)
    with tqdm(total=steps, desc="bench scoring", file=sys.stderr) as bar:
        if not args.skip_training:
            result["training"] = bench_training(bar)
        try:
            result["live"] = bench_stack(sizes, bar)
            if not args.skip_apply:
                result["apply"] = bench_apply(apply_events, bar)
                result["apply"]["vs_ingest_stream"] = versus_ingest(args.out.parent / "ingest.json", result["apply"])
        except StackError as exc:
            raise UsageError(f"could not run the live part: {exc}") from exc
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(human(result))
        print(f"\nreport: {args.out}")
    return 0


def versus_ingest(ingest_json: Path, apply: dict[str, Any]) -> dict[str, Any]:
    """The apply rate against the ingestion stream rate `stylerec bench ingest` measured (its JSON
    next to this one, with its write time: the comparison holds for one session on one box)."""
    if not ingest_json.exists():
        return {"note": f"{ingest_json} not found: run `stylerec bench ingest` first"}
    try:
        data = json.loads(ingest_json.read_text())
        stream = float(data["service"]["stream"]["events_per_s"])
    except (KeyError, TypeError, ValueError, json.JSONDecodeError) as exc:
        return {"note": f"{ingest_json}: no stream rate ({type(exc).__name__})"}
    rate = float(apply["scoring"]["events_per_s"])
    return {
        "ingest_json": str(ingest_json.relative_to(REPO)) if ingest_json.is_relative_to(REPO) else str(ingest_json),
        "ingest_written_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ingest_json.stat().st_mtime)),
        "ingest_stream_events_per_s": stream,
        "apply_events_per_s": rate,
        "ratio": round(rate / stream, 3) if stream else None,
        "goal": "apply >= ingest stream",
        "met": rate >= stream,
    }


def human(result: dict[str, Any]) -> str:
    lines = []
    for name, block in result.get("training", {}).items():
        lines.append(f"training on {name} ({block['matrix']}):")
        for algo, row in block["algorithms"].items():
            lines.append(f"  {algo:<11} {row['train_seconds']:>8.3f} s  (x{row['ratio_vs_itemknn']} item-kNN)")
    live = result["live"]
    t, f = live["topn_latency"], live["freshness_event_to_redis"]
    lines.append(
        f"TopN p50 {t['service']['p50_ms']} ms p95 {t['service']['p95_ms']} ms "
        f"(health check p50 {t['baseline_health_check_same_server']['p50_ms']} ms, x{t['ratio_p50']})"
    )
    lines.append(
        f"freshness p50 {f['service']['p50_ms']} ms p95 {f['service']['p95_ms']} ms "
        f"(bare Kafka hop p50 {f['baseline_bare_kafka_hop']['p50_ms']} ms, x{f['ratio_p50']})"
    )
    a = result.get("apply")
    if a:
        per = a["foldin_per_user_ms"]
        lines.append(
            f"apply {a['scoring']['events_per_s']:,.0f} events/s from a pre-filled topic of {a['events']:,}"
            f" (bare consumer {a['baseline_bare_consumer_events_per_s']:,.0f}/s, x{a['ratio_vs_bare_consumer']};"
            f" state + fold-in alone {a['state_and_foldin_events_per_s']:,.0f}/s, x{a['ratio_vs_state_and_foldin']})"
        )
        lines.append(
            f"fold-in per user {per['one_at_a_time']} ms one at a time, {per['batched_500']} ms batched"
            f" (x{per['ratio_batched_vs_single']})"
        )
        heavy = a.get("heavy_shoppers_foldin")
        if heavy:
            h, ms = heavy["history_items_min_median_max"], heavy["per_user_ms"]
            lines.append(
                f"heavy shoppers ({heavy['users']} users, {h[0]}-{h[2]} items): one new item costs"
                f" {ms['product']} ms per user by the product, {ms['kept_sums']} ms with kept sums"
                f" (x{heavy['ratio_kept_sums_vs_product']}; identical lists: {heavy['identical_lists']})"
            )
        vs = a.get("vs_ingest_stream", {})
        if "ratio" in vs:
            lines.append(f"apply vs ingest stream {vs['ingest_stream_events_per_s']:,.0f}/s: x{vs['ratio']}")
    return "\n".join(lines)
