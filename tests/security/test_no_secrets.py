"""Nothing secret is committed: every tracked file is scanned for private keys, cloud access keys,
passwords inside URLs, Kubernetes Secret manifests carrying values, and high-entropy strings
assigned to names such as password/secret/token.

What is fake on purpose is allow-listed below, each entry with its reason; anything else the
scanner finds fails the test with file:line. The scanner itself is tested on planted secrets,
so a rule that silently stopped matching would fail too.
"""

from __future__ import annotations

import fnmatch
import math
import re
import subprocess
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
MAX_BYTES = 2 * 1024 * 1024

PRIVATE_KEY = re.compile(r"-----BEGIN ((RSA|EC|DSA|OPENSSH|ENCRYPTED|PGP) )?PRIVATE KEY( BLOCK)?-----")
AWS_KEY_ID = re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b")
AWS_SECRET = re.compile(r"(?i)aws_?secret_?access_?key\W{0,3}[:=]\s*[\"']?([A-Za-z0-9/+=]{40})\b")
URL_PASSWORD = re.compile(r"\b[a-z][a-z0-9+.-]*://[^\s/:@'\"`]*:([^\s@/'\"`]+)@")
ASSIGNED = re.compile(
    r"(?i)\b([\w.-]*(?:password|passwd|secret|token|api[_-]?key|private[_-]?key|credential)[\w.-]*)[\"']?"
    r"\s*(?::|=|:=)\s*[\"']([^\"'\s]{12,})[\"']"
)
# Obvious stand-ins inside URLs (docs show where a password would go).
URL_PLACEHOLDERS = {"pw", "pass", "password", "secret", "x", "***"}
# Lowercase words joined by - _ . (with at most a short hex/number suffix) read as labels, not keys.
WORDY = re.compile(r"[a-z]+(?:[-_.][a-z]+)*(?:[-_][0-9a-f]{1,6})?")
# Where a literal secret would end up in a running system: any literal assigned to a secret-ish
# name there is flagged, random-looking or not (tests and docs only by entropy).
PRODUCT_CODE = ("libs/", "services/", "cli/", "deploy/", "scripts/", "docker-compose.yml", "Makefile")


@dataclass(frozen=True)
class Finding:
    path: str
    line: int
    rule: str
    excerpt: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.rule}: {self.excerpt}"


@dataclass(frozen=True)
class Allowed:
    path: str  # fnmatch pattern
    rule: str
    contains: str  # the finding's excerpt must contain this
    reason: str


ALLOWED: tuple[Allowed, ...] = (
    Allowed(
        "libs/common/settings.py",
        "hardcoded-secret",
        "stylerec-dev-secret-do-not-use-in-production",
        "the public DEV pseudonym key; STYLEREC_MODE=prod refuses to start with it "
        "(ServiceSettings.effective_pseudonym_secret)",
    ),
    Allowed(
        "deploy/k8s/overlays/dev/kustomization.yaml",
        "k8s-secret-values",
        "secretGenerator stylerec-secrets",
        "dev overlay's throw-away values (a dev pseudonym key, password-less in-namespace store URLs); "
        "prod expects the operator's Secrets",
    ),
    Allowed(
        "tests/security/test_store_credentials.py",
        "url-password",
        "url-secret-",
        "fake passwords a test feeds to the settings to show they never reach repr/str",
    ),
    Allowed(
        "tests/security/test_no_secrets.py",
        "*",
        "",
        "the planted secrets of this scanner's own tests (built at run time, but the rules see their parts)",
    ),
)


def _line_of(text: str, pos: int) -> int:
    return text.count("\n", 0, pos) + 1


def entropy(s: str) -> float:
    """Shannon entropy in bits per character."""
    counts = Counter(s)
    return -sum(n / len(s) * math.log2(n / len(s)) for n in counts.values())


def _placeholder(value: str) -> bool:
    v = value.strip()
    return (
        v.lower() in URL_PLACEHOLDERS
        or v[:1] in "$<{%*"
        or re.fullmatch(r"[A-Z][A-Z0-9_]*", v) is not None  # PASSWORD, USER_PASSWORD
    )


def _looks_like_code(value: str) -> bool:
    """Identifiers, dotted names, paths and env var names are not secrets."""
    return bool(
        re.fullmatch(r"[A-Za-z_][A-Za-z0-9]*(?:[._][A-Za-z0-9]+)+(\(\))?", value)  # snake_case, dotted.names
        or re.fullmatch(r"[a-z_]+(\(\))?", value)
        or value.startswith(("/", "./", "http://", "https://"))
        or re.fullmatch(r"STYLEREC_[A-Z0-9_]+", value)
    )


def scan_text(path: str, text: str) -> list[Finding]:
    found: list[Finding] = []
    for m in PRIVATE_KEY.finditer(text):
        found.append(Finding(path, _line_of(text, m.start()), "private-key", m.group(0)))
    for m in AWS_KEY_ID.finditer(text):
        found.append(Finding(path, _line_of(text, m.start()), "aws-access-key-id", m.group(0)))
    for m in AWS_SECRET.finditer(text):
        found.append(Finding(path, _line_of(text, m.start()), "aws-secret-key", m.group(0)[:40]))
    for m in URL_PASSWORD.finditer(text):
        if not _placeholder(m.group(1)):
            found.append(Finding(path, _line_of(text, m.start()), "url-password", m.group(0)))
    for m in ASSIGNED.finditer(text):
        value = m.group(2)
        if _placeholder(value) or _looks_like_code(value):
            continue
        if path.startswith(PRODUCT_CODE):
            found.append(Finding(path, _line_of(text, m.start()), "hardcoded-secret", m.group(0)[:120]))
        elif entropy(value) >= 3.5 and not WORDY.fullmatch(value):
            found.append(Finding(path, _line_of(text, m.start()), "assigned-high-entropy", m.group(0)[:120]))
    if path.endswith((".yaml", ".yml")):
        found.extend(_scan_yaml(path, text))
    return found


def _scan_yaml(path: str, text: str) -> list[Finding]:
    found: list[Finding] = []
    try:
        docs = [d for d in yaml.safe_load_all(text) if isinstance(d, dict)]
    except yaml.YAMLError:
        return found  # templated YAML (e.g. Helm) is covered by the text rules
    for doc in docs:
        if doc.get("kind") == "Secret" and (doc.get("data") or doc.get("stringData")):
            name = (doc.get("metadata") or {}).get("name", "?")
            found.append(Finding(path, 1, "k8s-secret-values", f"Secret {name} carries data/stringData"))
        generators: list[Any] = doc.get("secretGenerator") or []
        for gen in generators:
            if gen.get("literals") or gen.get("files") or gen.get("envs"):
                found.append(
                    Finding(path, 1, "k8s-secret-values", f"secretGenerator {gen.get('name', '?')} carries values")
                )
    return found


def allowed(f: Finding) -> bool:
    return any(fnmatch.fnmatch(f.path, a.path) and a.rule in ("*", f.rule) and a.contains in f.excerpt for a in ALLOWED)


def tracked_files() -> list[str]:
    out = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    return [p for p in out.decode().split("\0") if p]


def scan_repository() -> list[Finding]:
    findings: list[Finding] = []
    for rel in tracked_files():
        p = REPO / rel
        if not p.is_file() or p.stat().st_size > MAX_BYTES:
            continue
        data = p.read_bytes()
        if b"\0" in data[:8192]:
            continue  # binary
        findings.extend(scan_text(rel, data.decode("utf-8", errors="replace")))
    return findings


# ---------------------------------------------------------------- the repository


def test_no_secret_is_committed() -> None:
    files = tracked_files()
    assert len(files) > 100, "git ls-files found too little: is this the repository?"
    leaks = [f for f in scan_repository() if not allowed(f)]
    assert not leaks, "secrets in tracked files (fix, or allow-list with a reason):\n" + "\n".join(map(str, leaks))


def test_every_allow_list_entry_is_still_needed() -> None:
    """A stale entry would silently allow a future real secret at that place."""
    findings = scan_repository()
    for a in ALLOWED:
        if a.path == "tests/security/test_no_secrets.py":
            continue
        assert any(
            fnmatch.fnmatch(f.path, a.path) and a.rule in ("*", f.rule) and a.contains in f.excerpt for f in findings
        ), f"allow-list entry no longer matches anything: {a}"


# ---------------------------------------------------------------- the scanner on planted secrets

# Assembled at run time so this file holds no literal that a real scanner (or this one) flags.
_KEY_HEADER = "-----BEGIN " + "RSA PRIVATE KEY" + "-----"
_AWS_ID = "AKIA" + "Q3EGTXYZ7ABCD2EF"
_AWS_SECRET = "wJalrXUtnFEMI/K7MDENG/" + "bPxRfiCYzQ9kLm3TnV"  # 40 characters


@pytest.mark.parametrize(
    ("filename", "content", "rule"),
    [
        ("id_rsa", f"{_KEY_HEADER}\nMIIEpAIBAAKCAQEA7\n", "private-key"),
        ("settings.env", f"AWS_ACCESS_KEY_ID={_AWS_ID}\n", "aws-access-key-id"),
        ("creds.ini", f"aws_secret_access_key = {_AWS_SECRET}\n", "aws-secret-key"),
        ("app.py", 'REDIS = "redis://admin:' + 'Tr0ub4dor-3x@cache:6379/0"\n', "url-password"),
        ("config.py", 'api_token = "' + "9f2Kq7Zp0xLw4RtY8vB1nC6m" + '"\n', "assigned-high-entropy"),
        ("services/x/config.py", 'admin_password = "' + "letmein-please" + '"\n', "hardcoded-secret"),
        ("values.yaml", "db:\n  password: '" + "h7Gk2pQz9Lx4Wm1R" + "'\n", "assigned-high-entropy"),
        (
            "secret.yaml",
            "apiVersion: v1\nkind: Secret\nmetadata:\n  name: s\nstringData:\n  password: hunter2\n",
            "k8s-secret-values",
        ),
        (
            "kustomization.yaml",
            "secretGenerator:\n  - name: s\n    literals:\n      - password=hunter2\n",
            "k8s-secret-values",
        ),
    ],
)
def test_scanner_finds_planted_secrets(tmp_path: Path, filename: str, content: str, rule: str) -> None:
    planted = tmp_path / Path(filename).name
    planted.write_text(content)
    findings = scan_text(filename, planted.read_text())
    assert rule in {f.rule for f in findings}, findings
    assert not any(allowed(f) for f in findings if f.path != "tests/security/test_no_secrets.py")


@pytest.mark.parametrize(
    "content",
    [
        "STYLEREC_REDIS_URL: rediss://:${REDIS_PASSWORD}@redis:6379/0\n",
        "mongodb://USER:PASSWORD@mongo-0:27017\n",
        "redis://:***@h:6379/0  # what redact_url logs\n",
        'token_file = "/var/run/secrets/token"\n',
        'password_field = "redis_password"\n',
        "password: ${STYLEREC_MONGO_PASSWORD:?set it}\n",
        'token = "aaaaaaaaaaaaaaaa"\n',
        "kind: Secret\nmetadata:\n  name: s\ntype: Opaque\n",
    ],
)
def test_scanner_ignores_placeholders_and_references(content: str) -> None:
    assert scan_text("example.yaml", content) == []
