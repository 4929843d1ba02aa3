"""The provisioned Grafana dashboard: generated fresh, well-formed (unique ids, panels on
the 24-column grid without overlaps, every query through the datasource variable), the
rows the issue asks for, and only metrics our code declares or our rules record."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import yaml

from tests.ops.metrics_catalog import declared_metrics
from tests.ops.promql import SYNTHETIC, dashboard_exprs, dashboards, metric_names, panels, recorded_names

REPO = Path(__file__).resolve().parents[2]
GRAFANA = REPO / "deploy/grafana"


def dashboard() -> dict[str, Any]:
    (dash,) = dashboards().values()
    return dash


def test_dashboard_json_is_generated_fresh() -> None:
    spec = importlib.util.spec_from_file_location("gen_dashboard", GRAFANA / "gen_dashboard.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(["--check"]) == 0, "run: python deploy/grafana/gen_dashboard.py"


def test_layout_and_datasource() -> None:
    dash = dashboard()
    assert dash["uid"] == "stylerec-overview"
    ps = panels(dash)
    ids = [p["id"] for p in ps]
    assert len(ids) == len(set(ids)), "duplicate panel ids"
    cells: set[tuple[int, int]] = set()
    for p in ps:
        g = p["gridPos"]
        assert g["x"] >= 0 and g["x"] + g["w"] <= 24, p["title"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"panel {p['title']!r} overlaps another"
                cells.add((x, y))
        if p["type"] == "row":
            continue
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
        assert p["targets"] and all(t["expr"].strip() for t in p["targets"]), p["title"]
        assert p["fieldConfig"]["defaults"]["unit"], p["title"]
    var = dash["templating"]["list"][0]
    assert var["type"] == "datasource" and var["query"] == "prometheus"


def test_rows_cover_the_issue() -> None:
    rows = [p["title"] for p in panels(dashboard()) if p["type"] == "row"]
    for needle in ("Overview", "Kafka", "Models", "Style worker"):
        assert any(needle in r for r in rows), f"no {needle} row in {rows}"
    titles = " ".join(p["title"].lower() for p in panels(dashboard()))
    for needle in ("requests", "error", "latency", "lag", "batch size", "queue", "provider", "model age",
                   "fold-in", "cache hit"):  # fmt: skip
        assert needle in titles, needle


def test_queries_use_declared_or_recorded_metrics() -> None:
    declared = declared_metrics()
    recorded = recorded_names()
    problems = []
    for where, expr in dashboard_exprs(dashboard()):
        for name in metric_names(expr):
            if name in recorded or name in SYNTHETIC or name.startswith(("process_", "python_")):
                continue
            if name not in declared:
                problems.append(f"{where}: {name}")
    assert not problems, "metrics no service declares:\n" + "\n".join(problems)


def test_provisioning_points_at_the_dashboard() -> None:
    ds = yaml.safe_load((GRAFANA / "provisioning/datasources/prometheus.yml").read_text())
    (source,) = ds["datasources"]
    assert source["uid"] == dashboard()["templating"]["list"][0]["current"]["value"]
    assert source["url"] == "http://prometheus:9090"
    prov = yaml.safe_load((GRAFANA / "provisioning/dashboards/stylerec.yml").read_text())
    path = prov["providers"][0]["options"]["path"]
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    mounts = compose["services"]["grafana"]["volumes"]
    assert f"./deploy/grafana/dashboards:{path}:ro" in mounts
