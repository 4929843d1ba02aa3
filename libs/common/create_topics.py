"""Create StyleRec's Kafka topics on a real cluster: the compose ``kafka-init`` job and
the Kubernetes topic Job run ``python -m libs.common.create_topics``.

Why not ``kafka-topics.sh`` in the Kafka image: the topic list and partition
counts live in one place (:data:`libs.common.kafka.TOPICS`) that the services,
the embedded stack and this job all read, so a deployment can never create a
different set of topics than the code consumes. Unlike the embedded stack's
``ensure_topics`` it takes a replication factor, because a production cluster
has more than one broker. Idempotent: existing topics are left as they are
(a topic with fewer partitions than wanted is reported, not altered, because
adding partitions re-maps keys and breaks per-user ordering).
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from kafka import KafkaAdminClient
from kafka.admin import NewTopic
from kafka.errors import KafkaError, TopicAlreadyExistsError
from pydantic import ValidationError

from libs.common.kafka import TOPICS, kafka_security
from libs.common.settings import ServiceSettings


def connect(bootstrap: list[str], timeout_s: float, security: dict[str, Any] | None = None) -> KafkaAdminClient:
    """Retry until the brokers answer: in compose/k8s the job may start before Kafka is ready."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            left_ms = max(1000, int((deadline - time.monotonic()) * 1000))
            return KafkaAdminClient(
                bootstrap_servers=bootstrap,
                request_timeout_ms=10000,
                bootstrap_timeout_ms=min(10000, left_ms),
                client_id="create-topics",
                **(security or {}),
            )
        except KafkaError as exc:
            if time.monotonic() > deadline:
                raise SystemExit(
                    f"create_topics: brokers {bootstrap} unreachable after {timeout_s:.0f}s: {exc}"
                ) from exc
            time.sleep(1.0)


def create(
    bootstrap: list[str], replication_factor: int, timeout_s: float, security: dict[str, Any] | None = None
) -> list[str]:
    """Create the missing topics; returns the lines to print."""
    admin = connect(bootstrap, timeout_s, security)
    lines: list[str] = []
    try:
        existing = set(admin.list_topics())
        new = [NewTopic(name, n, replication_factor) for name, n in TOPICS.items() if name not in existing]
        for topic in new:
            try:
                admin.create_topics([topic])
                lines.append(f"created {topic.name} partitions={topic.num_partitions} rf={replication_factor}")
            except TopicAlreadyExistsError:
                lines.append(f"exists  {topic.name}")
        described = admin.describe_topics([t for t in TOPICS if t in existing])
        for desc in described:
            name = desc.get("name") or desc.get("topic")  # the key differs between kafka-python versions
            have = len(desc.get("partitions", []))
            want = TOPICS.get(name, 0)
            note = "" if have >= want else f" (WARNING: fewer than the {want} the code expects)"
            lines.append(f"exists  {name} partitions={have}{note}")
    finally:
        admin.close()
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m libs.common.create_topics", description="Create the StyleRec Kafka topics."
    )
    parser.add_argument(
        "--bootstrap", default="", help="host:port[,host:port] (default: $STYLEREC_KAFKA_BOOTSTRAP via settings)"
    )
    parser.add_argument("--replication-factor", type=int, default=1, help="replicas per partition (3 in production)")
    parser.add_argument("--timeout", type=float, default=120, help="seconds to wait for the brokers")
    args = parser.parse_args(argv)
    if args.replication_factor < 1:
        print("create_topics: --replication-factor must be >= 1", file=sys.stderr)
        return 2
    try:
        settings = ServiceSettings(kafka_bootstrap=args.bootstrap) if args.bootstrap else ServiceSettings()
    except ValidationError as exc:
        print(f"create_topics: bad configuration: {exc}", file=sys.stderr)
        return 2
    for line in create(settings.kafka_servers, args.replication_factor, args.timeout, kafka_security(settings)):
        print(line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
