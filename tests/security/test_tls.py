"""TLS and mTLS between real service processes: who gets through the handshake and who does not.

Scoring, ingestion and the gateway run with TLS + mTLS + bearer-token auth (the
gateway presents its cert and token to scoring). Refused: a plaintext client,
a client trusting another CA, a client without a certificate, a client whose
certificate another CA signed. Accepted: the right CA + cert + token, end to
end (events in over TLS, a recommendation out through gateway -> scoring).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import grpc
import pytest
import redis
from grpc_health.v1 import health_pb2, health_pb2_grpc
from pydantic import SecretStr
from stylerec.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc, ingestion_pb2, ingestion_pb2_grpc

from cli.localstack.stack import REPO, Stack
from libs.common import keys
from libs.common.channels import ClientSecurity, make_channel
from libs.common.healthcheck import check
from libs.common.settings import ServiceSettings
from libs.common.tls import KeyPair, TLSConfigError, server_credentials
from tests.security.certs import CertAuthority
from tests.security.conftest import Pki, metric, token

T = TypeVar("T")
HANDLED = "stylerec_grpc_server_handled"


def poll(what: str, fn: Callable[[], T], ok: Callable[[T], bool], timeout_s: float = 60) -> T:
    end = time.monotonic() + timeout_s
    while True:
        value = fn()
        if ok(value):
            return value
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}; last: {value}")
        time.sleep(0.5)


def security(
    pki: Pki, caller: str | None = "shop", cert: bool = True, ca: CertAuthority | None = None
) -> ClientSecurity:
    roots = (ca or pki.ca).ca_file.read_bytes()
    token_ = token(caller) if caller else ""
    if not cert:
        return ClientSecurity(roots, token=SecretStr(token_))
    return ClientSecurity(roots, pki.client.cert.read_bytes(), pki.client.key.read_bytes(), "", SecretStr(token_))


@pytest.fixture(scope="module")
def secure(infra: Stack, pki: Pki) -> Iterator[Stack]:
    """scoring, ingestion and gateway with TLS + mTLS + auth; the gateway calls scoring over it."""
    names = ["scoring-tls", "ingestion-tls", "gateway-tls"]
    try:
        infra.start_service("scoring", "scoring-tls", pki.server_env())
        infra.start_service("ingestion", "ingestion-tls", pki.server_env() | {"STYLEREC_ROLE": "api"})
        gw_env = pki.server_env() | {
            "STYLEREC_SCORING_ADDR": infra.addr_of("scoring-tls"),
            "STYLEREC_AUTH_TOKEN": token("gateway"),
            "STYLEREC_SCORING_TIMEOUT_S": "2",
        }
        infra.start_service("gateway", "gateway-tls", gw_env)
        # The Stack's own health checks speak TLS/mTLS here (from each service's env).
        infra.wait_serving(names, timeout_s=180)
        yield infra
    finally:
        for name in names:
            infra.stop_component(name)


def health(address: str, sec: ClientSecurity | None) -> str:
    with make_channel(address, sec) as ch:
        try:
            resp = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
        except grpc.RpcError as exc:
            return f"{exc.code().name}: {exc.details()}"
        return health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)


def test_only_the_right_ca_and_client_cert_complete_the_handshake(secure: Stack, pki: Pki) -> None:
    addr = secure.addr_of("scoring-tls")
    assert health(addr, security(pki)) == "SERVING"
    assert health(addr, None).startswith("UNAVAILABLE"), "plaintext client must be refused"
    assert health(addr, security(pki, ca=pki.rogue_ca)).startswith("UNAVAILABLE"), "wrong CA must be refused"
    assert health(addr, security(pki, cert=False)).startswith("UNAVAILABLE"), "mTLS without client cert"
    rogue = ClientSecurity(
        pki.ca.ca_file.read_bytes(), pki.rogue_client.cert.read_bytes(), pki.rogue_client.key.read_bytes()
    )
    assert health(addr, rogue).startswith("UNAVAILABLE"), "client cert from another CA must be refused"


def test_wrong_server_name_is_refused(secure: Stack, pki: Pki) -> None:
    sec = security(pki)
    named = ClientSecurity(sec.root_pem, sec.cert_pem, sec.key_pem, "scoring.example.com", sec.token)
    assert health(secure.addr_of("scoring-tls"), named).startswith("UNAVAILABLE")
    ok = ClientSecurity(sec.root_pem, sec.cert_pem, sec.key_pem, "localhost", sec.token)
    assert health(secure.addr_of("scoring-tls"), ok) == "SERVING"


def mark_known(stack: Stack, gateway: str, raw_user: str) -> None:
    """Scoring's user_known marker for ``raw_user``, in the Redis the gateway reads."""
    url = stack.env_of(gateway).get("STYLEREC_REDIS_URL") or stack.redis_url
    r = redis.Redis.from_url(url)
    try:
        r.set(keys.user_known(stack.pseudonymizer(gateway)(raw_user)), b"1", ex=600)
    finally:
        r.close()


def test_events_in_over_tls_and_a_recommendation_out_through_gateway_and_scoring(
    secure: Stack, pki: Pki, unique: str
) -> None:
    now = time.time()
    events = []
    # The popular list (top 200) is the session's whole infra topic: earlier tests' items must not
    # outrank this one. 30 purchases (weight 300) stay above the bulk-ingest tests' views (a clean-clone
    # CI run with 80 views on each of 997 items pushed 6 purchases, weight 60, out of the list).
    for n in range(30):
        e = common_pb2.Event(
            user_id=f"tls-u{n}-{unique}",
            item_id=f"tls-item-{unique}",
            type=common_pb2.PURCHASE,
            event_id=f"{unique}-{n}",
        )
        e.timestamp.FromNanoseconds(int((now - n) * 1e9))
        events.append(e)
    with make_channel(secure.addr_of("ingestion-tls"), security(pki, "shop")) as ch:
        resp = ingestion_pb2_grpc.IngestionServiceStub(ch).IngestEvents(
            ingestion_pb2.IngestEventsRequest(events=events), timeout=30
        )
    assert resp.accepted == len(events) and not resp.rejected

    scoring_port = secure.components["scoring-tls"].metrics_port
    before = metric(scoring_port, HANDLED, grpc_method="TopN", grpc_code="OK")
    stranger = f"tls-stranger-{unique}"
    # A shopper scoring knows (its marker, as scoring's writes leave it) whose recs are not in
    # Redis: the gateway asks scoring's TopN, over TLS + mTLS with its token. (One scoring never
    # saw is answered from popularity without the call.)
    mark_known(secure, "gateway-tls", stranger)

    def ask() -> gateway_pb2.GetRecommendationsResponse:
        with make_channel(secure.addr_of("gateway-tls"), security(pki, "gateway")) as ch:
            return gateway_pb2_grpc.GatewayServiceStub(ch).GetRecommendations(
                gateway_pb2.GetRecommendationsRequest(user_id=stranger, k=200), timeout=10
            )

    # The item becomes popular once scoring has consumed the events; the stranger has no recs in
    # Redis, so the gateway asks scoring's TopN first.
    got = poll(
        "the TLS gateway to answer with the new popular item, not degraded",
        ask,
        lambda r: not r.degraded and any(i.item_id == f"tls-item-{unique}" for i in r.items),
        120,
    )
    assert got.strategy == gateway_pb2.POPULAR
    assert metric(scoring_port, HANDLED, grpc_method="TopN", grpc_code="OK") > before
    assert metric(scoring_port, "stylerec_auth_failures") == 0


def test_gateway_without_a_client_cert_is_refused_by_scoring_and_says_so(
    infra: Stack, secure: Stack, pki: Pki, unique: str
) -> None:
    """Service to service: a gateway that trusts the CA but has no certificate cannot reach an mTLS
    scoring; it answers degraded, naming scoring, instead of failing."""
    env = {
        "STYLEREC_SCORING_ADDR": secure.addr_of("scoring-tls"),
        "STYLEREC_TLS_CA_FILE": str(pki.ca.ca_file),
        "STYLEREC_AUTH_TOKEN": token("gateway"),
    }
    infra.start_service("gateway", "gateway-nocert", env)
    try:
        infra.wait_serving(["gateway-nocert"], timeout_s=120)
        mark_known(infra, "gateway-nocert", f"nocert-{unique}")  # so the gateway asks scoring
        with make_channel(infra.addr_of("gateway-nocert")) as ch:
            resp = gateway_pb2_grpc.GatewayServiceStub(ch).GetRecommendations(
                gateway_pb2.GetRecommendationsRequest(user_id=f"nocert-{unique}", k=5), timeout=10
            )
        assert resp.degraded and "scoring" in resp.degraded_reason, resp
    finally:
        infra.stop_component("gateway-nocert")


def test_healthcheck_module_speaks_tls_with_the_services_own_settings(secure: Stack, pki: Pki) -> None:
    comp = secure.components["scoring-tls"]
    env = {**os.environ, **pki.server_env(), "STYLEREC_GRPC_PORT": str(comp.port)}
    res = subprocess.run(
        [sys.executable, "-m", "libs.common.healthcheck"], env=env, cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert res.returncode == 0, res.stdout + res.stderr
    assert "SERVING" in res.stdout
    ok, text = check(comp.address, "", 5, None)
    assert not ok, text


def run_service_expecting_exit(module: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", module],
        env={**os.environ, "STYLEREC_GRPC_PORT": "0", "STYLEREC_METRICS_PORT": "0", **env},
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_prod_refuses_plaintext_and_open_access(infra: Stack) -> None:
    res = run_service_expecting_exit(
        "services.gateway",
        {"STYLEREC_MODE": "prod", "STYLEREC_PSEUDONYM_SECRET": "x" * 32, "STYLEREC_REDIS_URL": infra.redis_url},
    )
    out = res.stdout + res.stderr
    assert res.returncode == 2, out
    assert "refuses plaintext gRPC" in out and "STYLEREC_TLS_CERT_FILE" in out
    assert "refuses unauthenticated access" in out


def test_mismatched_key_stops_the_service_naming_the_files(infra: Stack, pki: Pki) -> None:
    env = {
        "STYLEREC_TLS_CERT_FILE": str(pki.server.cert),
        "STYLEREC_TLS_KEY_FILE": str(pki.client.key),
        "STYLEREC_REDIS_URL": infra.redis_url,
    }
    res = run_service_expecting_exit("services.gateway", env)
    out = res.stdout + res.stderr
    assert res.returncode == 2, out
    assert f"STYLEREC_TLS_KEY_FILE={pki.client.key} is not the private key of" in out


# ---------------------------------------------------------------- units of libs/common/tls.py


def test_keypair_checks(pki: Pki, tmp_path: Path) -> None:
    pair = KeyPair.load(str(pki.server.cert), str(pki.server.key))
    assert pair.names() == ["localhost", "127.0.0.1"]
    with pytest.raises(TLSConfigError, match="cannot read"):
        KeyPair.load(str(tmp_path / "nope.pem"), str(pki.server.key))
    (tmp_path / "junk.pem").write_text("hello")
    with pytest.raises(TLSConfigError, match="not a PEM file"):
        KeyPair.load(str(tmp_path / "junk.pem"), str(pki.server.key))
    with pytest.raises(TLSConfigError, match="is not the private key"):
        KeyPair.load(str(pki.server.cert), str(pki.client.key))
    expired = pki.ca.issue("expired", days=-1)
    with pytest.raises(TLSConfigError, match="expired"):
        KeyPair.load(str(expired.cert), str(expired.key))
    with pytest.raises(TLSConfigError, match="STYLEREC_TLS_CA_FILE"):
        server_credentials(str(pki.server.cert), str(pki.server.key), str(tmp_path / "missing-ca.pem"))


def test_security_problems_and_client_config(pki: Pki) -> None:
    assert ServiceSettings().security_problems() == []
    half = ServiceSettings(tls_cert_file=str(pki.server.cert))
    assert any("set together" in p for p in half.security_problems())
    mtls_no_ca = ServiceSettings(
        tls_cert_file=str(pki.server.cert), tls_key_file=str(pki.server.key), tls_client_auth=True
    )
    assert any("needs STYLEREC_TLS_CA_FILE" in p for p in mtls_no_ca.security_problems())
    assert any("AUTH_CALLERS is empty" in p for p in ServiceSettings(auth_required=True).security_problems())
    # A client without a CA is plaintext; with one it is TLS and presents its cert/key.
    assert not ClientSecurity.from_settings(ServiceSettings()).tls
    sec = ClientSecurity.from_env(pki.client_env("shop"))
    assert sec.tls and sec.cert_pem == pki.client.cert.read_bytes() and sec.token.get_secret_value() == token("shop")
    assert "tok-" not in repr(sec)
