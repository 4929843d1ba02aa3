"""`stylerec ingest events FILE` and `stylerec recommend USER`: gRPC clients of the running stack.

``ingest events`` is a bulk loader: it sends every readable row and reports
the rest by line number, because one bad row in a day's export must not hold
back the other million (docs/ingestion.md, "Bulk ingest").
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
from stylerec.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc, ingestion_pb2, ingestion_pb2_grpc

from cli.client.addresses import service_addr
from cli.client.bulk_ingest import (
    add_bulk_options,
    batch_refused,
    check_bulk_args,
    finish,
    refused_outcome,
    rpc_failure,
)
from cli.client.eventfile import (
    BulkReport,
    EventFileError,
    Outcome,
    RejectsWriter,
    check_all,
    count_lines,
    read_event_rows,
    require_readable,
    run_bulk,
    sniff,
)
from cli.client.ingest_items import register_items
from cli.errors import UsageError
from libs.common.channels import describe_rpc_error, env_channel
from services.ingestion.validation import EventLimits, validate_event

CHUNK = 1000
# The service's default max_batch_events; a smaller server limit is answered per request.
MAX_BATCH = 10_000
IN_PROGRESS = "in_progress:"


def register(sub: Any) -> None:
    ingest = sub.add_parser("ingest", help="send data to the ingestion service")
    isub = ingest.add_subparsers(dest="what", required=True)
    p = isub.add_parser(
        "events",
        help="CSV or JSONL with user_id,item_id,type,timestamp[,event_id,value]",
        description="Sends every readable row in batches; unreadable rows and the rows the service refuses are "
        "listed with their line numbers. Exit 0: all stored; 1: some rows rejected (or the run stopped early); "
        "2: the file cannot be used at all.",
    )
    p.add_argument("file", type=Path)
    add_bulk_options(p, default_batch=CHUNK, max_batch=MAX_BATCH)
    p.set_defaults(func=cmd_ingest_events)
    register_items(isub)
    p = sub.add_parser("recommend", help="recommendations for a (raw) user id from the gateway")
    p.add_argument("user")
    p.add_argument("-k", type=int, default=10)
    p.add_argument("--addr", help="gateway host:port (default: from the running stack)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_recommend)


def send_events(
    stub: ingestion_pb2_grpc.IngestionServiceStub,
    addr: str,
    sleep: Callable[[float], None] = time.sleep,
) -> Callable[[list[common_pb2.Event]], Outcome]:
    """One IngestEvents call per batch; events another request is still settling are resent (3 rounds)."""

    def send(events: list[common_pb2.Event]) -> Outcome:
        outcome = _call(events)
        for wait in (1.0, 2.0, 4.0):
            waiting = sorted(i for i, reason in outcome.rejected.items() if reason.startswith(IN_PROGRESS))
            if not waiting:
                break
            sleep(wait)
            again = _call([events[i] for i in waiting])
            for j, i in enumerate(waiting):
                del outcome.rejected[i]
                if j in again.rejected:
                    outcome.rejected[i] = again.rejected[j]
            outcome.accepted += again.accepted
            outcome.duplicates += again.duplicates
        return outcome

    def _call(events: list[common_pb2.Event]) -> Outcome:
        try:
            resp = stub.IngestEvents(ingestion_pb2.IngestEventsRequest(events=events), timeout=60)
        except grpc.RpcError as exc:
            if batch_refused(exc):
                return refused_outcome(exc, len(events), "events")
            raise rpc_failure(exc, addr) from exc
        return Outcome(
            accepted=resp.accepted,
            duplicates=resp.duplicates,
            rejected={r.index: r.reason for r in resp.rejected},
        )

    return send


def cmd_ingest_events(args: argparse.Namespace) -> int:
    check_bulk_args(args, MAX_BATCH)
    path: Path = args.file
    try:
        header_lines = 1 if sniff(path) == "csv" else 0
        total = count_lines(path) - header_lines
        require_readable(path, (r for r in read_event_rows(path) if r.line >= args.from_line))
        rejects = RejectsWriter(args.rejects)
    except EventFileError as exc:
        raise UsageError(str(exc)) from exc
    report = BulkReport(noun="events")
    if args.strict:
        limits = EventLimits()
        if not check_all(
            read_event_rows(path), lambda e: validate_event(e, limits), report, rejects, total, args.from_line
        ):
            return finish(report, args)
        report, rejects = BulkReport(noun="events"), RejectsWriter(args.rejects)
    addr = service_addr("ingestion", args.addr)
    with env_channel(addr) as channel:
        stub = ingestion_pb2_grpc.IngestionServiceStub(channel)
        run_bulk(
            read_event_rows(path),
            send_events(stub, addr),
            report,
            max_rows=args.batch_size,
            rejects=rejects,
            total_lines=total,
            from_line=args.from_line,
            max_rate=args.max_rate,
        )
    return finish(report, args)


def cmd_recommend(args: argparse.Namespace) -> int:
    if args.k < 1:
        # The gateway reads k=0 as "its default", which is not what `-k 0` asks for.
        raise UsageError("-k must be 1 or more")
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
