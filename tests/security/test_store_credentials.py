"""Store credentials come from the environment and reach the clients; passwords never print.

Redis is verified end to end: a private ``redis-server --requirepass`` (and one
with ``--tls-port``) and a real ingestion process configured only through env
vars. MongoDB and Kafka cannot be verified against a server here: nx-27017 has
no authentication and no TLS, and tansu's ``--authentication`` needs SCRAM users
that its memory storage cannot be given (``tansu user create`` itself needs an
authenticated connection). For those two the tests show the configuration
reaching the client objects, and that the Mongo driver really attempts SCRAM
when a user is configured.
"""

from __future__ import annotations

import secrets
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import redis
from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer
from pydantic import ValidationError
from pymongo import MongoClient
from stylerec.v1 import ingestion_pb2, ingestion_pb2_grpc

import libs.common.create_topics as create_topics
import libs.common.kafka as kafka_mod
from cli.localstack.stack import Stack, free_port, grpc_serving, terminate_group
from libs.common.kafka import ProtoConsumerLoop, ProtoProducer, ensure_topics, kafka_security
from libs.common.settings import ServiceSettings
from libs.common.stores import make_mongo, make_redis, mongo_client_options, redact_url
from services.ingestion.config import IngestionSettings
from services.ingestion.publisher import producer_config
from tests.ingestion.conftest import LIMITS_ENV, make_event
from tests.security.certs import CertAuthority

PASSWORD = "rp-" + secrets.token_hex(12)  # generated per run: nothing to commit, nothing to leak


@dataclass
class PrivateRedis:
    port: int
    tls_port: int
    ca_file: Path
    proc: subprocess.Popen[bytes]


def _wait_redis(port: int, **kw: Any) -> None:
    deadline = time.monotonic() + 15
    while True:
        try:
            if redis.Redis(port=port, password=PASSWORD, socket_timeout=1, **kw).ping():
                return
        except redis.RedisError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


@pytest.fixture(scope="module")
def private_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrivateRedis]:
    """redis-server with a password on a plain port and a TLS port (cert from a throwaway CA)."""
    d = tmp_path_factory.mktemp("redis-auth")
    ca = CertAuthority(d, "redis-test")
    leaf = ca.issue("redis")
    port, tls_port = free_port(), free_port()
    binary = shutil.which("redis-server")
    assert binary, "redis-server missing: run `make setup`"
    argv = [
        binary,
        "--port",
        str(port),
        "--bind",
        "127.0.0.1",
        "--requirepass",
        PASSWORD,
        "--tls-port",
        str(tls_port),
        "--tls-cert-file",
        str(leaf.cert),
        "--tls-key-file",
        str(leaf.key),
        "--tls-ca-cert-file",
        str(ca.ca_file),
        "--tls-auth-clients",
        "no",
        "--save",
        "",
        "--appendonly",
        "no",
        "--dir",
        str(d),
    ]
    with open(d / "redis.log", "ab") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_redis(port)
        yield PrivateRedis(port, tls_port, ca.ca_file, proc)
    finally:
        terminate_group(proc.pid, 10)


def _start_ingestion(infra: Stack, env: dict[str, str]) -> str:
    name = f"ingestion-cred-{uuid.uuid4().hex[:8]}"
    topic = f"cred-{uuid.uuid4().hex[:8]}"
    ensure_topics([infra.kafka_bootstrap], {topic: 1})
    infra.start_service(
        "ingestion",
        instance=name,
        extra_env={**LIMITS_ENV, "STYLEREC_ROLE": "api", "STYLEREC_EVENTS_TOPIC": topic, **env},
    )
    return name


def _log_text(infra: Stack, name: str) -> str:
    return Path(infra.components[name].log).read_text(errors="replace")


def _ingest_one(infra: Stack, name: str) -> ingestion_pb2.IngestEventsResponse:
    with grpc.insecure_channel(infra.addr_of(name)) as ch:
        stub = ingestion_pb2_grpc.IngestionServiceStub(ch)
        event = make_event(f"u-{uuid.uuid4().hex[:6]}", "item-1", event_id=f"e-{uuid.uuid4().hex}")
        resp: ingestion_pb2.IngestEventsResponse = stub.IngestEvents(
            ingestion_pb2.IngestEventsRequest(events=[event]), timeout=20
        )
        return resp


# ---------------------------------------------------------------- Redis, real processes


def test_ingestion_serves_with_redis_password_from_env(infra: Stack, private_redis: PrivateRedis) -> None:
    name = _start_ingestion(
        infra,
        {"STYLEREC_REDIS_URL": f"redis://127.0.0.1:{private_redis.port}/0", "STYLEREC_REDIS_PASSWORD": PASSWORD},
    )
    try:
        infra.wait_serving([name], timeout_s=60)
        resp = _ingest_one(infra, name)
        assert resp.accepted == 1
        # The dedup claim went to the password-protected Redis.
        assert redis.Redis(port=private_redis.port, password=PASSWORD).dbsize() >= 1
        assert PASSWORD not in _log_text(infra, name)
    finally:
        infra.stop_component(name)


def test_ingestion_with_wrong_redis_password_is_not_serving(infra: Stack, private_redis: PrivateRedis) -> None:
    name = _start_ingestion(
        infra,
        {
            "STYLEREC_REDIS_URL": f"redis://127.0.0.1:{private_redis.port}/0",
            "STYLEREC_REDIS_PASSWORD": "not-the-password",
            "STYLEREC_HEALTH_INTERVAL_S": "0.5",
        },
    )
    try:
        addr = infra.addr_of(name)
        deadline = time.monotonic() + 30
        while '"redis": false' not in _log_text(infra, name):  # the health loop's "dependency down" line
            assert time.monotonic() < deadline, _log_text(infra, name)[-2000:]
            time.sleep(0.3)
        assert not grpc_serving(addr)
        with pytest.raises(grpc.RpcError) as err:
            _ingest_one(infra, name)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE, err.value.details()
        assert "not-the-password" not in _log_text(infra, name)
    finally:
        infra.stop_component(name)


def test_ingestion_over_redis_tls_with_password_in_url(infra: Stack, private_redis: PrivateRedis) -> None:
    """rediss:// + CA file: TLS verified against our CA; the URL's password never reaches the log."""
    name = _start_ingestion(
        infra,
        {
            "STYLEREC_REDIS_URL": f"rediss://:{PASSWORD}@127.0.0.1:{private_redis.tls_port}/0",
            "STYLEREC_REDIS_TLS_CA_FILE": str(private_redis.ca_file),
        },
    )
    try:
        infra.wait_serving([name], timeout_s=60)
        assert _ingest_one(infra, name).accepted == 1
        assert PASSWORD not in _log_text(infra, name)
    finally:
        infra.stop_component(name)


def test_redis_tls_refuses_a_server_cert_from_another_ca(private_redis: PrivateRedis, tmp_path: Path) -> None:
    rogue = CertAuthority(tmp_path, "rogue")
    bad = make_redis(
        f"rediss://127.0.0.1:{private_redis.tls_port}/0", 1.0, 0, password=PASSWORD, tls_ca_file=str(rogue.ca_file)
    )
    with pytest.raises(redis.ConnectionError, match="certificate verify failed"):
        bad.ping()
    good = make_redis(
        f"rediss://127.0.0.1:{private_redis.tls_port}/0",
        1.0,
        0,
        password=PASSWORD,
        tls_ca_file=str(private_redis.ca_file),
    )
    assert good.ping()
    plain_no_password = make_redis(f"redis://127.0.0.1:{private_redis.port}/0", 1.0, 0)
    with pytest.raises(redis.AuthenticationError):
        plain_no_password.ping()


# ---------------------------------------------------------------- MongoDB


def test_mongo_credentials_reach_the_driver(infra: Stack, tmp_path: Path) -> None:
    ca = CertAuthority(tmp_path, "mongo-test")
    opts = mongo_client_options(2.0, username="svc", password="pw-x", auth_source="admin", tls_ca_file=str(ca.ca_file))
    assert opts["username"] == "svc" and opts["password"] == "pw-x" and opts["authSource"] == "admin"
    assert opts["tls"] is True and opts["tlsCAFile"] == str(ca.ca_file)
    client: MongoClient[Any] = MongoClient("mongodb://127.0.0.1:1", connect=False, **opts)
    try:
        creds = client.options.pool_options._credentials
        assert creds is not None and creds.username == "svc" and creds.source == "admin"
    finally:
        client.close()
    # Against the real (auth-less) nx-27017: without a user the ping works; with one the driver
    # starts a SCRAM conversation the server cannot hold, so the ping fails: the credentials
    # are on the wire, which is all this server can show.
    plain = make_mongo(infra.mongo_uri, 2.0)
    try:
        assert plain.admin.command("ping")["ok"] == 1
    finally:
        plain.close()
    authed = make_mongo(infra.mongo_uri, 2.0, username="svc", password="pw-x")
    try:
        with pytest.raises(Exception):  # noqa: B017 - whichever error the half-implemented handshake gives
            authed.admin.command("ping")
    finally:
        authed.close()


# ---------------------------------------------------------------- settings and Kafka, unit level


def test_passwords_never_in_settings_repr() -> None:
    s = ServiceSettings(
        redis_url="redis://:url-secret-1@h:6379/0",
        mongo_uri="mongodb://u:url-secret-2@h:27017",
        redis_password="env-secret-3",
        mongo_username="u",
        mongo_password="env-secret-4",
        kafka_security_protocol="SASL_SSL",
        kafka_sasl_username="k",
        kafka_sasl_password="env-secret-5",
    )
    text = repr(s) + str(s)
    for n in range(1, 6):
        assert f"secret-{n}" not in text
    assert redact_url(s.redis_url) == "redis://:***@h:6379/0"
    assert redact_url(s.mongo_uri) == "mongodb://u:***@h:27017"


@pytest.mark.parametrize(
    ("env", "fragment"),
    [
        ({"kafka_security_protocol": "SASL_SSL"}, "STYLEREC_KAFKA_SASL_USERNAME"),
        ({"kafka_ssl_cafile": "/etc/ca.pem"}, "SECURITY_PROTOCOL=SSL or SASL_SSL"),
        ({"mongo_username": "u"}, "must be set together"),
        ({"redis_tls_ca_file": "/etc/ca.pem"}, "rediss://"),
        ({"kafka_security_protocol": "SSL", "kafka_ssl_cafile": "/no/such/ca.pem"}, "not a readable file"),
    ],
)
def test_half_configured_credentials_stop_start_up(env: dict[str, Any], fragment: str) -> None:
    with pytest.raises(ValidationError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        ServiceSettings(**env)


def test_kafka_security_config(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("placeholder")
    assert kafka_security(ServiceSettings()) == {}
    sasl_ssl = kafka_security(
        ServiceSettings(
            kafka_security_protocol="SASL_SSL",
            kafka_sasl_mechanism="SCRAM-SHA-256",
            kafka_sasl_username="svc",
            kafka_sasl_password="pw",
            kafka_ssl_cafile=str(ca),
        )
    )
    assert sasl_ssl == {
        "security_protocol": "SASL_SSL",
        "ssl_check_hostname": True,
        "ssl_cafile": str(ca),
        "sasl_mechanism": "SCRAM-SHA-256",
        "sasl_plain_username": "svc",
        "sasl_plain_password": "pw",
    }
    ssl_only = kafka_security(ServiceSettings(kafka_security_protocol="SSL"))
    assert ssl_only == {"security_protocol": "SSL", "ssl_check_hostname": True}
    # Every key is a configuration kafka-python 3 knows for all three client kinds.
    for cls in (KafkaProducer, KafkaConsumer, KafkaAdminClient):
        assert set(sasl_ssl) <= set(cls.DEFAULT_CONFIG), cls.__name__


class _Recorder:
    """Stands in for a kafka-python client class (a unit test's faked collaborator): records kwargs."""

    calls: list[dict[str, Any]] = []

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        _Recorder.calls.append(kwargs)

    def subscribe(self, topics: list[str]) -> None:
        pass

    def list_topics(self) -> list[str]:
        return []

    def create_topics(self, topics: list[Any]) -> None:
        pass

    def describe_topics(self, topics: list[str]) -> list[dict[str, Any]]:
        return []

    def close(self, *args: Any, **kwargs: Any) -> None:
        pass


def test_every_kafka_client_gets_the_security_config(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = IngestionSettings(
        kafka_security_protocol="SASL_PLAINTEXT", kafka_sasl_username="svc", kafka_sasl_password="pw"
    )
    security = kafka_security(settings)
    for name in ("KafkaProducer", "KafkaConsumer", "KafkaAdminClient"):
        monkeypatch.setattr(kafka_mod, name, _Recorder)
    monkeypatch.setattr(create_topics, "KafkaAdminClient", _Recorder)
    _Recorder.calls = []
    ProtoProducer(["b:1"], client_id="t", security=security)
    ProtoConsumerLoop(
        bootstrap=["b:1"],
        group_id="g",
        topics=["t"],
        message_type=ingestion_pb2.IngestEventsRequest,
        handle=lambda batch: None,
        producer=None,  # type: ignore[arg-type]
        service="t",
        security=security,
    )
    ensure_topics(["b:1"], {"t": 1}, security=security)
    create_topics.create(["b:1"], 1, 5, security)
    assert len(_Recorder.calls) == 4
    for kwargs in _Recorder.calls:
        assert {k: kwargs[k] for k in security} == security
    # The ingestion front door builds its KafkaProducer from producer_config.
    config = producer_config(settings)
    assert {k: config[k] for k in security} == security
