"""`stylerec forget USER`: AdminService.ForgetUser on the running stack (role admin).

The user id is the shop's raw id, exactly as events were sent with it: the
ingestion service pseudonymizes it like every other request. Bad input (an
empty id, a rejected request) is a message and exit code 2; a store or broker
failure is exit code 1 (every step is idempotent: run it again).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import grpc
from stylerec.v1 import admin_pb2, admin_pb2_grpc

from cli.client.addresses import service_addr
from cli.errors import UsageError
from libs.common.channels import describe_rpc_error, env_channel

FIELDS = (
    "events_deleted",
    "dedup_keys_deleted",
    "redis_keys_deleted",
    "stylized_images_deleted",
    "stylized_refs_removed",
    "impressions_deleted",
    "attributions_deleted",
)
# Errors that mean "the request is wrong", not "try again".
CALLER_ERRORS = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.UNIMPLEMENTED,
}


def register(sub: Any) -> None:
    p = sub.add_parser("forget", help="erase a user everywhere (AdminService.ForgetUser; role admin)")
    p.add_argument("user", help="the shop's raw user id")
    p.add_argument("--addr", help="ingestion host:port (default: from the running stack)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_forget)


def cmd_forget(args: argparse.Namespace) -> int:
    user = str(args.user)
    if not user.strip():
        raise UsageError("USER must not be empty: pass the shop's user id to forget")
    addr = service_addr("ingestion", args.addr)
    with env_channel(addr) as channel:
        stub = admin_pb2_grpc.AdminServiceStub(channel)
        try:
            resp = stub.ForgetUser(admin_pb2.ForgetUserRequest(user_id=user), timeout=60)
        except grpc.RpcError as exc:
            if exc.code() in CALLER_ERRORS:
                raise UsageError(f"ingestion at {addr} refused: {describe_rpc_error(exc)}") from exc
            print(f"stylerec: forget failed at {addr}: {describe_rpc_error(exc)}; safe to retry", file=sys.stderr)
            return 1
    counts = {f: int(getattr(resp, f)) for f in FIELDS}
    if args.json:
        print(
            json.dumps(
                {
                    "user_ref": resp.user_ref,
                    "already_forgotten": resp.already_forgotten,
                    "forget_command_offset": resp.forget_command_offset,
                    **counts,
                }
            )
        )
        return 0
    state = "was already forgotten" if resp.already_forgotten else "forgotten"
    print(f"user {state} (reference {resp.user_ref})")
    for name, n in counts.items():
        print(f"  {name.replace('_', ' ')}: {n}")
    print("  scoring replicas drop the user from their state from the user-forget topic")
    return 0
