"""Helpers of the fault-injection scenarios 5 to 8: a private stack, topic readers, scrapes, RSS.

Every scenario kills or freezes parts of its stack, so each one starts its own
(:func:`private_stack`) instead of sharing the session's; nothing here fakes a
component: records are read back from the real broker, metrics scraped from the
real ``/metrics`` endpoints, memory read from ``/proc``.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from kafka import KafkaConsumer, TopicPartition
from kafka.consumer.fetcher import ConsumerRecord
from stylerec.v1 import common_pb2

from cli.localstack.stack import Samples, Stack, metric_sum
from libs.common.kafka import dead_letter_topic

T = TypeVar("T")

# Undecodable as any StyleRec message: 0xff starts a tag with wire type 7, which does not exist.
UNDECODABLE = b"\xff\xff\xff\xff not a protobuf"


@contextlib.contextmanager
def private_stack(directory: Path) -> Iterator[Stack]:
    """Broker, Redis and Mongo-protocol server of this scenario alone; everything is stopped after,
    frozen (SIGSTOPped) components included."""
    stack = Stack(dir=directory)
    try:
        stack.start_infra()
        yield stack
    finally:
        for comp in stack.components.values():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(comp.pid, signal.SIGCONT)
        stack.down(timeout_s=5)


def wait_for(predicate: Callable[[], T], timeout_s: float, what: str, every_s: float = 0.2) -> T:
    """Poll until ``predicate`` is truthy; the timeout is a generous guard, never the assertion itself."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}")
        time.sleep(every_s)


def read_topic(bootstrap: str, topic: str, settle_s: float = 1.5, timeout_s: float = 30) -> list[ConsumerRecord]:
    """Every record of ``topic`` from the beginning: reads until no new record came for ``settle_s``."""
    consumer = KafkaConsumer(bootstrap_servers=[bootstrap], enable_auto_commit=False)
    try:
        parts = wait_for(lambda: consumer.partitions_for_topic(topic), 10, f"partitions of {topic}")
        tps = [TopicPartition(topic, p) for p in sorted(parts)]
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        ends = consumer.end_offsets(tps)
        out: list[ConsumerRecord] = []
        deadline = time.monotonic() + timeout_s
        quiet_since = time.monotonic()
        while time.monotonic() < deadline:
            polled = consumer.poll(timeout_ms=200)
            got = [r for batch in polled.values() for r in batch]
            if got:
                out.extend(got)
                quiet_since = time.monotonic()
            elif all(consumer.position(tp) >= ends[tp] for tp in tps) and time.monotonic() - quiet_since > settle_s:
                break
        return out
    finally:
        consumer.close()


def dead_letters(bootstrap: str, service: str, settle_s: float = 1.5) -> list[common_pb2.DeadLetter]:
    """All records of ``dlq-<service>``, decoded."""
    return [
        common_pb2.DeadLetter.FromString(r.value) for r in read_topic(bootstrap, dead_letter_topic(service), settle_s)
    ]


def scrape(stack: Stack, name: str) -> Samples:
    """One scrape of a component's /metrics: (sample name, labels) → value."""
    return stack.scrape(name)


metric = metric_sum  # sum of the samples of a name whose labels include the given ones (0 when none)


def rss_kib(pid: int) -> int:
    """Resident set size of a process (VmRSS of /proc/<pid>/status), in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for pid {pid}")


def tail(path: str, chars: int = 3000) -> str:
    """The end of a component log, for assertion messages."""
    p = Path(path)
    return p.read_text(errors="replace")[-chars:] if p.exists() else ""


def labels_of(record: Any) -> dict[str, str]:
    """Headers of a Kafka record as text (empty when it has none)."""
    return {k: v.decode(errors="replace") for k, v in (record.headers or [])}
