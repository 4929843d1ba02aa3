"""Who is calling: the authenticated caller of the RPC being served.

The authentication interceptor sets it for the duration of each call, so domain
code (audit log, per-caller rate limits) can ask for it without threading the
gRPC context through every function. Without authentication configured every
call comes from ``ANONYMOUS``.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

ANONYMOUS = "anonymous"

_caller: contextvars.ContextVar[str] = contextvars.ContextVar("stylerec_caller", default=ANONYMOUS)


def current_caller() -> str:
    """The authenticated caller name of the RPC running on this thread."""
    return _caller.get()


@contextlib.contextmanager
def caller_scope(name: str) -> Iterator[None]:
    """Mark ``name`` as the caller while the block runs (the handler thread's context)."""
    token = _caller.set(name)
    try:
        yield
    finally:
        _caller.reset(token)
