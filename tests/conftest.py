"""Session fixtures: a real broker, Redis and Mongo-protocol server on free ports,
and the four services started exactly as `stylerec up` starts them.

Nothing here skips: if a binary is missing the fixture errors, and in CI
(CI=true) that is a failure, as it should be.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from cli.localstack.stack import SERVICES, Stack

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="session")
def infra(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """Broker + Redis + Mongo-protocol server, topics created."""
    stack = Stack(dir=tmp_path_factory.mktemp("stack"))
    try:
        stack.start_infra()
        yield stack
    finally:
        stack.down()


@pytest.fixture(scope="session")
def stack(infra: Stack) -> Iterator[Stack]:
    """The infra plus the four services, all SERVING."""
    infra.start_services(SERVICES, timeout_s=120)
    yield infra
    for name in SERVICES:
        infra.stop_component(name)


@pytest.fixture
def unique() -> str:
    """A short random token so tests sharing the session stack never collide."""
    return uuid.uuid4().hex[:10]


def channel_to(stack: Stack, name: str) -> grpc.Channel:
    return grpc.insecure_channel(stack.addr_of(name))


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")
