"""Consumer-lag series follow the partition assignment (unit test; the KafkaConsumer is
faked because a rebalance cannot be provoked deterministically on the shared broker).

The lag alert and the dashboard sum stylerec_kafka_consumer_lag_messages over replicas;
a replica that kept reporting partitions it lost in a rebalance would be counted twice.
"""

from __future__ import annotations

import threading
from typing import Any

from kafka import TopicPartition
from prometheus_client import REGISTRY

from libs.common.kafka import ProtoConsumerLoop


class FakeConsumer:
    def __init__(self) -> None:
        self.assigned: set[TopicPartition] = set()
        self.ends: dict[TopicPartition, int] = {}
        self.positions: dict[TopicPartition, int] = {}

    def assignment(self) -> set[TopicPartition]:
        return set(self.assigned)

    def end_offsets(self, tps: list[TopicPartition]) -> dict[TopicPartition, int]:
        return {tp: self.ends[tp] for tp in tps}

    def position(self, tp: TopicPartition, timeout_ms: int = 0) -> int:
        return self.positions[tp]


def loop_with(consumer: FakeConsumer, group: str) -> Any:
    loop: Any = ProtoConsumerLoop.__new__(ProtoConsumerLoop)
    loop._consumer = consumer
    loop._lock = threading.Lock()
    loop.group_id = group
    loop._lag_every_s = 0.0
    loop._lag_at = 0.0
    loop._lag_series = set()
    return loop


def lag(group: str, topic: str, partition: int) -> float | None:
    return REGISTRY.get_sample_value(
        "stylerec_kafka_consumer_lag_messages", {"group": group, "topic": topic, "partition": str(partition)}
    )


def test_lag_series_of_revoked_partitions_are_removed() -> None:
    group = "ops-lag-unit"
    p0, p1 = TopicPartition("t-ops", 0), TopicPartition("t-ops", 1)
    consumer = FakeConsumer()
    consumer.assigned = {p0, p1}
    consumer.ends = {p0: 100, p1: 50}
    consumer.positions = {p0: 40, p1: 50}
    loop = loop_with(consumer, group)
    loop._export_lag()
    assert lag(group, "t-ops", 0) == 60
    assert lag(group, "t-ops", 1) == 0

    consumer.assigned = {p1}  # p0 moved to another replica
    consumer.ends[p1] = 70
    loop._export_lag()
    assert lag(group, "t-ops", 0) is None, "a revoked partition must not keep reporting its old lag"
    assert lag(group, "t-ops", 1) == 20

    consumer.assigned = set()  # all revoked
    loop._export_lag()
    assert lag(group, "t-ops", 1) is None
