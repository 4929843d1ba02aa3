"""Fault-injection fixtures: a private stack per test, so killing a component never
touches the session stack the other suites share.

Every scenario starts its own broker, Redis and Mongo-protocol server
(:func:`rstack`) in the test's temporary directory, adds the services it needs with
:func:`start`, and then crashes or stops parts with ``Stack.kill_component`` /
``Stack.restart_component`` (same argv, env and port, so clients reconnect to the
address they already know). Load is driven by :class:`EventSender`: a background
thread that sends known events in batches, records every accepted event id and can
hold a gate between batches, so "kill after the first K are acknowledged, keep
sending" is deterministic rather than a race against the clock.

Assertions wait on conditions (:func:`wait_for`), never on sleeps, and say what is
missing when the wait runs out.
"""

from __future__ import annotations

import math
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from pymongo import MongoClient
from pymongo.database import Database
from stylerec.v1 import common_pb2, ingestion_pb2, ingestion_pb2_grpc

from cli.localstack.stack import Stack
from libs.common.pseudonym import Pseudonymizer
from services.scoring.interactions import EPOCH

SECRET = "reliability-test-secret"
PSEUDONYMIZE = Pseudonymizer(SECRET)

# Settings every service of these tests gets: a dead consumer leaves its group in
# seconds (not the default 10), health follows dependencies quickly, and one
# pseudonymization secret so tests can compute the ids scoring and Redis use.
FAST_ENV = {
    "STYLEREC_KAFKA_SESSION_TIMEOUT_MS": "6000",
    "STYLEREC_HEALTH_INTERVAL_S": "0.5",
    "STYLEREC_PSEUDONYM_SECRET": SECRET,
    "STYLEREC_LOG_LEVEL": "INFO",
}


@pytest.fixture
def rstack(tmp_path: Path) -> Iterator[Stack]:
    """A private broker + Redis + Mongo-protocol server for one test; everything stopped after."""
    stack = Stack(dir=tmp_path / "stack")
    try:
        stack.start_infra()
        yield stack
    finally:
        # SIGKILL, not the graceful `down`: nothing is checked after the test, and a graceful
        # stop of scoring and the broker costs ~5 s each. Process groups, so nothing is left.
        for name in list(stack.components):
            stack.kill_component(name)
        stack.down()


def start(stack: Stack, service: str, instance: str = "", env: dict[str, str] | None = None) -> str:
    """Start one service process (FAST_ENV + ``env``) and wait until it reports SERVING."""
    name = instance or service
    stack.start_service(service, instance=name, extra_env={**FAST_ENV, **(env or {})})
    stack.wait_serving([name], timeout_s=120)
    return name


def log_tail(stack: Stack, name: str, chars: int = 3000) -> str:
    path = Path(stack.components[name].log)
    return path.read_text(errors="replace")[-chars:] if path.exists() else "(no log)"


def wait_for(cond: Callable[[], bool], timeout_s: float, what: Callable[[], str] | str, every_s: float = 0.2) -> None:
    """Poll ``cond`` until true; on timeout fail with ``what`` (a callable is evaluated then,
    so the message shows the state at the deadline, e.g. which ids are still missing)."""
    deadline = time.monotonic() + timeout_s
    last_error = ""
    while time.monotonic() < deadline:
        try:
            if cond():
                return
        except Exception as exc:  # a component still coming back: keep polling, but say so at the end
            last_error = f" (last error while polling: {type(exc).__name__}: {exc})"
        time.sleep(every_s)
    if cond():
        return
    raise AssertionError(f"timed out after {timeout_s:.0f}s{last_error}: {what() if callable(what) else what}")


def metric_value(stack: Stack, name: str, metric: str, **labels: str) -> float | None:
    """One sample of a component's /metrics (``metric`` with exactly these label values), None if absent."""
    return stack.scrape(name).get((metric, frozenset(labels.items())))


# ---------- events ----------
def exact_ts(k: int, half_life_days: float = 30.0) -> float:
    """A timestamp whose decay growth is an exact power of two (``EPOCH + k`` half-lives).

    Scoring sums ``weight * 2**((ts-EPOCH)/h)``; with these timestamps and the default
    integer weights every sum is exact in float64, so the state is bit-for-bit the same
    whatever order events were applied in (a crash-and-replay run applies them in another
    order than an uninterrupted one), and "equal" can mean ``==``.
    """
    h = half_life_days * 86400
    newest = math.floor((time.time() - EPOCH) / h)
    return EPOCH + (newest - k) * h


def make_event(
    event_id: str, user: str, item: str, etype: int = common_pb2.VIEW, ts: float | None = None
) -> common_pb2.Event:
    e = common_pb2.Event(event_id=event_id, user_id=user, item_id=item, type=etype)  # type: ignore[arg-type]
    e.timestamp.FromNanoseconds(int((time.time() if ts is None else ts) * 1e9))
    return e


def events_for(token: str, n: int, users: int = 23, items: int = 41, start: int = 0) -> list[common_pb2.Event]:
    """``n`` distinct, deterministic events (ids ``<token>-<i>``) with exact timestamps
    and all five types, spread over ``users`` x ``items``."""
    out = []
    for i in range(start, start + n):
        out.append(
            make_event(
                f"{token}-{i}",
                f"shopper-{token}-{i % users}",
                f"item-{(i * 7 + i // users) % items}",
                etype=1 + (i * 5 + i // 3) % 5,
                ts=exact_ts(i % 4),
            )
        )
    return out


@dataclass
class SendLog:
    """What ingestion said about every event sent: accepted ids (in order), duplicates, rejections, RPC errors."""

    accepted: list[str] = field(default_factory=list)
    duplicates: list[str] = field(default_factory=list)
    rejected: dict[str, str] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    batches_done: int = 0

    def record(self, batch: Sequence[common_pb2.Event], resp: ingestion_pb2.IngestEventsResponse) -> None:
        bad = {r.index for r in resp.rejected}
        dup = set(resp.duplicate_indexes)
        for r in resp.rejected:
            self.rejected[batch[r.index].event_id or f"#{r.index}"] = r.reason
        for i, e in enumerate(batch):
            if i in dup:
                self.duplicates.append(e.event_id)
            elif i not in bad:
                self.accepted.append(e.event_id)
        self.batches_done += 1


def ingest(address: str, events: Sequence[common_pb2.Event], batch: int = 100, log: SendLog | None = None) -> SendLog:
    """Send ``events`` with unary IngestEvents in batches; every call must succeed."""
    log = log or SendLog()
    with grpc.insecure_channel(address) as ch:
        stub = ingestion_pb2_grpc.IngestionServiceStub(ch)
        for s in range(0, len(events), batch):
            part = list(events[s : s + batch])
            resp = stub.IngestEvents(ingestion_pb2.IngestEventsRequest(events=part), timeout=30)
            log.record(part, resp)
    return log


class EventSender(threading.Thread):
    """Sends ``events`` in batches from a background thread, as a steady client would.

    ``gates`` maps a batch number to an Event the sender waits for before sending that
    batch: the test kills something after batch K was acknowledged and only then lets
    the rest go, so the failure always lands mid-stream. RPC errors are recorded, not
    raised (the scenarios assert there were none), and the failed batch is not retried.
    """

    def __init__(
        self,
        address: str,
        events: Sequence[common_pb2.Event],
        batch: int = 50,
        gates: dict[int, threading.Event] | None = None,
        pause_s: float = 0.0,
    ) -> None:
        super().__init__(name="event-sender", daemon=True)
        self.address = address
        self.batches = [list(events[s : s + batch]) for s in range(0, len(events), batch)]
        self.gates = gates or {}
        self.pause_s = pause_s
        self.log = SendLog()
        self._acked = threading.Condition()

    def run(self) -> None:
        with grpc.insecure_channel(self.address) as ch:
            stub = ingestion_pb2_grpc.IngestionServiceStub(ch)
            for n, part in enumerate(self.batches):
                gate = self.gates.get(n)
                if gate is not None and not gate.wait(180):
                    self.log.errors.append(f"gate before batch {n} never opened")
                    return
                try:
                    resp = stub.IngestEvents(ingestion_pb2.IngestEventsRequest(events=part), timeout=30)
                    self.log.record(part, resp)
                except grpc.RpcError as exc:
                    self.log.errors.append(f"batch {n}: {exc.code()} {exc.details()}")
                with self._acked:
                    self._acked.notify_all()
                if self.pause_s:
                    time.sleep(self.pause_s)

    def wait_batches(self, n: int, timeout_s: float = 60) -> None:
        """Block until ``n`` batches were answered (accepted or failed)."""
        deadline = time.monotonic() + timeout_s
        with self._acked:
            while self.log.batches_done + len(self.log.errors) < n:
                left = deadline - time.monotonic()
                if left <= 0 or not self.is_alive():
                    raise AssertionError(
                        f"sender answered {self.log.batches_done} batches (errors {self.log.errors}), wanted {n}"
                    )
                self._acked.wait(min(left, 0.5))

    def finish(self, timeout_s: float = 180) -> SendLog:
        self.join(timeout_s)
        assert not self.is_alive(), f"sender still running after {timeout_s}s ({self.log.batches_done} batches)"
        return self.log


# ---------- MongoDB ----------
@pytest.fixture
def mongo_client(rstack: Stack) -> Iterator[MongoClient[Any]]:
    client: MongoClient[Any] = MongoClient(rstack.mongo_uri, serverSelectionTimeoutMS=2000, retryWrites=False)
    yield client
    client.close()


def archived_ids(db: Database[Any], collection: str = "events") -> list[str]:
    return [str(d["_id"]) for d in db[collection].find({}, {"_id": 1})]


def id_diff(expected: Iterable[str], actual: Iterable[str]) -> str:
    """Which ids are missing, duplicated or unexpected: the message of a failed exact-count check."""
    want = Counter(expected)
    got = Counter(actual)
    missing = sorted(set(want) - set(got))
    extra = sorted(set(got) - set(want))
    doubled = sorted(i for i, c in got.items() if c > 1)
    return (
        f"expected {sum(want.values())} ids, got {sum(got.values())}; "
        f"missing {len(missing)} {missing[:10]}; unexpected {len(extra)} {extra[:10]}; "
        f"more than once {len(doubled)} {doubled[:10]}"
    )


def assert_exactly(expected: Iterable[str], actual: Iterable[str], what: str) -> None:
    exp, act = list(expected), list(actual)
    assert len(set(exp)) == len(exp), f"test bug: expected ids of {what} are not unique"
    assert sorted(act) == sorted(exp), f"{what}: {id_diff(exp, act)}"
