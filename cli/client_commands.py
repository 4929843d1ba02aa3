"""`stylerec ingest events FILE` and `stylerec recommend USER`: gRPC clients of the running stack."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import grpc
from stylerec.v1 import gateway_pb2, gateway_pb2_grpc, ingestion_pb2, ingestion_pb2_grpc

from cli.errors import UsageError
from cli.eventfile import EventFileError, read_events
from cli.ingest_items import register_items
from cli.stack import Stack
from cli.stack_commands import stack_dir
from libs.common.channels import describe_rpc_error, env_channel

CHUNK = 1000


def register(sub: Any) -> None:
    ingest = sub.add_parser("ingest", help="send data to the ingestion service")
    isub = ingest.add_subparsers(dest="what", required=True)
    p = isub.add_parser("events", help="CSV or JSONL with user_id,item_id,type,timestamp[,event_id,value]")
    p.add_argument("file", type=Path)
    p.add_argument("--addr", help="ingestion host:port (default: from the running stack)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_ingest_events)
    register_items(isub)
    p = sub.add_parser("recommend", help="recommendations for a (raw) user id from the gateway")
    p.add_argument("user")
    p.add_argument("-k", type=int, default=10)
    p.add_argument("--addr", help="gateway host:port (default: from the running stack)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_recommend)


def service_addr(name: str, explicit: str | None) -> str:
    if explicit:
        return explicit
    stack = Stack.load(stack_dir())
    addr = stack.addr_of(name)
    if not addr:
        raise UsageError(f"no running stack found in {stack.dir}: run `stylerec up` or pass --addr")
    return addr


def cmd_ingest_events(args: argparse.Namespace) -> int:
    try:
        events = list(read_events(args.file))
    except EventFileError as exc:
        raise UsageError(str(exc)) from exc
    addr = service_addr("ingestion", args.addr)
    totals = {"accepted": 0, "duplicates": 0, "rejected": 0}
    rejected: list[dict[str, Any]] = []
    with env_channel(addr) as channel:
        stub = ingestion_pb2_grpc.IngestionServiceStub(channel)
        for start in range(0, len(events), CHUNK):
            chunk = events[start : start + CHUNK]
            try:
                resp = stub.IngestEvents(ingestion_pb2.IngestEventsRequest(events=chunk), timeout=60)
            except grpc.RpcError as exc:
                if exc.code() == grpc.StatusCode.INVALID_ARGUMENT:
                    totals["rejected"] += len(chunk)
                    rejected.append({"chunk_start": start, "reason": exc.details()})
                    continue
                raise UsageError(f"ingestion at {addr} failed: {describe_rpc_error(exc)}") from exc
            totals["accepted"] += resp.accepted
            totals["duplicates"] += resp.duplicates
            totals["rejected"] += len(resp.rejected)
            rejected.extend({"index": start + r.index, "reason": r.reason} for r in resp.rejected)
    if args.json:
        print(json.dumps({**totals, "rejected_events": rejected[:100]}))
    else:
        print(f"accepted {totals['accepted']}  duplicates {totals['duplicates']}  rejected {totals['rejected']}")
        for r in rejected[:10]:
            print(f"  rejected {r}")
    return 0


def cmd_recommend(args: argparse.Namespace) -> int:
    addr = service_addr("gateway", args.addr)
    with env_channel(addr) as channel:
        stub = gateway_pb2_grpc.GatewayServiceStub(channel)
        try:
            resp = stub.GetRecommendations(
                gateway_pb2.GetRecommendationsRequest(user_id=args.user, k=args.k), timeout=10
            )
        except grpc.RpcError as exc:
            raise UsageError(f"gateway at {addr}: {describe_rpc_error(exc)}") from exc
    strategy = gateway_pb2.Strategy.Name(resp.strategy)
    if args.json:
        from google.protobuf.json_format import MessageToDict

        print(json.dumps(MessageToDict(resp, preserving_proto_field_name=True)))
        return 0
    print(
        f"user {args.user}: strategy {strategy}, model {resp.model_version or '-'}"
        + (f", degraded: {resp.degraded_reason}" if resp.degraded else "")
    )
    for rank, item in enumerate(resp.items, 1):
        print(f"  {rank:>2}. {item.item_id:<20} {item.title[:40]:<40} score {item.final_score:.3f}")
    return 0
