"""Unit tests of the foundation pieces that need no running process."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from pydantic import ValidationError

from cli.client.eventfile import EventFileError, read_events
from libs.common.logging import JsonFormatter
from libs.common.pseudonym import Pseudonymizer
from libs.common.settings import DEV_PSEUDONYM_SECRET, ServiceSettings


def test_settings_reject_bad_bootstrap(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STYLEREC_KAFKA_BOOTSTRAP", "no-port-here")
    with pytest.raises(ValidationError, match="host:port"):
        ServiceSettings()


def test_settings_reject_bad_port(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STYLEREC_GRPC_PORT", "70000")
    with pytest.raises(ValidationError):
        ServiceSettings()


def test_prod_mode_requires_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STYLEREC_MODE", "prod")
    with pytest.raises(ValueError, match="PSEUDONYM_SECRET"):
        ServiceSettings().effective_pseudonym_secret()
    monkeypatch.setenv("STYLEREC_MODE", "dev")
    assert ServiceSettings().effective_pseudonym_secret() == DEV_PSEUDONYM_SECRET


def test_pseudonym_is_keyed_and_stable() -> None:
    a, b = Pseudonymizer("k1"), Pseudonymizer("k2")
    assert a("alice") == a("alice")
    assert a("alice") != b("alice")
    assert "alice" not in a("alice")


def test_json_log_lines_are_objects_with_extras() -> None:
    fmt = JsonFormatter("svc")
    rec = logging.LogRecord("x", logging.INFO, __file__, 1, "hello %s", ("world",), None)
    rec.port = 5
    out = json.loads(fmt.format(rec))
    assert out["msg"] == "hello world" and out["service"] == "svc" and out["port"] == 5


def test_event_file_csv_and_jsonl(tmp_path: Path) -> None:
    csv_file = tmp_path / "e.csv"
    csv_file.write_text("user_id,item_id,type,timestamp,event_id\nu1,i1,purchase,2026-01-01T00:00:00Z,e1\n")
    (event,) = list(read_events(csv_file))
    assert (event.user_id, event.item_id, event.event_id, event.timestamp.seconds) == ("u1", "i1", "e1", 1767225600)
    jsonl = tmp_path / "e.jsonl"
    jsonl.write_text('{"user_id": "u2", "item_id": "i2", "type": "VIEW", "timestamp": 1767225600}\n')
    (event,) = list(read_events(jsonl))
    assert event.user_id == "u2" and event.type == 1


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("user_id,item_id\nu,i\n", "CSV header lacks type, timestamp"),
        ("user_id,item_id,type,timestamp\nu,i,BUY,2026-01-01\n", ":2: unknown type 'BUY'"),
        ("user_id,item_id,type,timestamp\nu,i,VIEW,yesterday\n", ":2: timestamp 'yesterday'"),
        ("user_id,item_id,type,timestamp\n,i,VIEW,1\n", ":2: missing user_id"),
        ('{"user_id": "u"\n', ":1:"),
        ('{"user_id": "u", "item_id": "i", "type": "VIEW"}\n', ":1: missing timestamp"),
    ],
)
def test_event_file_errors_name_the_line(tmp_path: Path, content: str, message: str) -> None:
    f = tmp_path / "bad.csv"
    f.write_text(content)
    with pytest.raises(EventFileError, match=message.replace("(", r"\(")):
        list(read_events(f))


def test_stack_pseudonymizer_resolves_the_secret_as_the_services_do(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("STYLEREC_PSEUDONYM_SECRET", raising=False)
    monkeypatch.delenv("STYLEREC_MODE", raising=False)
    from cli.localstack.stack import Stack
    from libs.common.pseudonym import Pseudonymizer
    from libs.common.settings import DEV_PSEUDONYM_SECRET

    stack = Stack(dir=tmp_path)
    assert stack.pseudonymizer()("u1") == Pseudonymizer(DEV_PSEUDONYM_SECRET)("u1")  # dev fallback
    stack.env_overrides = {"STYLEREC_PSEUDONYM_SECRET": "k" * 32}
    assert stack.pseudonymizer()("u1") == Pseudonymizer("k" * 32)("u1")
    stack.env_overrides = {"STYLEREC_MODE": "prod"}  # prod without a secret: refused, as the service refuses
    with pytest.raises(ValueError, match="STYLEREC_PSEUDONYM_SECRET must be set"):
        stack.pseudonymizer()
