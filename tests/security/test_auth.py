"""Caller authentication and authorization: bearer tokens against real gateway processes, the
failure counter on /metrics, the CLI with and without a token, and the interceptor's units
(permission table, constant-time lookup, the caller seen by the handler thread)."""

from __future__ import annotations

import hmac
import importlib
import os
import subprocess
import sys
from collections.abc import Iterator
from concurrent import futures
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from pydantic import SecretStr
from stylerec.v1 import gateway_pb2, gateway_pb2_grpc

from cli.localstack.stack import REPO, Stack
from libs.common import authz
from libs.common.auth import ANONYMOUS, current_caller
from libs.common.authz import PERMISSIONS, AuthInterceptor, Authorizer, Denial, token_digest
from libs.common.channels import ClientSecurity, make_channel
from libs.common.settings import AuthCaller, ServiceSettings
from tests.security.conftest import CALLERS, Pki, callers_json, metric, token

FAILURES = "stylerec_auth_failures"
GW = "stylerec.v1.GatewayService"


@pytest.fixture(scope="module")
def gateways(infra: Stack, pki: Pki) -> Iterator[Stack]:
    """gateway-auth: plaintext + tokens (the dev path: token by interceptor on an insecure channel);
    gateway-auth-tls: TLS + mTLS + tokens, for the CLI."""
    no_scoring = {"STYLEREC_SCORING_ADDR": ""}
    plain_auth = {"STYLEREC_AUTH_REQUIRED": "true", "STYLEREC_AUTH_CALLERS": callers_json()}
    try:
        infra.start_service("gateway", "gateway-auth", no_scoring | plain_auth)
        infra.start_service("gateway", "gateway-auth-tls", no_scoring | pki.server_env())
        infra.wait_serving(["gateway-auth", "gateway-auth-tls"], timeout_s=120)
        yield infra
    finally:
        infra.stop_component("gateway-auth")
        infra.stop_component("gateway-auth-tls")


def recommend(address: str, tok: str | None = None, metadata: list[tuple[str, str]] | None = None) -> str:
    sec = ClientSecurity(token=SecretStr(tok or ""))
    with make_channel(address, sec) as ch:
        try:
            gateway_pb2_grpc.GatewayServiceStub(ch).GetRecommendations(
                gateway_pb2.GetRecommendationsRequest(user_id="auth-user", k=3), timeout=10, metadata=metadata
            )
        except grpc.RpcError as exc:
            return exc.code().name
    return "OK"


def failures(stack: Stack, name: str) -> dict[str, float]:
    port = stack.components[name].metrics_port
    return {
        reason: metric(port, FAILURES, service=GW, method="GetRecommendations", reason=reason)
        for reason in ("missing_token", "invalid_token", "permission_denied")
    }


def test_tokens_decide_and_the_failure_counter_counts_exactly(gateways: Stack) -> None:
    addr = gateways.addr_of("gateway-auth")
    before = failures(gateways, "gateway-auth")
    assert recommend(addr) == "UNAUTHENTICATED"
    assert recommend(addr, "not-a-token") == "UNAUTHENTICATED"
    assert recommend(addr, metadata=[("authorization", f"Basic {token('gateway')}")]) == "UNAUTHENTICATED"
    assert recommend(addr, token("styler")) == "PERMISSION_DENIED"  # style role, gateway needs read
    assert recommend(addr, token("gateway")) == "OK"
    assert recommend(addr, token("shop")) == "OK"
    after = failures(gateways, "gateway-auth")
    assert {k: after[k] - before[k] for k in after} == {
        "missing_token": 1,
        "invalid_token": 2,
        "permission_denied": 1,
    }
    # Refused calls are counted by the RPC metrics too, with their codes.
    port = gateways.components["gateway-auth"].metrics_port
    handled = "stylerec_grpc_server_handled"
    assert metric(port, handled, grpc_method="GetRecommendations", grpc_code="UNAUTHENTICATED") >= 3


def test_streaming_rpc_is_guarded_and_health_stays_open(gateways: Stack) -> None:
    addr = gateways.addr_of("gateway-auth")
    with make_channel(addr) as ch:
        stream = gateway_pb2_grpc.GatewayServiceStub(ch).GetStylizedImage(
            gateway_pb2.GetStylizedImageRequest(), timeout=10
        )
        with pytest.raises(grpc.RpcError) as err:
            list(stream)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        resp = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
        assert resp.status == health_pb2.HealthCheckResponse.SERVING


def cli(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cli.main", *args], env=env, cwd=REPO, capture_output=True, text=True, timeout=120
    )


def test_cli_recommend_over_tls_with_and_without_the_token(gateways: Stack, pki: Pki) -> None:
    addr = gateways.addr_of("gateway-auth-tls")
    base = {k: v for k, v in os.environ.items() if not k.startswith("STYLEREC_")}
    res = cli(["recommend", "cli-user", "-k", "3", "--addr", addr, "--json"], base | pki.client_env("gateway"))
    assert res.returncode == 0, res.stdout + res.stderr
    assert '"strategy"' in res.stdout or res.stdout.strip().startswith("{")

    res = cli(["recommend", "cli-user", "--addr", addr], base | pki.client_env(None))
    assert res.returncode == 2, res.stdout + res.stderr
    assert "UNAUTHENTICATED" in res.stderr and "STYLEREC_AUTH_TOKEN" in res.stderr
    assert "Traceback" not in res.stderr

    res = cli(["recommend", "cli-user", "--addr", addr], base | {"STYLEREC_AUTH_TOKEN": token("gateway")})
    assert res.returncode == 2, res.stdout + res.stderr
    assert "UNAVAILABLE" in res.stderr and "STYLEREC_TLS_CA_FILE" in res.stderr


# ---------------------------------------------------------------- units of libs/common/authz.py


def caller(name: str, *roles: str) -> AuthCaller:
    return AuthCaller.model_validate({"name": name, "token_sha256": token_digest(f"t-{name}"), "roles": list(roles)})


def test_every_rpc_in_the_protos_has_a_role() -> None:
    """A new RPC must be added to PERMISSIONS (else it is refused with auth on); this catches it."""
    missing = []
    for module in ("ingestion_pb2", "scoring_pb2", "style_pb2", "gateway_pb2", "admin_pb2"):
        try:
            mod = importlib.import_module(f"stylerec.v1.{module}")
        except ImportError:
            continue  # admin.proto may not be generated yet
        for service in mod.DESCRIPTOR.services_by_name.values():
            for method in service.methods:
                full = f"/{service.full_name}/{method.name}"
                if full not in PERMISSIONS:
                    missing.append(full)
    assert not missing, f"RPCs without a role in libs/common/authz.py PERMISSIONS: {missing}"


def test_decisions() -> None:
    auth = Authorizer([caller("shop", "ingest", "read"), caller("ops", "admin")], required=True)
    md = lambda name: [("authorization", f"Bearer t-{name}")]  # noqa: E731
    assert auth.decide("/stylerec.v1.IngestionService/IngestEvents", md("shop")) == "shop"
    assert auth.decide("/stylerec.v1.ScoringService/Train", md("ops")) == "ops"
    denied = auth.decide("/stylerec.v1.ScoringService/Train", md("shop"))
    assert isinstance(denied, Denial) and denied.code == grpc.StatusCode.PERMISSION_DENIED
    assert "lacks role 'admin'" in denied.message
    unknown_method = auth.decide("/stylerec.v1.ScoringService/DropEverything", md("ops"))
    assert isinstance(unknown_method, Denial) and unknown_method.reason == "permission_denied"
    missing = auth.decide("/stylerec.v1.ScoringService/TopN", [])
    assert isinstance(missing, Denial) and missing.reason == "missing_token"
    assert missing.code == grpc.StatusCode.UNAUTHENTICATED
    for bad in ("Bearer ", "t-shop", "Basic t-shop", "Bearer t-nobody"):
        d = auth.decide("/stylerec.v1.ScoringService/TopN", [("authorization", bad)])
        assert isinstance(d, Denial) and d.reason == "invalid_token", bad
    two = auth.decide("/stylerec.v1.ScoringService/TopN", [*md("shop"), *md("ops")])
    assert isinstance(two, Denial) and two.reason == "invalid_token"
    assert auth.decide("/grpc.health.v1.Health/Check", []) == ANONYMOUS
    # Not required (migration): no token runs as anonymous, a presented token is still checked.
    lax = Authorizer([caller("shop", "read")], required=False)
    assert lax.decide("/stylerec.v1.ScoringService/TopN", []) == ANONYMOUS
    assert isinstance(lax.decide("/stylerec.v1.ScoringService/TopN", md("nobody")), Denial)


def test_token_lookup_compares_every_digest_whichever_matches(monkeypatch: pytest.MonkeyPatch) -> None:
    auth = Authorizer([caller(f"c{i}", "read") for i in range(5)], required=True)
    calls: list[int] = []
    real = hmac.compare_digest

    def counting(a: bytes, b: bytes) -> bool:
        calls.append(1)
        return real(a, b)

    monkeypatch.setattr(authz.hmac, "compare_digest", counting)
    for presented in ("t-c0", "t-c4", "t-unknown"):
        calls.clear()
        auth.identify(presented)
        assert len(calls) == 5, presented
    assert auth.identify("t-c3") == "c3" and auth.identify("t-x") is None


def test_callers_config_validation() -> None:
    good = {"name": "a", "token_sha256": token_digest("x"), "roles": ["read"]}
    with pytest.raises(ValueError, match="64-character hex"):
        AuthCaller.model_validate({**good, "token_sha256": "abc"})
    with pytest.raises(ValueError):
        AuthCaller.model_validate({**good, "roles": ["superuser"]})
    with pytest.raises(ValueError, match="unique"):
        ServiceSettings(auth_callers=[good, {**good, "token_sha256": token_digest("y")}])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="own token"):
        ServiceSettings(auth_callers=[good, {**good, "name": "b"}])  # type: ignore[list-item]
    s = ServiceSettings(auth_callers=[good], auth_token=SecretStr("secret-token"))  # type: ignore[list-item]
    assert token_digest("x") not in repr(s) and "secret-token" not in repr(s)
    assert set(CALLERS) == {"gateway", "shop", "ops", "styler"}


def identity(x: bytes) -> bytes:
    return x


@pytest.fixture
def in_process_server() -> Iterator[str]:
    """A real grpc server with the real interceptor and handlers that answer with current_caller()."""

    def unary(_req: bytes, _ctx: grpc.ServicerContext) -> bytes:
        return current_caller().encode()

    def server_stream(_req: bytes, _ctx: grpc.ServicerContext) -> Iterator[bytes]:
        yield current_caller().encode()
        yield current_caller().encode()

    def bidi(reqs: Iterator[bytes], _ctx: grpc.ServicerContext) -> Iterator[bytes]:
        for _ in reqs:
            yield current_caller().encode()

    handlers: dict[str, Any] = {
        "GetRecommendations": grpc.unary_unary_rpc_method_handler(unary, identity, identity),
        "GetStylizedImage": grpc.unary_stream_rpc_method_handler(server_stream, identity, identity),
    }
    ingest = {"StreamEvents": grpc.stream_stream_rpc_method_handler(bidi, identity, identity)}
    auth = Authorizer([caller("shop", "ingest", "read")], required=True)
    server = grpc.server(futures.ThreadPoolExecutor(4), interceptors=[AuthInterceptor(auth)])
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(GW, handlers),
            grpc.method_handlers_generic_handler("stylerec.v1.IngestionService", ingest),
        )
    )
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.stop(None)


def test_handler_thread_sees_the_caller(in_process_server: str) -> None:
    sec = ClientSecurity(token=SecretStr("t-shop"))
    with make_channel(in_process_server, sec) as ch:
        unary = ch.unary_unary(f"/{GW}/GetRecommendations", identity, identity)
        assert unary(b"", timeout=5) == b"shop"
        stream = ch.unary_stream(f"/{GW}/GetStylizedImage", identity, identity)
        assert list(stream(b"", timeout=5)) == [b"shop", b"shop"]
        bidi = ch.stream_stream("/stylerec.v1.IngestionService/StreamEvents", identity, identity)
        assert list(bidi(iter([b"a", b"b", b"c"]), timeout=5)) == [b"shop"] * 3
    with make_channel(in_process_server) as ch:
        with pytest.raises(grpc.RpcError) as err:
            ch.unary_unary(f"/{GW}/GetRecommendations", identity, identity)(b"", timeout=5)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    # Outside any call the caller is anonymous (nothing leaks from the handler threads).
    assert current_caller() == ANONYMOUS
