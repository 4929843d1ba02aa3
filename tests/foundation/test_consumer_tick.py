"""The consumer loop's poll tick (unit test; the KafkaConsumer is faked so that poll times are
the loop's own, not a broker's): polls start at most once a tick, and a cycle whose handling
already took longer than a tick, or whose poll came back full (a backlog), polls again at once
instead of waiting another tick."""

from __future__ import annotations

import threading
import time
from typing import Any

from libs.common.kafka import ProtoConsumerLoop


class RecordingConsumer:
    def __init__(self, records: int) -> None:
        self.polled_at: list[float] = []
        self.records = records

    def poll(self, timeout_ms: int = 0) -> dict[str, list[int]]:
        self.polled_at.append(time.monotonic())
        return {"tp": [1] * self.records}

    def assignment(self) -> set[Any]:
        return set()


def run_loop(tick_s: float, handle_s: float, polls: int, records: int = 1, max_poll_records: int = 500) -> list[float]:
    consumer = RecordingConsumer(records)
    loop: Any = ProtoConsumerLoop.__new__(ProtoConsumerLoop)
    loop._consumer = consumer
    loop._lock = threading.Lock()
    loop._stop = threading.Event()
    loop.group_id = "tick-unit"
    loop._poll_timeout_ms = 10
    loop._poll_tick_s = tick_s
    loop._polled_at = 0.0
    loop._max_poll_records = max_poll_records

    def process(_polled: Any) -> None:
        time.sleep(handle_s)
        if len(consumer.polled_at) >= polls:
            loop._stop.set()

    loop._process = process
    thread = threading.Thread(target=loop._run, daemon=True)
    thread.start()
    thread.join(30)
    assert not thread.is_alive()
    return [b - a for a, b in zip(consumer.polled_at, consumer.polled_at[1:], strict=False)]


def test_fast_cycles_poll_once_a_tick() -> None:
    gaps = run_loop(tick_s=0.2, handle_s=0.0, polls=5)
    assert len(gaps) == 4 and min(gaps) >= 0.2 - 1e-3, gaps


def test_a_cycle_longer_than_the_tick_polls_at_once() -> None:
    # Handling takes 0.5 s, the tick is 0.4 s: the next poll follows the handler (a tick kept by the
    # broker's fetch wait would add the 0.4 s on top of it: 0.9 s a cycle).
    gaps = run_loop(tick_s=0.4, handle_s=0.5, polls=4)
    assert len(gaps) == 3 and all(0.5 - 1e-3 <= g < 0.85 for g in gaps), gaps


def test_a_full_poll_polls_again_at_once() -> None:
    # A backlog: every poll returns max_poll_records. A tick here capped the event archiver at
    # 1,000 records a second, far behind the soak's writes.
    gaps = run_loop(tick_s=0.5, handle_s=0.0, polls=5, records=100, max_poll_records=100)
    assert len(gaps) == 4 and max(gaps) < 0.2, gaps


def test_a_poll_short_of_full_keeps_the_tick() -> None:
    gaps = run_loop(tick_s=0.3, handle_s=0.0, polls=4, records=99, max_poll_records=100)
    assert len(gaps) == 3 and min(gaps) >= 0.3 - 1e-3, gaps
