"""Which metric names a PromQL expression reads, and what the rules and dashboard use.

A deliberately small tokenizer (no full PromQL grammar): strings, label matchers,
grouping clauses, range/offset durations and Grafana variables are removed, and
what remains that is an identifier but neither a function, an aggregation nor a
keyword is a metric name. Good enough for the expressions we write; the tests
also make Prometheus' own promtool parse every rule.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
RULES_DIR = REPO / "deploy/prometheus/rules"
DASHBOARD_DIR = REPO / "deploy/grafana/dashboards"

FUNCTIONS = {
    "abs",
    "absent",
    "absent_over_time",
    "avg_over_time",
    "ceil",
    "changes",
    "clamp",
    "clamp_max",
    "clamp_min",
    "count_over_time",
    "day_of_month",
    "day_of_week",
    "days_in_month",
    "delta",
    "deriv",
    "exp",
    "floor",
    "histogram_quantile",
    "histogram_count",
    "histogram_sum",
    "holt_winters",
    "hour",
    "idelta",
    "increase",
    "irate",
    "label_join",
    "label_replace",
    "last_over_time",
    "ln",
    "log10",
    "log2",
    "max_over_time",
    "min_over_time",
    "minute",
    "month",
    "predict_linear",
    "present_over_time",
    "quantile_over_time",
    "rate",
    "resets",
    "round",
    "scalar",
    "sgn",
    "sort",
    "sort_desc",
    "sqrt",
    "stddev_over_time",
    "stdvar_over_time",
    "sum_over_time",
    "time",
    "timestamp",
    "vector",
    "year",
    "label_values",
    "query_result",
    "metrics",
}
AGGREGATIONS = {
    "sum",
    "min",
    "max",
    "avg",
    "group",
    "stddev",
    "stdvar",
    "count",
    "count_values",
    "bottomk",
    "topk",
    "quantile",
}
KEYWORDS = {
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "bool",
    "and",
    "or",
    "unless",
    "offset",
    "inf",
    "nan",
}
# Series Prometheus itself creates for every target, not exported by our processes.
SYNTHETIC = {"up", "scrape_duration_seconds", "scrape_samples_scraped"}


def metric_names(expr: str) -> set[str]:
    text = re.sub(r'"(?:\\.|[^"\\])*"', '""', expr)  # strings
    text = re.sub(r"\{[^{}]*\}", " ", text)  # label matchers
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)  # ranges and subqueries
    text = re.sub(r"\$\{?\w+\}?", " ", text)  # Grafana variables
    names = set()
    for m in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", text):
        word = m.group(0)
        after = text[m.end() :].lstrip()
        if word.lower() in KEYWORDS or word in FUNCTIONS or word in AGGREGATIONS:
            continue
        if after.startswith("("):
            continue
        if re.fullmatch(r"\d+[smhdwy]", word) or re.fullmatch(r"e\d*", word):
            continue
        names.add(word)
    return names


def base_name(name: str) -> str:
    """The family a sample belongs to (histogram/summary series map to their metric)."""
    for suffix in ("_bucket", "_count", "_sum", "_created"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def load_rules() -> list[dict[str, Any]]:
    rules = []
    for path in sorted(RULES_DIR.glob("*.yml")):
        for group in yaml.safe_load(path.read_text())["groups"]:
            for rule in group["rules"]:
                rules.append({**rule, "file": path.name, "group": group["name"]})
    return rules


def recorded_names() -> set[str]:
    return {r["record"] for r in load_rules() if "record" in r}


def dashboards() -> dict[str, dict[str, Any]]:
    return {p.name: json.loads(p.read_text()) for p in sorted(DASHBOARD_DIR.glob("*.json"))}


def panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for panel in dashboard.get("panels", []):
        out.append(panel)
        out.extend(panel.get("panels", []))  # collapsed rows
    return out


def dashboard_exprs(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """(where, expr) for every panel target and every templating query."""
    out = []
    for panel in panels(dashboard):
        for target in panel.get("targets", []):
            if target.get("expr"):
                out.append((f"panel {panel.get('title')!r}", target["expr"]))
    for var in dashboard.get("templating", {}).get("list", []):
        query = var.get("query")
        if isinstance(query, dict):
            query = query.get("query")
        if var.get("type") == "query" and query:
            out.append((f"variable {var.get('name')!r}", query))
    return out


def raw_names_used() -> dict[str, set[str]]:
    """Metric name -> where it is used, over all rules and dashboards (recording rules resolved)."""
    used: dict[str, set[str]] = {}
    for rule in load_rules():
        where = f"rule {rule.get('alert') or rule.get('record')}"
        for name in metric_names(rule["expr"]):
            used.setdefault(name, set()).add(where)
    for file, dash in dashboards().items():
        for where, expr in dashboard_exprs(dash):
            for name in metric_names(expr):
                used.setdefault(name, set()).add(f"{file} {where}")
    return used


def exported_names_needed() -> dict[str, set[str]]:
    """Names our services must export: everything used minus recording rules and Prometheus' own series."""
    recorded = recorded_names()
    return {
        n: w
        for n, w in raw_names_used().items()
        if n not in recorded and n not in SYNTHETIC and not n.startswith("prometheus_")
    }
