"""What the local stack hands its services for the embedded broker (unit test: no process starts)."""

from __future__ import annotations

from pathlib import Path

import pytest

from cli.localstack.stack import Component, Stack


def stack_at(tmp_path: Path) -> Stack:
    stack = Stack(dir=tmp_path)
    for n, name in enumerate(("kafka", "redis", "mongo")):
        stack.components[name] = Component(name=name, pid=0, port=40000 + n)
    return stack


def test_ingestion_lingers_for_the_embedded_broker_and_nothing_else_does(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """tansu's fetch cost grows with each partition's batch count, so the stack's ingestion batches
    for 25 ms; the service's own default (2 ms, for Apache Kafka) is left to every other deployment."""
    from services.ingestion.config import IngestionSettings

    monkeypatch.delenv("STYLEREC_KAFKA_LINGER_MS", raising=False)
    stack = stack_at(tmp_path)
    assert stack.service_env("ingestion", 1, 2)["STYLEREC_KAFKA_LINGER_MS"] == "25"
    assert "STYLEREC_KAFKA_LINGER_MS" not in stack.service_env("scoring", 1, 2)
    assert IngestionSettings().kafka_linger_ms == 2


def test_the_callers_environment_still_decides_the_linger(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STYLEREC_KAFKA_LINGER_MS", "5")
    assert stack_at(tmp_path).service_env("ingestion", 1, 2)["STYLEREC_KAFKA_LINGER_MS"] == "5"
