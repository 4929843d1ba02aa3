"""`stylerec bench gateway [--quick] --json`: GetRecommendations latency against a no-op service.

It starts its own broker, Redis and Mongo-protocol server, seeds them with a
SYNTHETIC catalog and users exactly as the contracts say scoring and the style
worker would (recs, profiles, embeddings, popularity, items in MongoDB), then
starts two processes on the same bootstrap (``ServiceRuntime``, same settings):

* the gateway (``python -m services.gateway``), and
* the baseline: ``python -m services.gateway.noop``, which answers without I/O with a
  canned answer of the same size (k=10 items with titles and scores).

and a second gateway with ``STYLEREC_ANSWER_CACHE_S=0`` ("gateway_built"): the deployed
gateway serves a repeat view of an unchanged shopper from its kept answers
(services/gateway/answers.py), and this bench's users never change, so its hit rate is
~100% after warm-up (reported); the second one builds every answer (the cost of a miss: the
first view after each of the shopper's events).

All get the same closed-loop load (N client threads, each sending its next
request when the last one is answered) at several concurrencies, interleaved
so that machine noise hits them alike. Half the users take the
STYLE_PERSONALIZED path with ``want_stylized`` (so the stylize dedup and rate
limit run), half the CF path. No timing is asserted anywhere: this is a command.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import redis
from pymongo import MongoClient
from stylerec.v1 import gateway_pb2, gateway_pb2_grpc
from tqdm import tqdm

from cli.errors import UsageError
from cli.localstack.stack import REPO, Stack, free_port, grpc_serving, metric_sum, terminate_group
from libs.common import keys
from libs.common.channels import make_channel
from libs.common.pseudonym import Pseudonymizer
from libs.common.settings import DEV_PSEUDONYM_SECRET
from services.gateway.style import encode_embedding

N_USERS = 400
N_ITEMS = 2000
RECS_PER_USER = 50
GOAL_P50_RATIO = 1.5
# Time for the last lingering impressions to be published before they are counted.
IMPRESSIONS_SETTLE_S = 2.0


def register_bench(bsub: Any) -> None:
    p = bsub.add_parser("gateway", help="gateway requests/s and p50/p95/p99 vs a no-op service on the same bootstrap")
    p.add_argument("--quick", action="store_true", help="shorter runs (about 30 s in all)")
    p.add_argument("--concurrency", default="1,4,16", help="comma-separated client concurrencies")
    p.add_argument("--json", action="store_true", help="print the result JSON on stdout")
    p.add_argument("--out", type=Path, default=REPO / "out" / "bench" / "gateway.json")
    p.set_defaults(func=cmd_bench_gateway)


def seed(
    stack: Stack, pseudonymize: Pseudonymizer, rng: np.random.Generator
) -> list[gateway_pb2.GetRecommendationsRequest]:
    """Synthetic stores: items, recs, half the users with confident style profiles."""
    r = redis.Redis.from_url(stack.redis_url)
    mongo: MongoClient[Any] = MongoClient(stack.mongo_uri)
    items = [f"sku-{i}" for i in range(N_ITEMS)]
    mongo["stylerec"]["items"].insert_many(
        [
            {
                "_id": i,
                "title": f"Synthetic item {n}",
                "category": ["mugs", "lamps", "prints", "cards"][n % 4],
                "brand": "bench",
                "price": float(1 + n % 50),
                "image_ref": f"{n:024x}",
                "attributes": {},
            }
            for n, i in enumerate(items)
        ]
    )
    emb = rng.normal(size=(N_ITEMS, 100)).astype(np.float32) + 2.0  # mostly-positive, like real style vectors
    pipe = r.pipeline(transaction=False)
    for i, e in zip(items, emb, strict=True):
        pipe.set(keys.item_embedding(i), encode_embedding(e))
    pipe.incr(keys.item_embeddings_version())  # as the style worker does: readers rescan when it moves
    pipe.zadd(keys.popular(), {i: float(N_ITEMS - n) for n, i in enumerate(items[:300])})
    pipe.set(keys.model_version(), "bench-model-1")
    requests = []
    for u in range(N_USERS):
        raw = f"bench-user-{u}"
        user = pseudonymize(raw)
        picks = rng.choice(N_ITEMS, size=RECS_PER_USER + 5, replace=False)
        pipe.hset(keys.recs(user), mapping={items[i]: float(rng.random()) for i in picks[:RECS_PER_USER]})
        pipe.hset(keys.recs_meta(user), mapping={"model_version": "bench-model-1", "updated_at": "0"})
        pipe.sadd(keys.user_seen(user), *[items[i] for i in picks[RECS_PER_USER:]])
        style = u % 2 == 0
        if style:
            anchor = items[int(picks[-1])]
            pipe.hset(
                keys.style_profile(user),
                mapping={"vector": encode_embedding(emb[picks[-1]]), "confidence": "0.9", "anchor": anchor},
            )
        requests.append(gateway_pb2.GetRecommendationsRequest(user_id=raw, k=10, want_stylized=style))
    pipe.execute()
    mongo.close()
    return requests


def closed_loop(
    call: Callable[[gateway_pb2.GetRecommendationsRequest], Any],
    requests: list[gateway_pb2.GetRecommendationsRequest],
    concurrency: int,
    duration_s: float,
    warmup_s: float,
) -> dict[str, Any]:
    latencies: list[list[float]] = [[] for _ in range(concurrency)]
    by_path: list[dict[str, list[float]]] = [{"style": [], "cf": []} for _ in range(concurrency)]
    errors = [0] * concurrency
    error_kinds: dict[str, int] = {}
    start_at = time.perf_counter() + warmup_s
    stop_at = start_at + duration_s

    def worker(w: int) -> None:
        n = w
        while True:
            t0 = time.perf_counter()
            if t0 >= stop_at:
                return
            try:
                call(requests[n % len(requests)])
                ok = True
            except grpc.RpcError as exc:
                ok = False
                error_kinds[exc.code().name] = error_kinds.get(exc.code().name, 0) + 1
            t1 = time.perf_counter()
            if t0 >= start_at:
                if ok:
                    latencies[w].append(t1 - t0)
                    req = requests[n % len(requests)]
                    by_path[w]["style" if req.want_stylized else "cf"].append(t1 - t0)
                else:
                    errors[w] += 1
            n += concurrency

    threads = [threading.Thread(target=worker, args=(w,)) for w in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    lat = sorted(x for part in latencies for x in part)

    def pct(p: float) -> float:
        return lat[min(len(lat) - 1, int(p * len(lat)))] * 1000 if lat else 0.0

    def p50_of(path: str) -> float:
        xs = sorted(x for part in by_path for x in part[path])
        return round(xs[len(xs) // 2] * 1000, 3) if xs else 0.0

    return {
        "p50_ms_style_requests": p50_of("style"),
        "p50_ms_cf_requests": p50_of("cf"),
        "concurrency": concurrency,
        "requests": len(lat),
        "errors": sum(errors),
        "error_codes": error_kinds,
        "requests_per_s": round(len(lat) / duration_s, 1),
        "p50_ms": round(pct(0.50), 3),
        "p95_ms": round(pct(0.95), 3),
        "p99_ms": round(pct(0.99), 3),
        "mean_ms": round(statistics.fmean(lat) * 1000, 3) if lat else 0.0,
    }


def _caller(
    stub: gateway_pb2_grpc.GatewayServiceStub,
) -> Callable[[gateway_pb2.GetRecommendationsRequest], gateway_pb2.GetRecommendationsResponse]:
    def call(req: gateway_pb2.GetRecommendationsRequest) -> gateway_pb2.GetRecommendationsResponse:
        return stub.GetRecommendations(req, timeout=10)

    return call


def start_noop(stack: Stack, env_extra: dict[str, str]) -> tuple[subprocess.Popen[bytes], str]:
    port, mport = free_port(), free_port()
    env = stack.service_env("gateway", port, mport)
    env.update(env_extra)
    log = open(stack.dir / "gateway-noop.log", "ab")  # noqa: SIM115 - owned by the child process
    proc = subprocess.Popen(
        [sys.executable, "-m", "services.gateway.noop"],
        cwd=str(REPO),
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    return proc, f"127.0.0.1:{port}"


def wait_serving(address: str, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while not grpc_serving(address):
        if time.monotonic() > deadline:
            raise RuntimeError(f"{address} did not report SERVING")
        time.sleep(0.2)


def run_bench(quick: bool, concurrencies: list[int]) -> dict[str, Any]:
    duration, warmup = (3.0, 1.0) if quick else (8.0, 2.0)
    env_extra = {"STYLEREC_LOG_LEVEL": "WARNING", "STYLEREC_SCORING_ADDR": "", "STYLEREC_GRPC_WORKERS": "16"}
    with tempfile.TemporaryDirectory(prefix="stylerec-bench-gateway-") as tmp:
        stack = Stack(dir=Path(tmp))
        noop_proc: subprocess.Popen[bytes] | None = None
        try:
            print("bench gateway: starting broker, Redis, Mongo-protocol server ...", file=sys.stderr)
            stack.start_infra()
            requests = seed(stack, Pseudonymizer(DEV_PSEUDONYM_SECRET), np.random.default_rng(42))
            gw = stack.start_service("gateway", instance="gateway", extra_env=env_extra)
            built = stack.start_service(
                "gateway", instance="gateway-built", extra_env={**env_extra, "STYLEREC_ANSWER_CACHE_S": "0"}
            )
            noop_proc, noop_addr = start_noop(stack, env_extra)
            wait_serving(gw.address)
            wait_serving(built.address)
            wait_serving(noop_addr)
            targets = {"noop": noop_addr, "gateway": gw.address, "gateway_built": built.address}
            channels = {name: make_channel(addr) for name, addr in targets.items()}  # own plaintext stack
            stubs = {name: gateway_pb2_grpc.GatewayServiceStub(ch) for name, ch in channels.items()}
            # Warm both (caches, connections, first-call imports) before anything is measured.
            for stub in stubs.values():
                for req in requests:
                    stub.GetRecommendations(req, timeout=10)
            results: dict[str, list[dict[str, Any]]] = {name: [] for name in targets}
            steps = [(c, name) for c in concurrencies for name in targets]
            before = stack.scrape("gateway")
            for c, name in tqdm(steps, desc="bench gateway", unit="run", file=sys.stderr):
                stub = stubs[name]
                results[name].append(closed_loop(_caller(stub), requests, c, duration, warmup))
            # The last answers' impressions are still lingering in the publisher: let them go out
            # before counting what was published and what was dropped.
            time.sleep(IMPRESSIONS_SETTLE_S)
            after = stack.scrape("gateway")
            sample = stubs["gateway"].GetRecommendations(requests[0], timeout=10)
            for ch in channels.values():
                ch.close()
        finally:
            if noop_proc is not None:
                terminate_group(noop_proc.pid)
            stack.down()
    ratios = {name: ratios_of(results["noop"], results[name]) for name in ("gateway", "gateway_built")}
    hits, restyles, misses = (
        metric_sum(after, "stylerec_gateway_answer_cache_total", result=r)
        - metric_sum(before, "stylerec_gateway_answer_cache_total", result=r)
        for r in ("hit", "restyle", "miss")
    )
    looked_up = hits + restyles + misses
    # An answer whose impression was dropped is work the gateway skipped: a bench that got
    # faster by dropping them would measure nothing. Counted over the measured runs (and warm-up).
    impressions = {
        "published": int(
            metric_sum(after, "stylerec_gateway_impressions_total")
            - metric_sum(before, "stylerec_gateway_impressions_total")
        ),
        "dropped": int(
            metric_sum(after, "stylerec_gateway_impressions_dropped_total")
            - metric_sum(before, "stylerec_gateway_impressions_dropped_total")
        ),
    }
    errors = sum(r["errors"] for rs in results.values() for r in rs)
    return {
        "benchmark": "gateway GetRecommendations vs a no-op GatewayService on the same ServiceRuntime bootstrap "
        "(the no-op returns a canned 10-item answer: same payload, no work)",
        "data": f"SYNTHETIC: {N_USERS} users (half STYLE_PERSONALIZED with want_stylized, half CF), "
        f"{N_ITEMS} items, {RECS_PER_USER} recs per user, k=10",
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "note": "client, gateway, no-op, Redis and the Mongo-protocol server share these CPUs",
        },
        "duration_s_per_point": duration,
        "results": results,
        "ratios": ratios["gateway"],
        "ratios_built_every_time": ratios["gateway_built"],
        "answer_cache_hit_rate": round(hits / looked_up, 4) if looked_up else None,
        # Kept answers whose PENDING images were asked again (one Redis call, no ranking).
        "answer_cache_restyle_rate": round(restyles / looked_up, 4) if looked_up else None,
        "answer_cache_note": "the bench's users never change, so a repeat view is a hit; in a shop the first view "
        "after each of the shopper's events is a miss, which costs what gateway_built shows",
        "goal": f"gateway p50 within {GOAL_P50_RATIO}x the no-op",
        "goal_met": goal_met(ratios["gateway"]),
        "goal_met_built_every_time": goal_met(ratios["gateway_built"]),
        "errors": errors,
        "impressions": impressions,
        "sample_strategy": gateway_pb2.Strategy.Name(sample.strategy),
    }


def ratios_of(noop_runs: list[dict[str, Any]], runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for noop, gw_r in zip(noop_runs, runs, strict=True):
        out.append(
            {
                "concurrency": noop["concurrency"],
                "p50_ratio": round(gw_r["p50_ms"] / noop["p50_ms"], 2) if noop["p50_ms"] else None,
                "p99_ratio": round(gw_r["p99_ms"] / noop["p99_ms"], 2) if noop["p99_ms"] else None,
                "throughput_ratio": round(gw_r["requests_per_s"] / noop["requests_per_s"], 2)
                if noop["requests_per_s"]
                else None,
            }
        )
    return out


def goal_met(ratios: list[dict[str, Any]]) -> bool:
    return all(r["p50_ratio"] is not None and r["p50_ratio"] <= GOAL_P50_RATIO for r in ratios)


def cmd_bench_gateway(args: argparse.Namespace) -> int:
    try:
        concurrencies = [int(c) for c in args.concurrency.split(",") if c.strip()]
    except ValueError as exc:
        raise UsageError(f"--concurrency must be comma-separated integers: {exc}") from exc
    if not concurrencies or any(c < 1 or c > 256 for c in concurrencies):
        raise UsageError("--concurrency values must be between 1 and 256")
    result = run_bench(args.quick, concurrencies)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"{'conc':>5} {'target':>8} {'req/s':>9} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} {'errors':>7}")
        res = result["results"]
        for runs in zip(res["noop"], res["gateway"], res["gateway_built"], strict=True):
            for name, r in zip(("noop", "gateway", "built"), runs, strict=True):
                print(
                    f"{r['concurrency']:>5} {name:>8} {r['requests_per_s']:>9} {r['p50_ms']:>8} "
                    f"{r['p95_ms']:>8} {r['p99_ms']:>8} {r['errors']:>7}"
                )
        for label, key in (("gateway", "ratios"), ("built every time", "ratios_built_every_time")):
            print(
                f"{label}/no-op p50, throughput:",
                ", ".join(f"c={r['concurrency']}: {r['p50_ratio']}, {r['throughput_ratio']}" for r in result[key]),
            )
        print(
            f"answer cache (gateway): hit rate {result['answer_cache_hit_rate']}, "
            f"restyled {result['answer_cache_restyle_rate']} (PENDING images re-asked, nothing rebuilt)"
        )
        print(f"goal ({result['goal']}): {'met' if result['goal_met'] else 'NOT met'}; errors {result['errors']}")
        imp = result["impressions"]
        print(f"impressions (gateway): {imp['published']} published, {imp['dropped']} dropped")
        print(f"written: {args.out}")
    return 0 if result["errors"] == 0 and result["impressions"]["dropped"] == 0 else 1
