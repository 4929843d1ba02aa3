"""Shared pieces of the security tests: a throwaway PKI, caller tokens, env builders, /metrics reads."""

from __future__ import annotations

import json
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from libs.common.authz import token_digest
from tests.security.certs import CertAuthority, Leaf

# Callers every secured test service accepts: name -> (token, roles).
CALLERS: dict[str, tuple[str, list[str]]] = {
    "gateway": ("tok-gateway-7f3a", ["read"]),
    "shop": ("tok-shop-91c2", ["ingest", "read"]),
    "ops": ("tok-ops-55e0", ["admin", "read"]),
    "styler": ("tok-styler-0b1d", ["style"]),
}


def token(name: str) -> str:
    return CALLERS[name][0]


def callers_json() -> str:
    return json.dumps(
        [{"name": n, "token_sha256": token_digest(t), "roles": roles} for n, (t, roles) in CALLERS.items()]
    )


@dataclass(frozen=True)
class Pki:
    ca: CertAuthority
    server: Leaf  # what the services present (server cert, and client cert under mTLS)
    client: Leaf  # what test clients present under mTLS
    rogue_ca: CertAuthority  # an unrelated CA: trusting it must not reach our services
    rogue_client: Leaf  # a client cert from the rogue CA

    def server_env(self, mtls: bool = True, auth: bool = True) -> dict[str, str]:
        """Env of a service with TLS (and mTLS, auth) on; it trusts ``ca`` for peers."""
        env = {
            "STYLEREC_TLS_CERT_FILE": str(self.server.cert),
            "STYLEREC_TLS_KEY_FILE": str(self.server.key),
            "STYLEREC_TLS_CA_FILE": str(self.ca.ca_file),
            "STYLEREC_TLS_CLIENT_AUTH": "true" if mtls else "false",
        }
        if auth:
            env |= {"STYLEREC_AUTH_REQUIRED": "true", "STYLEREC_AUTH_CALLERS": callers_json()}
        return env

    def client_env(self, caller: str | None = None) -> dict[str, str]:
        """Env of a CLI client with the right CA and client cert (and a caller's token)."""
        env = {
            "STYLEREC_TLS_CA_FILE": str(self.ca.ca_file),
            "STYLEREC_TLS_CERT_FILE": str(self.client.cert),
            "STYLEREC_TLS_KEY_FILE": str(self.client.key),
        }
        if caller:
            env["STYLEREC_AUTH_TOKEN"] = token(caller)
        return env


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    d: Path = tmp_path_factory.mktemp("pki")
    ca = CertAuthority(d, "stylerec-test")
    rogue = CertAuthority(d, "rogue")
    return Pki(ca, ca.issue("service"), ca.issue("client"), rogue, rogue.issue("client"))


def metric_values(port: int, family: str) -> dict[tuple[tuple[str, str], ...], float]:
    """Samples of one counter family from a service's /metrics: sorted label pairs -> value."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    out: dict[tuple[tuple[str, str], ...], float] = {}
    for fam in text_string_to_metric_families(text):
        if fam.name != family:
            continue
        for sample in fam.samples:
            if sample.name == f"{family}_total":
                out[tuple(sorted(sample.labels.items()))] = sample.value
    return out


def metric(port: int, family: str, **labels: str) -> float:
    """Sum of the samples of ``family`` whose labels include ``labels``."""
    want = set(labels.items())
    return sum(v for k, v in metric_values(port, family).items() if want <= set(k))
