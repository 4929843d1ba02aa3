"""`stylerec bench summary`: one table of every benchmark's JSON (out/bench/*.json, the load runs).

It only copies numbers that the benchmark commands wrote: a file or a field that is not there
is shown as "missing", never filled in. Goals come from the benchmark JSON itself (each bench
states its own goal) or, for the load run, from its documented pass criteria (zero errors, flat
memory); a metric without a stated goal shows "-". Exit 1 when the output of a benchmark that
``make bench`` runs is missing, so a crashed benchmark fails ``make bench`` visibly; the
10-minute soak (``make load``) is included when present and reported missing otherwise.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from cli.localstack.stack import REPO
from cli.measure.machine import machine_info

MISSING = "missing"
BENCH_DIR = REPO / "out" / "bench"
SOAK_JSON = REPO / "out" / "load" / "load.json"


@dataclass
class Row:
    benchmark: str
    metric: str
    value: Any = MISSING
    baseline: Any = None
    ratio: Any = None
    goal: str = "-"
    met: bool | None = None
    note: str = ""


def register_bench(bsub: Any) -> None:
    p = bsub.add_parser("summary", help="table of every benchmark JSON under out/bench/ and out/load/")
    p.add_argument("--bench-dir", type=Path, default=BENCH_DIR, help="where the bench JSON files are")
    p.add_argument("--soak-json", type=Path, default=SOAK_JSON, help="load.json of `make load` (10-minute soak)")
    p.add_argument("--out-dir", type=Path, default=BENCH_DIR, help="where summary.json and summary.md go")
    p.set_defaults(func=cmd_bench_summary)


def dig(data: Any, *path: str | int) -> Any:
    """data[p0][p1]...; None when any step is absent (the caller reports it as missing)."""
    for key in path:
        present = (isinstance(data, dict) and key in data) or (
            isinstance(data, list) and isinstance(key, int) and -len(data) <= key < len(data)
        )
        if not present:
            return None
        data = data[key]
    return data


def ratio_of(value: Any, baseline: Any) -> float | None:
    if isinstance(value, int | float) and isinstance(baseline, int | float) and baseline:
        return round(float(value) / float(baseline), 3)
    return None


def row(
    bench: str,
    metric: str,
    value: Any,
    baseline: Any = None,
    ratio: Any = None,
    goal: str = "-",
    met: bool | None = None,
    note: str = "",
) -> Row:
    if ratio is None:
        ratio = ratio_of(value, baseline)
    if value is None:
        return Row(bench, metric, MISSING, baseline, None, goal, None, note)
    return Row(bench, metric, value, baseline, ratio, goal, met, note)


def at_least(x: Any, goal: float) -> bool | None:
    return None if not isinstance(x, int | float) else x >= goal


def at_most(x: Any, goal: float) -> bool | None:
    return None if not isinstance(x, int | float) else x <= goal


def ingest_rows(d: dict[str, Any]) -> list[Row]:
    b = "ingest"
    goals = d.get("goal") or {}
    ratios = d.get("ratio_service_over_baseline") or {}
    out = [
        row(
            b,
            "batch 1 events/s (service vs bare producer)",
            dig(d, "service", "batch_1", "events_per_s"),
            dig(d, "baseline", "batch_1", "events_per_s"),
            ratios.get("batch_1"),
        ),
        row(
            b,
            "batch 100 events/s",
            dig(d, "service", "batch_100", "events_per_s"),
            dig(d, "baseline", "batch_100", "events_per_s"),
            ratios.get("batch_100"),
        ),
    ]
    g = goals.get("batch_1000")
    out.append(
        row(
            b,
            "batch 1000 events/s",
            dig(d, "service", "batch_1000", "events_per_s"),
            dig(d, "baseline", "batch_1000", "events_per_s"),
            ratios.get("batch_1000"),
            f"ratio >= {g}" if g is not None else "-",
            at_least(ratios.get("batch_1000"), g) if g is not None else None,
        )
    )
    g = goals.get("stream")
    out.append(
        row(
            b,
            "stream events/s (vs pipelined producer)",
            dig(d, "service", "stream", "events_per_s"),
            dig(d, "baseline", "pipelined", "events_per_s"),
            ratios.get("stream_vs_pipelined"),
            f"ratio >= {g}" if g is not None else "-",
            at_least(ratios.get("stream_vs_pipelined"), g) if g is not None else None,
        )
    )
    out.append(
        row(
            b,
            "batch 1000 p99 ms (per call)",
            dig(d, "service", "batch_1000", "p99_ms"),
            dig(d, "baseline", "batch_1000", "p99_ms"),
        )
    )
    out.append(row(b, "service peak RSS MiB", d.get("service_peak_rss_mb")))
    return out


def scoring_rows(d: dict[str, Any]) -> list[Row]:
    b = "scoring"
    out = []
    for name, block in (d.get("training") or {}).items():
        out.append(
            row(
                b,
                f"EASE train s, {name} (vs item-kNN)",
                dig(block, "algorithms", "ease", "train_seconds"),
                dig(block, "algorithms", "itemknn", "train_seconds"),
            )
        )
    t = dig(d, "live", "topn_latency") or {}
    out.append(
        row(
            b,
            "TopN p50 ms (vs health Check, same server)",
            dig(t, "service", "p50_ms"),
            dig(t, "baseline_health_check_same_server", "p50_ms"),
            t.get("ratio_p50"),
        )
    )
    f = dig(d, "live", "freshness_event_to_redis") or {}
    out.append(
        row(
            b,
            "event -> recs in Redis p50 ms (vs bare Kafka hop)",
            dig(f, "service", "p50_ms"),
            dig(f, "baseline_bare_kafka_hop", "p50_ms"),
            f.get("ratio_p50"),
        )
    )
    target = f.get("target_p95_ms")
    p95 = dig(f, "service", "p95_ms")
    out.append(
        row(
            b,
            "event -> recs in Redis p95 ms",
            p95,
            dig(f, "baseline_bare_kafka_hop", "p95_ms"),
            None,
            f"<= {target} ms" if target is not None else "-",
            at_most(p95, target) if target is not None else None,
        )
    )
    return out


def style_rows(d: dict[str, Any]) -> list[Row]:
    b = "style"
    goal = d.get("goal") or {}
    net, mode = str(goal.get("network", "")), str(goal.get("mode", ""))
    sizes = (dig(d, "models", net) or {}) if net else {}
    out = []
    if not sizes:
        return [row(b, "images/s vs bare ONNX Runtime", None)]
    for size, r in sizes.items():
        ratio = dig(r, mode, "ratio_vs_bare")
        if size == "1":
            tgt = goal.get("target_b1")
            g, met = (f"ratio >= {tgt}", at_least(ratio, tgt)) if tgt is not None else ("-", None)
        else:
            tgt = goal.get("target_batched")
            met = None if tgt is None or not isinstance(ratio, int | float) else ratio > tgt
            g = f"ratio > {tgt}" if tgt is not None else "-"
        out.append(
            row(
                b,
                f"{net} images/s, batch {size}, mode {mode} (vs bare loop)",
                dig(r, mode, "images_per_s"),
                dig(r, "bare", "images_per_s"),
                ratio,
                g,
                met,
                note=str(d.get("provider", "")),
            )
        )
    return out


def gateway_rows(d: dict[str, Any]) -> list[Row]:
    b = "gateway"
    out = []
    goal_text = d.get("goal", "-")
    gw, noop = dig(d, "results", "gateway") or [], dig(d, "results", "noop") or []
    ratios = {r.get("concurrency"): r for r in d.get("ratios") or []}
    limit = None
    if isinstance(goal_text, str) and "within" in goal_text:
        try:
            limit = float(goal_text.split("within", 1)[1].split("x", 1)[0])
        except ValueError:
            limit = None
    for g, n in zip(gw, noop, strict=False):
        c = g.get("concurrency")
        r = dig(ratios, c, "p50_ratio")
        out.append(
            row(
                b,
                f"GetRecommendations p50 ms, concurrency {c} (vs no-op)",
                g.get("p50_ms"),
                n.get("p50_ms"),
                r,
                f"ratio <= {limit}" if limit else "-",
                at_most(r, limit) if limit else None,
            )
        )
        out.append(
            row(
                b,
                f"GetRecommendations requests/s, concurrency {c}",
                g.get("requests_per_s"),
                n.get("requests_per_s"),
                dig(ratios, c, "throughput_ratio"),
            )
        )
    built = dig(d, "results", "gateway_built") or []
    built_ratios = {r.get("concurrency"): r for r in d.get("ratios_built_every_time") or []}
    for g, n in zip(built, noop, strict=False):
        c = g.get("concurrency")
        r = dig(built_ratios, c, "p50_ratio")
        out.append(
            row(
                b,
                f"GetRecommendations p50 ms, concurrency {c}, every answer built (answer cache off)",
                g.get("p50_ms"),
                n.get("p50_ms"),
                r,
                f"ratio <= {limit}" if limit else "-",
                at_most(r, limit) if limit else None,
            )
        )
    if d.get("answer_cache_hit_rate") is not None:
        out.append(row(b, "answer cache hit rate (synthetic users that never change)", d["answer_cache_hit_rate"]))
    if d.get("answer_cache_restyle_rate") is not None:
        out.append(row(b, "answer cache restyle rate (PENDING images re-asked)", d["answer_cache_restyle_rate"]))
    if not gw:
        out.append(row(b, "GetRecommendations p50 ms (vs no-op)", None))
    errors = d.get("errors")
    out.append(row(b, "errors", errors, goal="0", met=None if errors is None else errors == 0))
    return out


def load_rows(d: dict[str, Any], label: str) -> list[Row]:
    b = label
    ms = d.get("max_search") or {}
    out = []
    if ms.get("steps"):
        out.append(
            row(
                b,
                f"max sustainable requests/s (c={ms.get('max_at_concurrency')})",
                ms.get("max_requests_per_s"),
                note=str(ms.get("stopped_because", "")),
            )
        )
    soak = d.get("soak") or {}
    minutes = soak.get("minutes")
    target = soak.get("target_rate_per_s")
    achieved = dig(soak, "stats", "requests_per_s")
    out.append(row(b, f"soak ok requests/s ({minutes} min, open loop; baseline = offered rate)", achieved, target))
    for kind, label_k in (
        ("read_known", "read, known user"),
        ("read_unknown", "read, unknown user"),
        ("write", "IngestEvents"),
    ):
        out.append(row(b, f"soak p99 ms, {label_k}", dig(soak, "stats", "by_kind", kind, "p99_ms")))
    errors = dig(soak, "stats", "errors")
    out.append(
        row(
            b,
            "soak errors",
            errors,
            goal="0",
            met=None if errors is None else errors == 0,
            note=json.dumps(dig(soak, "stats", "errors_by_status") or {}),
        )
    )
    pipe = soak.get("pipeline") or {}
    if "kept_up" in pipe:
        out.append(
            row(
                b,
                "soak events applied by scoring (baseline = accepted by ingestion)",
                pipe.get("events_applied_by_scoring_at_end"),
                pipe.get("events_accepted"),
            )
        )
        drained = pipe.get("drained_after_s")
        out.append(
            row(
                b,
                "scoring caught up after the soak, s",
                drained if drained is not None else f"not within {pipe.get('drain_timeout_s')}",
                goal="<= 30 s",
                met=bool(pipe.get("kept_up")),
                note=str(pipe.get("why_not", "")),
            )
        )
    fresh = soak.get("freshness") or {}
    if fresh:
        p95 = fresh.get("p95_ms")
        out.append(row(b, "soak freshness p50 ms (event -> recs in Redis, under load)", fresh.get("p50_ms")))
        out.append(
            row(
                b,
                "soak freshness p95 ms (event -> recs in Redis, under load)",
                p95 if p95 is not None else "timed out",
                goal=f"<= {fresh.get('goal_p95_ms', 1000):g} ms",
                met=bool(fresh.get("met")),
                note=f"{fresh.get('probes_measured')} probes, {fresh.get('timeouts')} timeouts",
            )
        )
    mem = d.get("memory") or {}
    verdict = mem.get("verdict")
    out.append(
        row(
            b,
            "memory (RSS of the 4 services)",
            verdict,
            goal="flat",
            met=None if verdict in (None, "not judged") else verdict == "flat",
            note=str(mem.get("reason", "")),
        )
    )
    worst = max(
        (
            ((p.get("less_designed_state") or p).get("slope_second_half_mib_per_min"), n)
            for n, p in (mem.get("processes") or {}).items()
            if p.get("judged")
        ),
        default=(None, ""),
    )
    if worst[0] is not None:
        judged_on = " less designed state" if "less_designed_state" in mem["processes"][worst[1]] else ""
        out.append(row(b, f"steepest judged RSS slope MiB/min ({worst[1]}{judged_on})", worst[0]))
    return out


SOURCES: list[tuple[str, str, Callable[[dict[str, Any]], list[Row]], str]] = [
    ("ingest", "ingest.json", ingest_rows, "stylerec bench ingest"),
    ("scoring", "scoring.json", scoring_rows, "stylerec bench scoring"),
    ("style", "style.json", style_rows, "stylerec bench style"),
    ("gateway", "gateway.json", gateway_rows, "stylerec bench gateway"),
    ("load (short)", "load/load.json", lambda d: load_rows(d, "load (short)"), "make bench"),
]


def display(path: Path) -> str:
    """Repository-relative when inside the repository, so the table reads the same on every clone."""
    try:
        return str(path.resolve().relative_to(REPO))
    except ValueError:
        return str(path)


def build_summary(bench_dir: Path, soak_json: Path | None) -> dict[str, Any]:
    rows: list[Row] = []
    inputs: dict[str, Any] = {}
    sources = [(name, bench_dir / rel, fn, cmd, True) for name, rel, fn, cmd in SOURCES]
    if soak_json is not None:  # the 10-minute soak is not part of `make bench`: reported, never required
        sources.append(("load soak", soak_json, lambda d: load_rows(d, "load soak"), "make load", False))
    for name, path, fn, cmd, required in sources:
        if not path.exists():
            inputs[name] = {"path": display(path), "present": False, "produced_by": cmd, "required": required}
            rows.append(Row(name, f"all ({path.name} not found: run `{cmd}`)"))
            continue
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            inputs[name] = {
                "path": display(path),
                "present": False,
                "error": str(exc),
                "produced_by": cmd,
                "required": required,
            }
            rows.append(Row(name, f"all ({path.name} is not valid JSON: {exc})"))
            continue
        inputs[name] = {
            "path": display(path),
            "present": True,
            "other_processes_mean_cores": dig(data, "shared_machine", "mean_cores_used_by_other_processes"),
            "written_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(path.stat().st_mtime)),
            "quick": bool(data.get("quick", False)),
            "produced_by": cmd,
            "required": required,
        }
        rows.extend(fn(data))
    missing = [f"{r.benchmark}: {r.metric}" for r in rows if r.value == MISSING]
    required_missing = [n for n, info in inputs.items() if info["required"] and not info["present"]]
    return {
        "required_inputs_missing": required_missing,
        "machine": machine_info(),
        "inputs": inputs,
        "rows": [asdict(r) for r in rows],
        "missing": missing,
    }


def fmt(x: Any) -> str:
    if x is None:
        return "-"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, int | float):
        v = float(x)
        if abs(v) >= 100:
            return f"{v:,.0f}"
        if abs(v) >= 1:
            return f"{v:.2f}"
        return f"{v:.3g}"
    return str(x)


def markdown(summary: dict[str, Any]) -> str:
    m = summary["machine"]
    lines = [
        "# Benchmark summary",
        "",
        f"Machine: {m['cpu_model']}, {m['cores']} cores, {m['ram_gib']} GiB RAM; {m['platform']}; "
        f"summary written {m['date_utc']} at commit {m['git_commit']} (load average {m['load_avg_1m']}).",
        "",
        "| benchmark | metric | value | baseline | ratio | goal | met? |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in summary["rows"]:
        met = {True: "yes", False: "**no**", None: "-"}[r["met"]]
        lines.append(
            f"| {r['benchmark']} | {r['metric']} | {fmt(r['value'])} | {fmt(r['baseline'])} | {fmt(r['ratio'])} "
            f"| {r['goal']} | {met} |"
        )
    lines += ["", "Inputs:", ""]
    for name, info in summary["inputs"].items():
        if info["present"]:
            quick = " (--quick)" if info.get("quick") else ""
            other = info.get("other_processes_mean_cores")
            shared = f"; other processes used {other} cores on average meanwhile" if other is not None else ""
            lines.append(f"- {name}: `{info['path']}`, written {info['written_utc']}{quick}{shared}")
        else:
            lines.append(f"- {name}: **missing** (`{info['path']}`; run `{info['produced_by']}`)")
    if summary["missing"]:
        lines += ["", "Missing values (not measured, not filled in): " + "; ".join(summary["missing"])]
    return "\n".join(lines) + "\n"


def cmd_bench_summary(args: argparse.Namespace) -> int:
    summary = build_summary(args.bench_dir, args.soak_json)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    md = markdown(summary)
    (args.out_dir / "summary.md").write_text(md)
    print(md)
    print(f"written: {args.out_dir / 'summary.json'}, {args.out_dir / 'summary.md'}")
    if summary["required_inputs_missing"]:
        print("summary: missing benchmark output: " + ", ".join(summary["required_inputs_missing"]))
        return 1
    return 0
