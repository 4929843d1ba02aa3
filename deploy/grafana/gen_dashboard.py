#!/usr/bin/env python
"""Generate the provisioned StyleRec Grafana dashboard (deploy/grafana/dashboards/stylerec.json).

    python deploy/grafana/gen_dashboard.py          # rewrite the JSON
    python deploy/grafana/gen_dashboard.py --check  # exit 1 if the committed JSON is stale

Why a generator: a dashboard is ~2000 lines of JSON where ids and grid positions must
be unique and consistent; writing panels as one line each keeps them reviewable and
the layout correct. The JSON is what Grafana loads (file provisioning, compose and
k8s alike). tests/ops checks it is fresh and that every metric it queries is
exported by the running services.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

OUT = Path(__file__).resolve().parent / "dashboards" / "stylerec.json"
DS = {"type": "prometheus", "uid": "${datasource}"}
RATE = "$__rate_interval"

Target = tuple[str, str]  # (expr, legend)


class Layout:
    """Places panels left to right in rows of 24 grid units; rows get a header panel."""

    def __init__(self) -> None:
        self.panels: list[dict[str, Any]] = []
        self.next_id = 1
        self.x = 0
        self.y = 0
        self.row_h = 0

    def _id(self) -> int:
        self.next_id += 1
        return self.next_id - 1

    def row(self, title: str) -> None:
        if self.x:
            self.y += self.row_h
        self.x, self.row_h = 0, 0
        self.panels.append(
            {
                "type": "row",
                "id": self._id(),
                "title": title,
                "collapsed": False,
                "gridPos": {"h": 1, "w": 24, "x": 0, "y": self.y},
                "panels": [],
            }
        )
        self.y += 1

    def add(
        self,
        title: str,
        targets: list[Target],
        *,
        unit: str = "short",
        kind: str = "timeseries",
        w: int = 8,
        h: int = 8,
        description: str = "",
        stack: bool = False,
        minimum: float | None = 0,
        maximum: float | None = None,
        thresholds: list[tuple[float, str]] | None = None,
    ) -> None:
        if self.x + w > 24:
            self.x = 0
            self.y += self.row_h
            self.row_h = 0
        defaults: dict[str, Any] = {"unit": unit}
        if minimum is not None:
            defaults["min"] = minimum
        if maximum is not None:
            defaults["max"] = maximum
        if thresholds:
            defaults["thresholds"] = {
                "mode": "absolute",
                "steps": [{"color": "green", "value": None}] + [{"color": c, "value": v} for v, c in thresholds],
            }
        if kind == "timeseries":
            defaults["custom"] = {
                "drawStyle": "line",
                "lineWidth": 1,
                "fillOpacity": 10,
                "showPoints": "never",
                "stacking": {"mode": "normal" if stack else "none", "group": "A"},
            }
            options: dict[str, Any] = {
                "legend": {"displayMode": "table", "placement": "bottom", "calcs": ["lastNotNull", "max"]},
                "tooltip": {"mode": "multi", "sort": "desc"},
            }
        else:  # stat
            options = {
                "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
                "colorMode": "background",
                "graphMode": "none",
                "textMode": "value_and_name",
            }
        self.panels.append(
            {
                "type": kind,
                "id": self._id(),
                "title": title,
                "description": description,
                "datasource": DS,
                "gridPos": {"h": h, "w": w, "x": self.x, "y": self.y},
                "targets": [
                    {"refId": chr(ord("A") + i), "datasource": DS, "expr": expr, "legendFormat": legend}
                    for i, (expr, legend) in enumerate(targets)
                ],
                "fieldConfig": {"defaults": defaults, "overrides": []},
                "options": options,
            }
        )
        self.x += w
        self.row_h = max(self.row_h, h)


def p(q: float, metric: str, by: str) -> str:
    """histogram_quantile over a rate, grouped by ``by`` (plus le)."""
    return f"histogram_quantile({q}, sum by ({by}, le) (rate({metric}_bucket[{RATE}])))"


def build() -> dict[str, Any]:
    d = Layout()

    d.row("Overview: traffic, errors, latency")
    d.add(
        "Targets up",
        [('sum by (job) (up{job=~"stylerec-.+"})', "{{job}}")],
        kind="stat",
        w=6,
        h=5,
        description="Scraped replicas per service (Prometheus `up`).",
        thresholds=[(0, "red"), (1, "green")],
    )
    d.add(
        "Replicas SERVING",
        [("sum by (job) (stylerec_serving)", "{{job}}")],
        kind="stat",
        w=6,
        h=5,
        description="Replicas whose grpc.health.v1 status is SERVING (all dependencies reachable).",
        thresholds=[(0, "red"), (1, "green")],
    )
    d.add(
        "Dependencies down",
        [("sum by (job, dependency) (1 - stylerec_dependency_up)", "{{job}} → {{dependency}}")],
        kind="stat",
        w=12,
        h=5,
        description="Replicas whose last probe of Kafka/Redis/MongoDB failed.",
        thresholds=[(1, "red")],
    )
    d.add(
        "Requests / s by service",
        [("sum by (job) (stylerec:grpc_requests:rate5m)", "{{job}}")],
        unit="reqps",
        stack=True,
        description="All RPCs, every status code (recording rule over stylerec_grpc_server_handled_total).",
    )
    d.add(
        "Server error ratio by service",
        [("stylerec:grpc_error_ratio:rate5m", "{{grpc_service}}")],
        unit="percentunit",
        thresholds=[(0.05, "red")],
        description="UNKNOWN/INTERNAL/UNAVAILABLE/DEADLINE_EXCEEDED/DATA_LOSS/UNIMPLEMENTED over all calls; "
        "alert StyleRecHighErrorRatio at 5%.",
    )
    d.add(
        "Responses by code",
        [(f"sum by (job, grpc_code) (rate(stylerec_grpc_server_handled_total[{RATE}]))", "{{job}} {{grpc_code}}")],
        unit="reqps",
        description="Caller errors (INVALID_ARGUMENT, NOT_FOUND, RESOURCE_EXHAUSTED) show here but are not alerted on.",
    )
    d.add("p99 latency by method", [("stylerec:grpc_latency_seconds:p99_5m", "{{grpc_method}}")], unit="s", w=12)
    d.add(
        "p50 latency by method",
        [(p(0.5, "stylerec_grpc_server_handling_seconds", "grpc_method"), "{{grpc_method}}")],
        unit="s",
        w=12,
    )
    d.add(
        "Latency SLO: share of slow calls (1h)",
        [("stylerec:slo_slow_ratio:rate1h", "{{grpc_method}}")],
        unit="percentunit",
        w=12,
        thresholds=[(0.01, "orange"), (0.144, "red")],
        description="Objective: 99% under 100 ms (GetRecommendations, GetSimilarItems) and 500 ms (IngestEvents). "
        "1% = budget spent exactly on time; 14.4% = fast burn (page).",
    )
    d.add(
        "RPCs in flight (started - handled)",
        [
            (
                "sum by (job) (stylerec_grpc_server_started_total) - sum by (job) (stylerec_grpc_server_handled_total)",
                "{{job}}",
            )
        ],
        w=12,
        description="Calls accepted but not finished: a growing value means threads are stuck.",
    )

    d.row("Kafka")
    d.add(
        "Consumer lag by group and topic",
        [("stylerec:kafka_consumer_lag_messages:sum", "{{group}} {{topic}}")],
        w=12,
        description="Messages not yet processed; alert StyleRecConsumerLagGrowing when >1000 and growing.",
    )
    d.add(
        "Consumer lag by partition",
        [("stylerec_kafka_consumer_lag_messages", "{{group}} {{topic}}/{{partition}}")],
        w=12,
    )
    d.add(
        "Consumed / s by outcome",
        [
            (
                "sum by (group, topic, outcome) (stylerec:kafka_messages_consumed:rate5m)",
                "{{group}} {{topic}} {{outcome}}",
            )
        ],
        unit="ops",
        description="outcome=error means the handler raised and the batch is being retried.",
    )
    d.add(
        "Produced / s by topic",
        [(f"sum by (topic, outcome) (rate(stylerec_kafka_messages_produced_total[{RATE}]))", "{{topic}} {{outcome}}")],
        unit="ops",
    )
    d.add(
        "Dead letters / s",
        [(f"sum by (topic, reason) (rate(stylerec_dead_letters_total[{RATE}]))", "{{topic}} {{reason}}")],
        unit="ops",
        description="Alert StyleRecDeadLetterRate.",
    )

    d.row("Models (scoring)")
    d.add(
        "Serving model age",
        [("time() - (stylerec_scoring_model_trained_timestamp_seconds > 0)", "{{instance}}")],
        unit="s",
        thresholds=[(3 * 3600, "orange"), (6 * 3600, "red")],
        description="Since the model each replica serves was trained; the trainer runs hourly. "
        "Alerts StyleRecModelStale / StyleRecNoModel.",
    )
    d.add("Items in the serving model", [("stylerec_scoring_model_items", "{{instance}}")])
    d.add(
        "Model swaps (1h)",
        [("sum by (instance) (increase(stylerec_scoring_model_swaps_total[1h]))", "{{instance}}")],
        description="Atomic hot swaps after model-updates.",
    )
    d.add(
        "Fold-in latency",
        [
            (p(0.5, "stylerec_scoring_foldin_seconds", "source"), "p50 {{source}}"),
            (p(0.99, "stylerec_scoring_foldin_seconds", "source"), "p99 {{source}}"),
        ],
        unit="s",
        description="Recomputing one user's top-N from their history when their events arrive.",
    )
    d.add(
        "Event → recommendations in Redis",
        [
            (p(0.5, "stylerec_scoring_event_to_redis_seconds", "job"), "p50"),
            (p(0.99, "stylerec_scoring_event_to_redis_seconds", "job"), "p99"),
        ],
        unit="s",
        description="Freshness: Kafka record timestamp to the user's top-N rewritten (target: within a second).",
    )
    d.add(
        "Events applied / s",
        [(f"sum by (source, outcome) (rate(stylerec_scoring_events_applied_total[{RATE}]))", "{{source}} {{outcome}}")],
        unit="ops",
    )
    d.add(
        "Training runs (1h)",
        [
            (
                "sum by (algorithm, trigger, outcome) (increase(stylerec_scoring_train_runs_total[1h]))",
                "{{algorithm}} {{trigger}} {{outcome}}",
            )
        ],
        w=12,
        description="Runs inside serving replicas (the CronJob trainer exits after one run and is not scraped).",
    )
    d.add(
        "Interaction state",
        [
            ("sum by (instance) (stylerec_scoring_state_users)", "users {{instance}}"),
            ("sum by (instance) (stylerec_scoring_state_items)", "items {{instance}}"),
        ],
        w=12,
    )

    d.row("Ingestion")
    d.add(
        "Events / s by outcome",
        [(f"sum by (outcome) (rate(stylerec_ingestion_events_total[{RATE}]))", "{{outcome}}")],
        unit="ops",
        stack=True,
    )
    d.add(
        "Broker ack latency (acks=all)",
        [
            (p(0.5, "stylerec_ingestion_produce_seconds", "job"), "p50"),
            (p(0.99, "stylerec_ingestion_produce_seconds", "job"), "p99"),
        ],
        unit="s",
    )
    d.add(
        "Events per call",
        [
            (p(0.5, "stylerec_ingestion_batch_size", "rpc"), "p50 {{rpc}}"),
            (p(0.99, "stylerec_ingestion_batch_size", "rpc"), "p99 {{rpc}}"),
        ],
    )
    d.add(
        "Catalog items / s by outcome",
        [(f"sum by (outcome) (rate(stylerec_ingestion_items_total[{RATE}]))", "{{outcome}}")],
        unit="ops",
    )
    d.add(
        "Archiver: events written / s",
        [(f"sum (rate(stylerec_ingestion_archived_events_total[{RATE}]))", "archived")],
        unit="ops",
    )
    d.add(
        "Refused calls / s",
        [
            (f"sum by (reason) (rate(stylerec_ingestion_admission_rejects_total[{RATE}]))", "admission {{reason}}"),
            (f"sum by (reason) (rate(stylerec_ingestion_request_rejects_total[{RATE}]))", "request {{reason}}"),
        ],
        unit="ops",
        description="Admission = load shedding (in-flight budget, broker circuit); request = bad calls.",
    )

    d.row("Style worker")
    d.add(
        "Jobs / s by kind and outcome",
        [(f"sum by (kind, outcome) (rate(stylerec_style_jobs_total[{RATE}]))", "{{kind}} {{outcome}}")],
        unit="ops",
        stack=True,
        description="Throughput of embed and stylize jobs.",
    )
    d.add(
        "Batch size (dynamic batching)",
        [
            (
                f"sum by (model) (rate(stylerec_style_batch_size_sum[{RATE}])) / "
                f"sum by (model) (rate(stylerec_style_batch_size_count[{RATE}]))",
                "mean {{model}}",
            ),
            (p(0.9, "stylerec_style_batch_size", "model"), "p90 {{model}}"),
        ],
    )
    d.add(
        "Queue depth",
        [("sum by (model) (stylerec_style_queue_depth)", "{{model}}")],
        description="Requests waiting in the dynamic batcher.",
    )
    d.add(
        "Inference latency p99 by provider",
        [(p(0.99, "stylerec_style_inference_seconds", "model, provider"), "{{model}} {{provider}}")],
        unit="s",
    )
    d.add("Queue wait p99", [(p(0.99, "stylerec_style_queue_wait_seconds", "model"), "{{model}}")], unit="s")
    d.add(
        "Execution provider",
        [("max by (instance, provider) (stylerec_style_provider_active) == 1", "{{instance}} {{provider}}")],
        kind="stat",
        description="The ONNX Runtime provider each replica runs on (CUDAExecutionProvider on GPU nodes).",
    )
    d.add("Job time p99 by kind", [(p(0.99, "stylerec_style_job_seconds", "kind"), "{{kind}}")], unit="s", w=12)
    d.add(
        "Images rejected / s",
        [(f"sum by (reason) (rate(stylerec_style_images_rejected_total[{RATE}]))", "{{reason}}")],
        unit="ops",
        w=12,
    )

    d.row("Gateway")
    d.add(
        "Answers / s by strategy",
        [(f"sum by (strategy) (rate(stylerec_gateway_recommendations_total[{RATE}]))", "{{strategy}}")],
        unit="ops",
        stack=True,
        description="style_personalized / cf / popular (unknown users).",
    )
    d.add(
        "Degraded answers ratio",
        [
            (
                f'(sum (rate(stylerec_gateway_recommendations_total{{degraded="true"}}[{RATE}])) or vector(0)) / '
                f"sum (rate(stylerec_gateway_recommendations_total[{RATE}]))",
                "degraded",
            )
        ],
        unit="percentunit",
        maximum=1,
    )
    d.add(
        "Item cache hit ratio",
        [
            (
                f'sum (rate(stylerec_gateway_item_cache_total{{result="hit"}}[{RATE}])) / '
                f"sum (rate(stylerec_gateway_item_cache_total[{RATE}]))",
                "hit ratio",
            )
        ],
        unit="percentunit",
        maximum=1,
        description="Item metadata served from Redis; misses are read from MongoDB and cached.",
    )
    d.add(
        "Downstream latency p99",
        [(p(0.99, "stylerec_gateway_downstream_seconds", "dependency, operation"), "{{dependency}} {{operation}}")],
        unit="s",
        w=12,
    )
    d.add(
        "Stylize requests / s by outcome",
        [(f"sum by (outcome) (rate(stylerec_gateway_stylize_jobs_total[{RATE}]))", "{{outcome}}")],
        unit="ops",
        w=12,
    )

    d.row("Stores and processes")
    d.add(
        "Store errors / s",
        [
            (
                f"sum by (job, store, operation) (rate(stylerec_store_errors_total[{RATE}]))",
                "{{job}} {{store}} {{operation}}",
            )
        ],
        unit="ops",
        description="Redis/MongoDB operations that failed after bounded retries.",
    )
    d.add(
        "CPU (cores) by replica",
        [(f'rate(process_cpu_seconds_total{{job=~"stylerec-.+"}}[{RATE}])', "{{job}} {{instance}}")],
    )
    d.add(
        "Resident memory by replica",
        [('process_resident_memory_bytes{job=~"stylerec-.+"}', "{{job}} {{instance}}")],
        unit="bytes",
    )

    return {
        "uid": "stylerec-overview",
        "title": "StyleRec",
        "description": "Traffic, errors and latency of the four StyleRec services; Kafka lag; models; style worker.",
        "tags": ["stylerec"],
        "timezone": "utc",
        "editable": True,
        "graphTooltip": 1,
        "schemaVersion": 39,
        "version": 1,
        "refresh": "30s",
        "time": {"from": "now-3h", "to": "now"},
        "templating": {
            "list": [
                {
                    "name": "datasource",
                    "label": "Prometheus",
                    "type": "datasource",
                    "query": "prometheus",
                    "current": {"text": "Prometheus", "value": "prometheus"},
                    "hide": 0,
                }
            ]
        },
        "annotations": {"list": []},
        "links": [],
        "panels": d.panels,
    }


def render() -> str:
    return json.dumps(build(), indent=2, sort_keys=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="exit 1 if the committed JSON differs")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        if not OUT.exists() or OUT.read_text() != text:
            print(f"{OUT} is stale: run python deploy/grafana/gen_dashboard.py", file=sys.stderr)
            return 1
        return 0
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(text)
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
