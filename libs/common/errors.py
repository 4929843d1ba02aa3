"""gRPC errors with machine-readable details (google.rpc.BadRequest field violations).

Callers get both a readable message and structured details they can parse with
``grpc_status.rpc_status.from_call``; shared by every servicer.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import NoReturn

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status


def abort_invalid(
    context: grpc.ServicerContext,
    message: str,
    violations: Iterable[tuple[str, str]] = (),
    code: grpc.StatusCode = grpc.StatusCode.INVALID_ARGUMENT,
) -> NoReturn:
    """Abort with ``code``, a summary message and one field violation per (field, reason)."""
    bad = error_details_pb2.BadRequest(
        field_violations=[error_details_pb2.BadRequest.FieldViolation(field=f, description=d) for f, d in violations]
    )
    detail = any_pb2.Any()
    detail.Pack(bad)
    status = status_pb2.Status(code=getattr(code_pb2, code.name), message=message, details=[detail])
    context.abort_with_status(rpc_status.to_status(status))
    raise AssertionError("abort_with_status returned")


def abort_retryable(
    context: grpc.ServicerContext, code: grpc.StatusCode, message: str, retry_after_s: float
) -> NoReturn:
    """UNAVAILABLE / RESOURCE_EXHAUSTED with a google.rpc.RetryInfo the client can honour."""
    info = error_details_pb2.RetryInfo()
    info.retry_delay.FromMilliseconds(int(retry_after_s * 1000))
    detail = any_pb2.Any()
    detail.Pack(info)
    status = status_pb2.Status(code=getattr(code_pb2, code.name), message=message, details=[detail])
    context.abort_with_status(rpc_status.to_status(status))
    raise AssertionError("abort_with_status returned")


def violations_of(error: grpc.RpcError) -> list[tuple[str, str]]:
    """Client side: the field violations carried by an error raised from ``abort_invalid``."""
    status = rpc_status.from_call(error)
    out: list[tuple[str, str]] = []
    if status is None:
        return out
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            out.extend((v.field, v.description) for v in bad.field_violations)
    return out
