"""The two entry points the container images add: the gRPC health check (Docker
HEALTHCHECK / k8s exec fallback) and the topic-creation job, run as real processes
against real services and a real broker."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from kafka import KafkaAdminClient

from cli.localstack.stack import Stack, free_port, tansu_binary, terminate_group
from libs.common.kafka import TOPICS

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]


def run(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def test_healthcheck_serving_service(stack: Stack) -> None:
    res = run("libs.common.healthcheck", "--address", stack.addr_of("gateway"))
    assert res.returncode == 0, res.stderr
    assert "SERVING" in res.stdout


def test_healthcheck_reads_the_port_like_the_service(stack: Stack) -> None:
    # In the image only STYLEREC_GRPC_PORT is known; the check must find the server through it.
    port = str(stack.components["scoring"].port)
    res = run("libs.common.healthcheck", env={"STYLEREC_GRPC_PORT": port})
    assert res.returncode == 0, res.stderr


def test_healthcheck_liveness_name(stack: Stack) -> None:
    res = run("libs.common.healthcheck", "--address", stack.addr_of("ingestion"), "--service", "stylerec.liveness")
    assert res.returncode == 0, res.stderr


def test_healthcheck_fails_without_a_server() -> None:
    res = run("libs.common.healthcheck", "--address", f"127.0.0.1:{free_port()}", "--timeout", "1")
    assert res.returncode == 1
    assert "UNAVAILABLE" in res.stderr


def test_healthcheck_unknown_service_name_is_not_healthy(stack: Stack) -> None:
    res = run("libs.common.healthcheck", "--address", stack.addr_of("gateway"), "--service", "no.such.Service")
    assert res.returncode == 1
    assert "NOT_FOUND" in res.stderr


def test_healthcheck_bad_input() -> None:
    res = run("libs.common.healthcheck", "--timeout", "0")
    assert res.returncode == 2 and "--timeout" in res.stderr


@pytest.fixture
def fresh_broker(tmp_path: Path) -> Iterator[str]:
    """A new, empty broker (the session's already has every topic)."""
    port = free_port()
    log = open(tmp_path / "tansu.log", "wb")  # noqa: SIM115 - closed in finally
    proc = subprocess.Popen(
        [
            tansu_binary(),
            "broker",
            "--listener-url",
            f"tcp://127.0.0.1:{port}",
            "--advertised-listener-url",
            f"tcp://127.0.0.1:{port}",
            "--storage-engine",
            "memory://tansu/",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        yield f"127.0.0.1:{port}"
    finally:
        terminate_group(proc.pid, 10)
        log.close()


def test_create_topics_creates_then_is_idempotent(fresh_broker: str) -> None:
    first = run("libs.common.create_topics", "--bootstrap", fresh_broker, "--timeout", "30")
    assert first.returncode == 0, first.stderr
    for topic, partitions in TOPICS.items():
        assert f"created {topic} partitions={partitions} rf=1" in first.stdout, first.stdout
    second = run("libs.common.create_topics", "--bootstrap", fresh_broker, "--timeout", "30")
    assert second.returncode == 0, second.stderr
    assert "created" not in second.stdout
    for topic, partitions in TOPICS.items():
        assert f"exists  {topic} partitions={partitions}\n" in second.stdout, second.stdout
    admin = KafkaAdminClient(bootstrap_servers=[fresh_broker], request_timeout_ms=5000)
    try:
        deadline = time.monotonic() + 10
        while not set(TOPICS) <= set(admin.list_topics()) and time.monotonic() < deadline:
            time.sleep(0.2)
        described = {d["name"]: len(d["partitions"]) for d in admin.describe_topics(list(TOPICS))}
    finally:
        admin.close()
    assert described == TOPICS


def test_create_topics_bad_input() -> None:
    res = run("libs.common.create_topics", "--bootstrap", "no-port-here")
    assert res.returncode == 2 and "bad configuration" in res.stderr
    res = run("libs.common.create_topics", "--replication-factor", "0")
    assert res.returncode == 2 and "replication-factor" in res.stderr


def test_create_topics_gives_up_on_unreachable_brokers() -> None:
    res = run("libs.common.create_topics", "--bootstrap", f"127.0.0.1:{free_port()}", "--timeout", "2")
    assert res.returncode != 0
    assert "unreachable" in res.stderr
