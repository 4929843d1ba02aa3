"""Fixtures for the gateway tests: real gateway processes on the session infra, seeded per the contracts.

Each gateway instance here uses its own Redis logical database (same real
redis-server) so that popularity and model-version keys other tests or the
scoring service write cannot change what these tests see. MongoDB ids are made
unique instead (the embedded Mongo-protocol server does not isolate databases).
"""

from __future__ import annotations

import io
import json
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import redis
from gridfs import GridFSBucket
from PIL import Image
from pymongo import MongoClient
from stylerec.v1 import gateway_pb2_grpc

from cli.localstack.stack import Component, Stack, free_port, redis_binary, terminate_group
from libs.common import keys
from libs.common.pseudonym import Pseudonymizer
from services.gateway.style import encode_embedding

SECRET = "gateway-test-secret"
GATEWAY_REDIS_DB = 7
pseudo = Pseudonymizer(SECRET)


@dataclass
class Gateway:
    component: Component
    redis: redis.Redis
    stub: gateway_pb2_grpc.GatewayServiceStub
    channel: grpc.Channel

    @property
    def address(self) -> str:
        return self.component.address


def png_bytes(color: tuple[int, int, int], size: int = 24) -> bytes:
    """A tiny solid-colour PNG with a stripe, so it decodes as a real photo would."""
    arr = np.zeros((size, size, 3), dtype=np.uint8)
    arr[:] = color
    arr[size // 3 : size // 2] = (255 - color[0], 255 - color[1], 255 - color[2])
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def unit(vec: list[float] | np.ndarray) -> np.ndarray:
    v = np.asarray(vec, dtype=np.float32)
    return v / np.linalg.norm(v)


def basis(i: int, mix: float = 0.0, j: int = 1) -> np.ndarray:
    """A unit 100-d vector mostly along axis i (optionally mixed with axis j)."""
    v = np.zeros(100, dtype=np.float32)
    v[i] = 1.0
    v[j] += mix
    return unit(v)


@pytest.fixture(scope="session")
def mongo(infra: Stack) -> Iterator[Any]:
    client: MongoClient[Any] = MongoClient(infra.mongo_uri, serverSelectionTimeoutMS=5000)
    yield client["stylerec"]
    client.close()


def start_gateway(infra: Stack, name: str, env: dict[str, str] | None = None, wait: bool = True) -> Gateway:
    redis_url = (env or {}).get("STYLEREC_REDIS_URL", f"redis://{infra.components['redis'].address}/{GATEWAY_REDIS_DB}")
    full_env = {
        "STYLEREC_PSEUDONYM_SECRET": SECRET,
        "STYLEREC_REDIS_URL": redis_url,
        "STYLEREC_SCORING_ADDR": "",
        "STYLEREC_HEALTH_INTERVAL_S": "0.5",
        "STYLEREC_LOG_LEVEL": "WARNING",
        # Replicas that share one Redis share the invalidation group; these use their own Redis db.
        "STYLEREC_ITEM_UPDATES_GROUP": f"gateway-item-cache-{name}",
        **(env or {}),
    }
    comp = infra.start_service("gateway", instance=name, extra_env=full_env)
    if wait:
        infra.wait_serving([name], timeout_s=60)
    channel = grpc.insecure_channel(comp.address)
    return Gateway(comp, redis.Redis.from_url(redis_url), gateway_pb2_grpc.GatewayServiceStub(channel), channel)


@pytest.fixture
def gateway_factory(infra: Stack) -> Iterator[Callable[..., Gateway]]:
    started: list[Gateway] = []

    def make(name: str, env: dict[str, str] | None = None, wait: bool = True) -> Gateway:
        gw = start_gateway(infra, name, env, wait)
        started.append(gw)
        return gw

    yield make
    for gw in started:
        gw.channel.close()
        infra.stop_component(gw.component.name)


@pytest.fixture(scope="module")
def gateway(infra: Stack) -> Iterator[Gateway]:
    """One shared gateway (no scoring configured) for the read-path tests of a module."""
    name = f"gw-{int(time.time() * 1000) % 10_000_000}"
    gw = start_gateway(infra, name)
    yield gw
    gw.channel.close()
    infra.stop_component(name)


class Seeder:
    """Writes the stores exactly as the contracts say their owners do (docs/contracts.md)."""

    def __init__(self, r: redis.Redis, db: Any) -> None:
        self.r = r
        self.db = db
        self.fs = GridFSBucket(db)

    def item(
        self,
        item_id: str,
        *,
        title: str = "",
        category: str = "gifts",
        price: float = 5.0,
        photo: bytes | None = None,
        embedding: np.ndarray | None = None,
    ) -> str:
        ref = ""
        if photo is not None:
            ref = str(
                self.fs.upload_from_stream(
                    f"{item_id}.png", io.BytesIO(photo), metadata={"kind": "item-image", "item_id": item_id}
                )
            )
        self.db["items"].replace_one(
            {"_id": item_id},
            {
                "_id": item_id,
                "title": title or f"Item {item_id}",
                "category": category,
                "brand": "test",
                "price": price,
                "attributes": {},
                "image_ref": ref,
                "created_at": time.time(),
                "updated_at": time.time(),
            },
            upsert=True,
        )
        if embedding is not None:
            self.r.set(keys.item_embedding(item_id), encode_embedding(embedding))
            self.r.incr(keys.item_embeddings_version())  # as the style worker does
        return ref

    def recs(self, user: str, scores: dict[str, float], version: str = "test-model-1") -> None:
        self.r.hset(keys.recs(user), mapping=scores)  # type: ignore[arg-type]
        self.r.hset(keys.recs_meta(user), mapping={"model_version": version, "updated_at": str(int(time.time()))})
        self.known(user)
        self.changed(user)

    def known(self, user: str) -> None:
        """Scoring's marker that it holds state for the user, set with each of its writes."""
        self.r.set(keys.user_known(user), b"1")

    def changed(self, user: str) -> None:
        """Scoring announces every user write (docs/contracts.md): gateways drop kept answers."""
        self.r.publish(keys.user_changes_channel(), user)

    def seen(self, user: str, items: list[str]) -> None:
        self.r.sadd(keys.user_seen(user), *items)
        self.known(user)
        self.changed(user)

    def profile(self, user: str, vector: np.ndarray, confidence: float, anchor: str) -> None:
        self.r.hset(
            keys.style_profile(user),
            mapping={
                "vector": encode_embedding(vector),
                "confidence": str(confidence),
                "anchor": anchor,
                "updated_at": str(int(time.time())),
            },
        )
        self.changed(user)

    def popular(self, scores: dict[str, float], category: str = "") -> None:
        self.r.zadd(keys.popular(category), scores)  # type: ignore[arg-type]

    def stylized(self, content: str, style: str, image: bytes) -> str:
        ref = str(
            self.fs.upload_from_stream(
                f"{content}--{style}.png",
                io.BytesIO(image),
                metadata={"kind": "stylized", "content_type": "image/png"},
            )
        )
        self.r.set(keys.stylized(content, style), ref, ex=3600)
        self.r.publish(keys.stylized_ready_channel(), json.dumps([content, style]))  # as the style worker does
        return ref


@pytest.fixture
def seed(gateway: Gateway, mongo: Any) -> Seeder:
    return Seeder(gateway.redis, mongo)


@dataclass
class RedisProcess:
    port: int
    pid: int
    dir: Path

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def stop(self) -> None:
        terminate_group(self.pid, 10)


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisProcess]:
    """A private redis-server this test may stop without disturbing anyone else."""
    port = free_port()
    proc = subprocess.Popen(
        [redis_binary(), "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    rp = RedisProcess(port, proc.pid, tmp_path)
    deadline = time.monotonic() + 10
    while True:
        try:
            if redis.Redis(port=port, socket_timeout=0.5).ping():
                break
        except redis.RedisError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
    yield rp
    rp.stop()
    proc.wait(timeout=5)


@pytest.fixture
def blackhole() -> Iterator[str]:
    """host:port of a listener that completes TCP handshakes but never answers (a hung dependency)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    yield f"127.0.0.1:{sock.getsockname()[1]}"
    sock.close()
