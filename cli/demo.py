"""`make demo`: the main job end to end on the embedded stack.

Starts the stack, ingests a real sample (Online Retail purchases) through the
ingestion service, waits until scoring has applied it, prints recommendations
from the gateway for a few shoppers and an unknown user, and stops the stack.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter

import grpc
import redis
from stylerec.v1 import gateway_pb2, gateway_pb2_grpc, ingestion_pb2, ingestion_pb2_grpc
from tqdm import tqdm

from cli.demo_data import ONLINE_RETAIL, read_online_retail, synthetic_purchases, to_events
from cli.stack import REPO, Stack
from libs.common import keys
from libs.common.pseudonym import Pseudonymizer
from libs.common.settings import DEV_PSEUDONYM_SECRET

CHUNK = 2000


def ingest(stack: Stack, events: list, label: str) -> tuple[int, int, int]:
    accepted = duplicates = rejected = 0
    with grpc.insecure_channel(stack.addr_of("ingestion")) as channel:
        stub = ingestion_pb2_grpc.IngestionServiceStub(channel)
        for start in tqdm(range(0, len(events), CHUNK), desc=f"ingest {label}", unit="batch"):
            resp = stub.IngestEvents(
                ingestion_pb2.IngestEventsRequest(events=events[start : start + CHUNK]), timeout=60
            )
            accepted += resp.accepted
            duplicates += resp.duplicates
            rejected += len(resp.rejected)
    return accepted, duplicates, rejected


def wait_applied(stack: Stack, users: list[str], timeout_s: float = 120) -> float:
    """Wait until scoring has written recommendations for the last users ingested."""
    r = redis.Redis.from_url(stack.redis_url)
    pseudo = Pseudonymizer(DEV_PSEUDONYM_SECRET)
    t0 = time.monotonic()
    pending = {pseudo(u) for u in users}
    while pending and time.monotonic() - t0 < timeout_s:
        pending = {u for u in pending if not r.exists(keys.recs_meta(u))}
        time.sleep(0.5)
    if pending:
        raise RuntimeError(f"scoring did not apply the events within {timeout_s}s")
    return time.monotonic() - t0


def print_recs(stack: Stack, user: str, titles: dict[str, str], k: int = 5) -> None:
    with grpc.insecure_channel(stack.addr_of("gateway")) as channel:
        resp = gateway_pb2_grpc.GatewayServiceStub(channel).GetRecommendations(
            gateway_pb2.GetRecommendationsRequest(user_id=user, k=k), timeout=10
        )
    print(f"\nuser {user}: strategy {gateway_pb2.Strategy.Name(resp.strategy)}, model {resp.model_version}")
    for rank, item in enumerate(resp.items, 1):
        print(f"  {rank}. {item.item_id:<8} {titles.get(item.item_id, '')[:44]:<44} score {item.final_score:.3f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="StyleRec demo on the embedded stack")
    parser.add_argument("--limit", type=int, default=0, help="ingest only the first N purchases (0 = all)")
    args = parser.parse_args(argv)
    stack = Stack(dir=REPO / "out" / "demo" / "stack")
    if ONLINE_RETAIL.exists():
        print(f"data: REAL Online Retail purchases from {ONLINE_RETAIL}")
        purchases = list(read_online_retail())
    else:
        print("data: SYNTHETIC sample (../shared/data not found) — numbers below are not real shop data")
        purchases = synthetic_purchases()
    if args.limit:
        purchases = purchases[: args.limit]
    titles = {p.stock_code: p.description for p in purchases}
    events = to_events(purchases)
    t0 = time.monotonic()
    try:
        stack.down()
        print("starting the stack ...", flush=True)
        stack.up()
        print(f"stack up in {time.monotonic() - t0:.1f}s; logs in {stack.dir}")
        t1 = time.monotonic()
        accepted, dups, rejected = ingest(stack, events, "purchases")
        dt = time.monotonic() - t1
        print(
            f"ingested {accepted} events ({dups} duplicates, {rejected} rejected) in {dt:.1f}s "
            f"({accepted / max(dt, 1e-9):.0f} events/s)"
        )
        last_users = list(dict.fromkeys(p.customer for p in reversed(purchases)))[:20]
        waited = wait_applied(stack, last_users)
        print(f"scoring caught up {waited:.1f}s after the last ack")
        busiest = [u for u, _ in Counter(p.customer for p in purchases).most_common(3)]
        for user in busiest:
            print_recs(stack, user, titles)
        print_recs(stack, "someone-new", titles)
    finally:
        stack.down()
        print(f"\nstack stopped; demo took {time.monotonic() - t0:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
