"""`stylerec bench load` end to end against a real stack, and the memory-flatness verdict on fixed series."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from cli.load.commands import archive_keeps_up, fresh_enough, keeps_up, scoring_side
from cli.load.driver import KINDS, Mix, Workload
from cli.load.freshness import ProbeResults, histogram_quantile
from cli.load.report import memory_verdict
from cli.load.state import IDS, MIB, PAIRS, SUMS, adjusted_series, measure_entry_costs, state_growth
from cli.localstack.stack import REPO, SERVICES
from cli.main import main as cli_main


def series(start: float, mib_per_min: float, minutes: float, every_s: float = 5.0) -> list[tuple[float, float]]:
    n = int(minutes * 60 / every_s) + 1
    return [(i * every_s, start + mib_per_min * i * every_s / 60) for i in range(n)]


def test_memory_verdict_flat_growing_and_too_short() -> None:
    flat = {"gateway": series(100, 0.1, 10), "kafka": series(50, 30, 10)}  # the broker grows by design: not judged
    v = memory_verdict(flat, 600)
    assert v["verdict"] == "flat"
    assert v["processes"]["kafka"]["judged"] is False and v["processes"]["kafka"]["flat"] is False

    leaking = {"gateway": series(100, 0.1, 10), "scoring": series(300, 3.0, 10)}
    v = memory_verdict(leaking, 600)
    assert v["verdict"] == "NOT flat" and "scoring" in v["reason"]
    assert abs(v["processes"]["scoring"]["slope_second_half_mib_per_min"] - 3.0) < 1e-6

    # Warm-up growth in the first half only does not count against the slope, but the growth criterion sees it.
    warmup = {"gateway": [(t, 100 + min(t, 150) * 0.2) for t, _ in series(0, 0, 10)]}
    v = memory_verdict(warmup, 600)
    assert v["processes"]["gateway"]["slope_second_half_mib_per_min"] == 0.0
    assert v["processes"]["gateway"]["growth_first_to_last_quarter_pct"] > 10
    assert v["verdict"] == "NOT flat"

    assert memory_verdict(leaking, 60)["verdict"] == "not judged"


def test_scoring_is_judged_on_rss_less_its_designed_state() -> None:
    """3 MiB/min of RSS that the state gauges account for is flat; the same growth without
    state growth behind it, or beyond what the state explains, is not."""
    costs = {"bytes_per_pair": 64.0, "bytes_per_applied_id": 16.0}
    rss = series(300, 3.0, 10)
    # 3 MiB/min = 1 MiB/min of ids + 2 of pairs, sampled every 5 s like the RSS.
    gauges = [(t, {PAIRS: 2 * MIB / 64 * t / 60, IDS: MIB / 16 * t / 60}) for t, _m in rss]
    adj = adjusted_series(rss, gauges, costs)
    assert len(adj) == len(rss) and max(abs(m - 300) for _t, m in adj) < 0.01
    v = memory_verdict({"scoring": rss}, 600, adjusted={"scoring": adj})
    assert v["verdict"] == "flat", v["reason"]
    assert v["processes"]["scoring"]["slope_second_half_mib_per_min"] == 3.0  # the raw numbers stay
    assert state_growth(gauges, 600)["pairs_end"] == int(2 * MIB / 64 * 10)

    still = [(t, {PAIRS: 0.0, IDS: 0.0}) for t, _m in rss]
    v = memory_verdict({"scoring": rss}, 600, adjusted={"scoring": adjusted_series(rss, still, costs)})
    assert v["verdict"] == "NOT flat" and "less designed state" in v["reason"]
    assert adjusted_series(rss, [(0.0, {})], costs) == []  # no gauge sample: nothing to judge on

    # The kept score sums report their own bytes: 3 MiB/min of them is designed growth too.
    sums = [(t, {PAIRS: 0.0, IDS: 0.0, SUMS: 3 * MIB * t / 60}) for t, _m in rss]
    adj = adjusted_series(rss, sums, costs)
    assert max(abs(m - 300) for _t, m in adj) < 0.01
    assert state_growth(sums, 600)["user_sums_bytes_end"] == int(30 * MIB)


def test_scoring_keeps_up_when_its_backlog_drains_within_thirty_seconds() -> None:
    assert keeps_up(20_000, 12.5) == (True, "")
    ok, why = keeps_up(20_000, 30.5)
    assert not ok and "scoring fell behind: 20000" in why
    assert not keeps_up(900_000, None)[0]  # not drained at all within the wait
    assert keeps_up(20_000, 12.5, 59.0)[0]
    ok, why = keeps_up(195_000, 17.3, 93.1)  # caught up fast, but recommendations were 93 s behind
    assert not ok and "93.1 s of writes" in why


def test_the_archive_consumers_are_judged_like_scoring() -> None:
    assert archive_keeps_up({"archiver": 900, "attribution": 0}, 3.0) == (True, "")
    ok, why = archive_keeps_up({"archiver": 400_000}, None)  # still behind after the wait
    assert not ok and "archive consumers fell behind" in why and "within 30 s" in why, why
    ok, why = archive_keeps_up({"archiver": 0, "attribution": 150_000}, 20.0, {"archiver": 0.0, "attribution": 61.5})
    assert not ok and "attribution 61.5 s" in why, why
    # A max-search step: 25,000 records in a 12 s step is 8.7 s of its writes, though it drained.
    ok, why = archive_keeps_up({"archiver": 25_000}, 21.0, {"archiver": 8.7}, 3.0)
    assert not ok and "archiver 8.7 s of writes > 3 s" in why, why


def test_a_max_search_step_is_held_to_the_soaks_freshness_goal() -> None:
    """Quick answers with stale recommendations are not a rate the stack sustains."""
    quick = ProbeResults(sent=3, latencies_s=[0.2, 0.3, 0.4], at_s=[0.0, 0.25, 0.5], accept_s=[0.05] * 3)
    assert fresh_enough(quick.summary(10.0, 1.0)) == (True, "")
    stale = ProbeResults(sent=3, latencies_s=[0.2, 0.3, 1.4], at_s=[0.0, 0.25, 0.5], accept_s=[0.05] * 3)
    ok, why = fresh_enough(stale.summary(10.0, 1.0))
    assert not ok and why == "freshness p95 1400.0 ms > 1000 ms (3 probes)"
    quick.timeouts = 1  # a probe never seen ranks above the rest: the p95 is a timeout
    ok, why = fresh_enough(quick.summary(10.0, 1.0))
    assert not ok and "p95 a timeout" in why
    refused = ProbeResults(sent=3, latencies_s=[0.2, 0.3], at_s=[0.0, 0.25], accept_s=[0.05] * 2)
    refused.not_accepted = 1
    assert fresh_enough(refused.summary(10.0, 1.0)) == (False, "1 freshness probes were not accepted")
    assert not fresh_enough(ProbeResults().summary(10.0, 1.0))[0]  # no probe measured proves nothing


def test_freshness_timeouts_rank_above_every_measured_probe() -> None:
    r = ProbeResults(
        sent=20,
        latencies_s=[0.01 * n for n in range(1, 20)],
        at_s=[float(n) for n in range(19)],
        accept_s=[0.002] * 19,
    )
    r.timeouts = 1
    fresh = r.summary(timeout_s=30.0, goal_p95_s=1.0)
    assert (fresh["probes_measured"], fresh["timeouts"]) == (19, 1)
    # 20 ranks: p95 is rank 19 (the slowest measured, 190 ms), p99 and max are the timeout.
    assert (fresh["p50_ms"], fresh["p95_ms"], fresh["p99_ms"], fresh["max_ms"]) == (100.0, 190.0, None, None)
    assert fresh["met"] is True and fresh["series"][0] == [0.0, 10.0]
    r.timeouts = 2  # now the p95 rank is a timeout: not met, whatever the measured ones say
    fresh = r.summary(timeout_s=30.0, goal_p95_s=1.0)
    assert fresh["p95_ms"] is None and fresh["met"] is False
    assert fresh["accept"]["p50_ms"] == 2.0 and fresh["after_accept"]["p95_ms"] == 188.0
    slow = ProbeResults(sent=2, latencies_s=[0.5, 1.5], at_s=[0.0, 1.0], accept_s=[0.4, 0.1]).summary(30.0, 1.0)
    assert slow["p95_ms"] == 1500.0 and slow["met"] is False
    assert slow["after_accept"] == {"p50_ms": 100.0, "p95_ms": 1400.0, "p99_ms": 1400.0}
    assert ProbeResults().summary(30.0, 1.0)["met"] is False  # no probe measured proves nothing


def test_histogram_quantile_interpolates_like_prometheus() -> None:
    # 100 observations: 50 in (0, 0.1], 40 in (0.1, 0.5], 10 above 1 (+Inf).
    buckets = [(0.1, 50.0), (0.5, 90.0), (1.0, 90.0), (float("inf"), 100.0)]
    assert histogram_quantile(0.5, buckets) == pytest.approx(0.1)
    assert histogram_quantile(0.7, buckets) == pytest.approx(0.3)  # half-way through (0.1, 0.5]
    assert histogram_quantile(0.95, buckets) == 1.0  # in +Inf: the last finite bound, as Prometheus
    assert histogram_quantile(0.5, [(0.1, 0.0), (float("inf"), 0.0)]) is None
    side = scoring_side({0.1: 10.0, 0.5: 10.0, float("inf"): 10.0}, {0.1: 60.0, 0.5: 110.0, float("inf"): 110.0})
    # p95: rank 95 lies in (0.1, 0.5], 45 of its 50: 0.1 + 0.4 * 45/50.
    assert side["events"] == 100 and side["p50_ms"] == 100.0 and side["p95_ms"] == pytest.approx(460.0)


def test_entry_costs_are_measured_on_the_real_state() -> None:
    users, items = [f"u{n}" for n in range(200)], [f"i{n}" for n in range(500)]
    w = Workload(users, [1.0] * 200, items, [1.0] * 500, Mix(), "t")
    costs = measure_entry_costs(w, events=120_000, checkpoints=12)
    # A pair is a dict slot plus a float (~60-100 bytes); an id a 64-bit hash + two int32 (~16).
    assert 30 < costs["bytes_per_pair"] < 200, costs
    assert 8 < costs["bytes_per_applied_id"] < 60, costs


def test_bench_load_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "load"
    # A generous p99 limit: which step qualifies must not depend on this shared machine's speed.
    proc = subprocess.run(
        [
            sys.executable, "-m", "cli.main", "bench", "load",
            "--minutes", "0.2", "--stack", "own", "--seed-purchases", "2000",
            "--concurrency", "1,4", "--step-seconds", "2", "--p99-limit-ms", "10000",
            "--rate-fraction", "0.3", "--out-dir", str(out), "--json",
            "--probe-interval", "0.5", "--freshness-p95-ms", "20000", "--step-archive-backlog-s", "60",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    assert report == json.loads((out / "load.json").read_text())
    assert "own stack" in report["stack"]["source"]
    assert report["machine"]["cores"] and report["machine"]["cpu_model"]
    assert report["seed"]["purchases_accepted"] > 0 and report["seed"]["model_version"]

    steps = report["max_search"]["steps"]
    assert [s["concurrency"] for s in steps] == [1, 4]
    assert report["max_search"]["max_requests_per_s"] > 0

    soak = report["soak"]
    stats = soak["stats"]
    assert soak["target_rate_per_s"] > 0 and soak["offered"] > 0
    assert stats["requests_ok"] > 0
    assert stats["errors"] == 0, stats["errors_by_kind_and_status"]
    assert set(stats["by_kind"]) == set(KINDS)
    for kind in KINDS:
        k = stats["by_kind"][kind]
        assert k["ok"] > 0, kind
        assert 0 < k["p50_ms"] <= k["p95_ms"] <= k["p99_ms"] <= k["max_ms"]
    assert soak["timeline"] and all("requests_per_s" in row for row in soak["timeline"])
    # What ingestion accepted, scoring applied: counted from answers and from scoring's own counter.
    pipe = soak["pipeline"]
    assert pipe["events_accepted"] > 0 and pipe["kept_up"] is True, pipe
    assert pipe["drained_after_s"] is not None and pipe["seed_drained_after_s"] is not None, pipe
    assert all(isinstance(s["scoring_backlog_events"], int) for s in steps)
    # Ingestion's archive consumers took what the producers' own counters say was written.
    groups = {"archiver", "attribution", "impressions-archiver"}
    assert all(set(s["archive_backlog_records"]) == groups for s in steps), steps
    assert all(s["archive_drained_after_s"] is not None for s in steps), steps
    assert all(set(s["archive_backlog_seconds_of_writes"]) == groups for s in steps), steps
    archive = pipe["archive"]
    assert archive["kept_up"] is True and archive["drained_after_s"] is not None, archive
    assert set(archive["records_produced"]) == groups and min(archive["records_produced"].values()) > 0, archive
    # Each step is probed like the soak (a probe every --step-probe-interval while it is measured).
    assert all(s["freshness"]["probes_measured"] >= 2 and s["freshness"]["p95_ms"] for s in steps), steps
    # Freshness under load: probes sent during the soak, each seen in the user's answer in Redis.
    fresh = soak["freshness"]
    assert fresh["probes_sent"] >= 10 and fresh["probes_measured"] == fresh["probes_sent"], fresh
    assert fresh["timeouts"] == 0 and fresh["not_accepted"] == 0, fresh
    assert 0 < fresh["p50_ms"] <= fresh["p95_ms"] <= fresh["max_ms"], fresh
    assert len(fresh["series"]) == fresh["probes_measured"]
    assert 0 < fresh["accept"]["p50_ms"] <= fresh["p50_ms"], fresh  # ingestion's ack is part of each probe
    assert fresh["scoring_event_to_redis"]["events"] >= fresh["probes_sent"], fresh
    assert pipe["events_accepted"] >= fresh["probes_sent"]  # probes count as accepted writes: keep-up balances

    for name in SERVICES:
        assert report["rss_mib"][name], name
        assert all(mib > 0 for _t, mib in report["rss_mib"][name])
    assert report["memory"]["verdict"] == "not judged"  # 12 s is too short to judge
    # Scoring's state gauges were read along with its RSS, and the soak's writes show in them.
    state = report["scoring_state"]
    assert state["samples"] > 0 and state["pairs_end"] > state["pairs_start"] >= 0, state
    assert state["applied_ids_end"] > state["applied_ids_start"], state
    # Entry costs serve only the memory verdict (test_entry_costs_are_measured_on_the_real_state).
    assert "bytes_per_pair" not in state and "too short" in state["note"], state
    assert report["passed"] is True and report["failures"] == []
    for png in ("rss.png", "latency.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--scoring-replicas", "2"], "--scoring-replicas above 1 needs --stack own"),
        (["--scoring-replicas", "0", "--stack", "own"], "--scoring-replicas must be in [1, 4]"),
        (["--probe-interval", "0"], "--probe-interval must be in [0.05, 60] seconds"),
        (["--freshness-p95-ms", "-1"], "--freshness-p95-ms must be > 0"),
        (["--step-archive-backlog-s", "0"], "--step-archive-backlog-s must be > 0"),
        (["--step-probe-interval", "0.01"], "--step-probe-interval must be in [0.05, 60] seconds"),
    ],
)
def test_bench_load_bad_options_exit_2(args: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["bench", "load", *args]) == 2  # refused before any stack is touched
    assert message in capsys.readouterr().err
