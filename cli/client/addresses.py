"""Where a client command connects: the address given with ``--addr``, else the running stack's."""

from __future__ import annotations

from cli.errors import UsageError
from cli.localstack.stack import Stack, stack_dir


def service_addr(name: str, explicit: str | None) -> str:
    if explicit:
        return explicit
    stack = Stack.load(stack_dir())
    addr = stack.addr_of(name)
    if not addr:
        raise UsageError(f"no running stack found in {stack.dir}: run `stylerec up` or pass --addr")
    return addr
