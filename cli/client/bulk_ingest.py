"""What `stylerec ingest events` and `stylerec ingest items` share: their bulk options and the
check of them, the mapping of an ingestion gRPC error to a refused batch or a send failure
(retryable, with the server's RetryInfo delay, or final), and the summary with its exit code.

The reading, batching and retry loop itself is :func:`cli.client.eventfile.run_bulk`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import grpc

from cli.client.eventfile import BulkReport, Outcome, SendFailed
from cli.errors import UsageError
from libs.common.channels import describe_rpc_error
from libs.common.errors import violations_of

# Failures that mean "the request is wrong", not "try again": no retry fixes them.
CALLER_ERRORS = {grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNIMPLEMENTED}
RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED}


def add_bulk_options(p: argparse.ArgumentParser, default_batch: int, max_batch: int) -> None:
    """The options `ingest events` and `ingest items` share."""
    p.add_argument("--addr", help="ingestion host:port (default: from the running stack)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument(
        "--rejects",
        type=Path,
        metavar="FILE",
        help="write every rejected row (line, source, reason, raw row) to FILE; .csv or .jsonl picks the format",
    )
    p.add_argument(
        "--strict",
        action="store_true",
        help="check the whole file first and send nothing if any row is bad (exit 1, rejects listed)",
    )
    p.add_argument(
        "--batch-size",
        type=int,
        default=default_batch,
        help=f"rows per request (1-{max_batch}, default {default_batch})",
    )
    p.add_argument(
        "--from-line", type=int, default=1, metavar="N", help="skip the rows before line N (resume a stopped run)"
    )
    p.add_argument(
        "--max-rate",
        type=float,
        metavar="ROWS_PER_S",
        help="send at most this many rows per second, so a backfill leaves the live shop room (default: no limit)",
    )


def check_bulk_args(args: argparse.Namespace, max_batch: int) -> None:
    if not 1 <= args.batch_size <= max_batch:
        raise UsageError(f"--batch-size must be between 1 and {max_batch}")
    if args.from_line < 1:
        raise UsageError("--from-line must be 1 or more")
    if args.max_rate is not None and not args.max_rate > 0:
        raise UsageError("--max-rate must be more than 0 rows per second")


def rpc_failure(exc: grpc.RpcError, addr: str) -> SendFailed:
    """A gRPC error as SendFailed: retryable (with the server's RetryInfo delay) or final."""
    code = exc.code()
    text = f"ingestion at {addr}: {describe_rpc_error(exc)}"
    delay = retry_delay_s(exc)
    if code in RETRYABLE or (code == grpc.StatusCode.RESOURCE_EXHAUSTED and delay is not None):
        return SendFailed(text, retry_after_s=delay if delay is not None else 1.0)
    return SendFailed(text, caller_error=code in CALLER_ERRORS)


def batch_refused(exc: grpc.RpcError) -> bool:
    """Whether the service refused the batch's content (every row invalid, too many or too large rows).

    Those answers carry BadRequest field violations and no RetryInfo: resending
    the same batch would get the same answer, so its rows are rejects.
    """
    code = exc.code()
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return True
    return code == grpc.StatusCode.RESOURCE_EXHAUSTED and retry_delay_s(exc) is None and bool(violations_of(exc))


def retry_delay_s(exc: grpc.RpcError) -> float | None:
    """The google.rpc.RetryInfo delay the server attached, or None."""
    from google.rpc import error_details_pb2
    from grpc_status import rpc_status

    try:
        status = rpc_status.from_call(exc)
    except ValueError:
        return None
    for detail in status.details if status else ():
        if detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            info = error_details_pb2.RetryInfo()
            detail.Unpack(info)
            return float(info.retry_delay.ToMilliseconds()) / 1000
    return None


def refused_outcome(exc: grpc.RpcError, n: int, field: str) -> Outcome:
    """A refused batch: every row is rejected, with the violation reasons where given.

    The service answers this way when every event of the batch is invalid (its
    field violations name ``events[i]``, the first 100 of them) or the batch is
    over its size limit (no index: the same reason for each row).
    """
    reasons: dict[int, str] = {}
    for name, reason in violations_of(exc):
        if name.startswith(f"{field}[") and name.endswith("]"):
            try:
                reasons[int(name[len(field) + 1 : -1])] = reason
            except ValueError:
                continue
    details = exc.details() or exc.code().name
    return Outcome(accepted=0, rejected={i: reasons.get(i, details) for i in range(n)})


def finish(report: BulkReport, args: argparse.Namespace, extra: dict[str, Any] | None = None) -> int:
    """Prints the summary (text or JSON, plus ``extra`` keys) and returns the exit code it implies."""
    if args.json:
        print(json.dumps({**report.as_dict(), **(extra or {})}))
    else:
        report.print(args.file, args.rejects)
    if report.caller_error:
        print(f"stylerec: error: {report.stopped}", file=sys.stderr)
    return report.exit_code()
