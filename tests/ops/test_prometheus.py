"""Prometheus config and rules: promtool validates and unit-tests them; every alert is
actionable (severity + summary + description + runbook) and covered by a firing and a
quiet promtool case; every metric a rule reads is declared by our code."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.ops.metrics_catalog import declared_metrics
from tests.ops.promql import REPO, SYNTHETIC, load_rules, metric_names, recorded_names

PROM = REPO / "deploy/prometheus"


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("promtool")
    assert exe, "promtool not found: run `make setup` (scripts/setup.sh installs the Debian package prometheus)"
    return subprocess.run([exe, *args], capture_output=True, text=True, timeout=120, cwd=REPO)


def test_promtool_check_config() -> None:
    res = promtool("check", "config", str(PROM / "prometheus.yml"))
    assert res.returncode == 0, res.stdout + res.stderr


def test_promtool_check_rules() -> None:
    res = promtool("check", "rules", *map(str, sorted((PROM / "rules").glob("*.yml"))))
    assert res.returncode == 0, res.stdout + res.stderr


def test_promtool_unit_tests() -> None:
    files = sorted((PROM / "tests").glob("*.yml"))
    assert files
    res = promtool("test", "rules", *map(str, files))
    assert res.returncode == 0, res.stdout + res.stderr


def test_every_alert_is_actionable() -> None:
    alerts = [r for r in load_rules() if "alert" in r]
    assert len(alerts) >= 10
    names = [a["alert"] for a in alerts]
    assert len(names) == len(set(names)), "duplicate alert names"
    for a in alerts:
        assert a["labels"]["severity"] in {"critical", "warning"}, a["alert"]
        for key in ("summary", "description", "runbook"):
            assert a["annotations"].get(key, "").strip(), f"{a['alert']} has no {key}"
        assert "for" in a, f"{a['alert']} fires on a single evaluation; give it a `for:`"


@pytest.mark.parametrize(
    "needle",
    [
        "stylerec:grpc_error_ratio",  # error ratio
        "slo_slow_ratio",  # latency SLO burn
        "kafka_consumer_lag",  # consumer lag growing
        "dead_letters",  # dead-letter rate
        "up{",  # a service down
    ],
)
def test_issue_alerts_exist(needle: str) -> None:
    assert any(needle in r["expr"] for r in load_rules() if "alert" in r), needle


def test_every_alert_has_firing_and_quiet_cases() -> None:
    fires: set[str] = set()
    quiet: set[str] = set()
    for path in sorted((PROM / "tests").glob("*.yml")):
        for case in yaml.safe_load(path.read_text())["tests"]:
            for t in case.get("alert_rule_test", []):
                (fires if t.get("exp_alerts") else quiet).add(t["alertname"])
    alerts = {r["alert"] for r in load_rules() if "alert" in r}
    assert alerts - fires == set(), f"alerts never shown to fire: {sorted(alerts - fires)}"
    assert alerts - quiet == set(), f"alerts never shown to stay quiet: {sorted(alerts - quiet)}"


def test_rules_read_only_declared_metrics() -> None:
    declared = declared_metrics()
    recorded = recorded_names()
    problems = []
    for rule in load_rules():
        for name in metric_names(rule["expr"]):
            if name in recorded or name in SYNTHETIC:
                continue
            if name not in declared:
                problems.append(f"{rule.get('alert') or rule.get('record')}: {name} is not declared by any service")
    assert not problems, "\n".join(problems)


def test_rule_files_are_mounted_by_compose() -> None:
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    volumes = compose["services"]["prometheus"]["volumes"]
    assert any(str(v).startswith("./deploy/prometheus:/etc/prometheus") for v in volumes), volumes


def test_recording_rules_names_follow_convention() -> None:
    for name in recorded_names():
        level, _, rest = name.partition(":")
        assert level == "stylerec" and rest.count(":") == 1, f"{name}: expected stylerec:<metric>:<operation>"
    assert Path(PROM / "prometheus.yml").read_text().count("rules/*.yml") == 1
