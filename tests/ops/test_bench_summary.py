"""`stylerec bench summary` on fixture JSON files: numbers are copied, never invented."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from cli.bench.summary import MISSING, build_summary, markdown
from cli.main import main

INGEST = {
    "quick": False,
    "service": {
        "batch_1": {"events_per_s": 900.0, "p99_ms": 2.0},
        "batch_100": {"events_per_s": 20000.0, "p99_ms": 9.0},
        "batch_1000": {"events_per_s": 50000.0, "p99_ms": 40.0},
        "stream": {"events_per_s": 60000.0},
    },
    "baseline": {
        "batch_1": {"events_per_s": 1000.0},
        "batch_100": {"events_per_s": 25000.0},
        "batch_1000": {"events_per_s": 40000.0, "p99_ms": 35.0},
        "pipelined": {"events_per_s": 100000.0},
    },
    "ratio_service_over_baseline": {"batch_1": 0.9, "batch_100": 0.8, "batch_1000": 1.25, "stream_vs_pipelined": 0.6},
    "service_peak_rss_mb": 120.5,
    "goal": {"batch_1000": 0.8, "stream": 0.8},
}
GATEWAY = {
    "results": {
        "noop": [{"concurrency": 1, "p50_ms": 1.0, "requests_per_s": 800.0}],
        "gateway": [{"concurrency": 1, "p50_ms": 3.0, "requests_per_s": 300.0}],
    },
    "ratios": [{"concurrency": 1, "p50_ratio": 3.0, "throughput_ratio": 0.375}],
    "goal": "gateway p50 within 1.5x the no-op",
    "errors": 0,
}
LOAD = {
    "max_search": {"steps": [{"concurrency": 4}], "max_requests_per_s": 250.0, "max_at_concurrency": 4},
    "soak": {
        "minutes": 2,
        "target_rate_per_s": 175.0,
        "stats": {
            "requests_per_s": 174.0,
            "errors": 0,
            "errors_by_status": {},
            "by_kind": {"read_known": {"p99_ms": 80.0}, "write": {"p99_ms": 120.0}},
        },
    },
    "memory": {
        "verdict": "flat",
        "reason": "ok",
        "processes": {"gateway": {"judged": True, "slope_second_half_mib_per_min": 0.2}},
    },
}


def write(dir_: Path, rel: str, data: dict[str, Any]) -> None:
    path = dir_ / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


def by_metric(summary: dict[str, Any], bench: str) -> dict[str, dict[str, Any]]:
    return {r["metric"]: r for r in summary["rows"] if r["benchmark"] == bench}


def test_values_goals_and_missing_inputs(tmp_path: Path) -> None:
    write(tmp_path, "ingest.json", INGEST)
    write(tmp_path, "gateway.json", GATEWAY)
    write(tmp_path, "load/load.json", LOAD)
    summary = build_summary(tmp_path, tmp_path / "no-soak.json")

    ingest = by_metric(summary, "ingest")
    b1000 = ingest["batch 1000 events/s"]
    assert (b1000["value"], b1000["baseline"], b1000["ratio"]) == (50000.0, 40000.0, 1.25)
    assert b1000["goal"] == "ratio >= 0.8" and b1000["met"] is True
    stream = ingest["stream events/s (vs pipelined producer)"]
    assert stream["ratio"] == 0.6 and stream["met"] is False

    gw = by_metric(summary, "gateway")["GetRecommendations p50 ms, concurrency 1 (vs no-op)"]
    assert gw["ratio"] == 3.0 and gw["goal"] == "ratio <= 1.5" and gw["met"] is False

    load = by_metric(summary, "load (short)")
    assert load["max sustainable requests/s (c=4)"]["value"] == 250.0
    assert load["soak errors"]["met"] is True
    assert load["memory (RSS of the 4 services)"]["value"] == "flat"
    # A field the JSON does not have is reported missing, not filled in.
    assert load["soak p99 ms, read, unknown user"]["value"] == MISSING

    # scoring.json and style.json were never written: missing, and they make the command fail.
    assert set(summary["required_inputs_missing"]) == {"scoring", "style"}
    assert summary["inputs"]["load soak"] == {
        "path": str(tmp_path / "no-soak.json"),
        "present": False,
        "produced_by": "make load",
        "required": False,
    }
    md = markdown(summary)
    assert "| benchmark | metric | value | baseline | ratio | goal | met? |" in md
    assert "| ingest | batch 1000 events/s | 50,000 | 40,000 | 1.25 | ratio >= 0.8 | yes |" in md
    assert "scoring: **missing**" in md
    assert summary["machine"]["cores"] and summary["machine"]["cpu_model"]


def test_command_writes_files_and_exits_1_when_a_bench_is_missing(tmp_path: Path) -> None:
    write(tmp_path, "ingest.json", INGEST)
    out = tmp_path / "summary"
    rc = main(
        [
            "bench",
            "summary",
            "--bench-dir",
            str(tmp_path),
            "--soak-json",
            str(tmp_path / "x.json"),
            "--out-dir",
            str(out),
        ]
    )
    assert rc == 1
    data = json.loads((out / "summary.json").read_text())
    assert "gateway" in data["required_inputs_missing"]
    assert (out / "summary.md").read_text().startswith("# Benchmark summary")
