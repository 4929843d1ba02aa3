"""`stylerec up | status | down`."""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from cli.errors import UsageError
from cli.localstack.stack import Stack, StackError, stack_dir


def register(sub: Any) -> None:
    p = sub.add_parser("up", help="start broker, Redis, Mongo-protocol server and the four services")
    p.add_argument("--timeout", type=float, default=180, help="seconds to wait for SERVING")
    p.set_defaults(func=cmd_up)
    p = sub.add_parser("status", help="health of every component")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_status)
    p = sub.add_parser("down", help="stop everything `up` started")
    p.set_defaults(func=cmd_down)


def cmd_up(args: argparse.Namespace) -> int:
    stack = Stack.load(stack_dir())
    t0 = time.monotonic()
    try:
        print(f"starting stack (state and logs in {stack.dir}) ...", flush=True)
        stack.up(timeout_s=args.timeout)
    except StackError as exc:
        stack.down()
        raise UsageError(str(exc)) from exc
    print(f"stack up in {time.monotonic() - t0:.1f}s")
    _print_status(stack.status())
    return 0


def _print_status(status: dict[str, dict[str, Any]]) -> None:
    for name, st in status.items():
        health = "healthy" if st["healthy"] else ("running" if st["running"] else "down")
        print(f"  {name:<13} {st['address'] or '-':<22} {health}")


def cmd_status(args: argparse.Namespace) -> int:
    stack = Stack.load(stack_dir())
    status = stack.status()
    if args.json:
        print(json.dumps({"components": status, "all_healthy": all(s["healthy"] for s in status.values())}, indent=2))
    else:
        _print_status(status)
    return 0 if all(s["healthy"] for s in status.values()) else 1


def cmd_down(args: argparse.Namespace) -> int:
    stack = Stack.load(stack_dir())
    stopped = stack.down()
    print(f"stopped: {', '.join(stopped) if stopped else 'nothing was running'}")
    return 0
