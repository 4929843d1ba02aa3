"""Judging and drawing a load run: the memory-flatness verdict and the two PNG plots.

"Flat" is a fixed, documented criterion (docs/load.md), computed only over the soak so that
start-up growth (imports, caches filling during the ramp) does not count against a service.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

# The four StyleRec services are judged; the embedded infrastructure is shown but not judged:
# tansu (memory storage) keeps every record it is sent and Redis/Mongo hold the data by design.
JUDGED = ("ingestion", "scoring", "style-worker", "gateway")
MAX_SLOPE_MIB_PER_MIN = 1.0
MAX_GROWTH_PCT = 10.0
MIN_SOAK_MINUTES_FOR_VERDICT = 2.0


def fit_slope_mib_per_min(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of RSS (MiB) against time (minutes)."""
    if len(points) < 3:
        return 0.0
    t = np.array([p[0] for p in points]) / 60.0
    y = np.array([p[1] for p in points])
    if float(np.ptp(t)) == 0.0:
        return 0.0
    return float(np.polyfit(t, y, 1)[0])


def _soak_stats(pts: list[tuple[float, float]], soak_s: float) -> dict[str, Any] | None:
    soak = [(t, m) for t, m in pts if 0 <= t <= soak_s]
    if not soak:
        return None
    q1 = [m for t, m in soak if t <= soak_s / 4]
    q4 = [m for t, m in soak if t >= 3 * soak_s / 4]
    first, last = (float(np.mean(q1)) if q1 else soak[0][1]), (float(np.mean(q4)) if q4 else soak[-1][1])
    slope = fit_slope_mib_per_min([(t, m) for t, m in soak if t >= soak_s / 2])
    return {
        "samples": len(soak),
        "rss_mib_start": soak[0][1],
        "rss_mib_end": soak[-1][1],
        "rss_mib_max": max(m for _t, m in soak),
        "slope_second_half_mib_per_min": round(slope, 3),
        "first_quarter_mean_mib": round(first, 1),
        "last_quarter_mean_mib": round(last, 1),
        "growth_first_to_last_quarter_mib": round(last - first, 1),
        "growth_first_to_last_quarter_pct": round(100.0 * (last - first) / first if first else 0.0, 2),
    }


def memory_verdict(
    series: dict[str, list[tuple[float, float]]],
    soak_s: float,
    max_slope: float = MAX_SLOPE_MIB_PER_MIN,
    max_growth_pct: float = MAX_GROWTH_PCT,
    min_minutes: float = MIN_SOAK_MINUTES_FOR_VERDICT,
    adjusted: dict[str, list[tuple[float, float]]] | None = None,
) -> dict[str, Any]:
    """Per process: slope over the soak's second half and growth from its first to its last quarter.

    ``series`` holds (seconds since soak start, MiB) samples; samples outside [0, soak_s] are ignored.
    A judged service is flat when slope <= ``max_slope`` MiB/min AND growth <= ``max_growth_pct`` %.
    ``adjusted`` (name -> series) is what a service is judged on instead of its raw RSS: scoring's
    RSS less the state it holds by design (cli/load/state.py); the raw numbers stay in the report.
    """
    adjusted = adjusted or {}
    per: dict[str, Any] = {}
    failing = []
    for name, pts in series.items():
        raw = _soak_stats(pts, soak_s)
        if raw is None:
            continue
        judged_on = _soak_stats(adjusted[name], soak_s) if name in adjusted else None
        basis = judged_on or raw
        flat = (
            basis["slope_second_half_mib_per_min"] <= max_slope
            and basis["growth_first_to_last_quarter_pct"] <= max_growth_pct
        )
        per[name] = {"judged": name in JUDGED, **raw, "flat": flat}
        if judged_on is not None:
            per[name]["judged_on"] = "RSS less the designed state growth"
            per[name]["less_designed_state"] = judged_on
        if name in JUDGED and not flat:
            failing.append(name)
    judged_enough = soak_s / 60.0 >= min_minutes
    if not judged_enough:
        verdict = "not judged"
        reason = (
            f"soak of {soak_s / 60:.2f} min is shorter than {min_minutes} min: too short to tell growth from warm-up"
        )
    elif failing:
        verdict = "NOT flat"
        reason = "growing: " + ", ".join(
            "{} {} MiB/min, {}%{}".format(
                n,
                (per[n].get("less_designed_state") or per[n])["slope_second_half_mib_per_min"],
                (per[n].get("less_designed_state") or per[n])["growth_first_to_last_quarter_pct"],
                " (less designed state)" if "less_designed_state" in per[n] else "",
            )
            for n in failing
        )
    else:
        verdict = "flat"
        reason = f"every service within {max_slope} MiB/min and {max_growth_pct}% growth"
    return {
        "verdict": verdict,
        "reason": reason,
        "criterion": (
            f"a StyleRec service is flat when the least-squares slope of its RSS over the second half of the soak "
            f"is <= {max_slope} MiB/min AND the mean RSS of the soak's last quarter is <= {max_growth_pct}% above "
            f"that of its first quarter; judged only for soaks of >= {min_minutes} min; scoring is judged on its "
            "RSS less the bytes its (user, item) pairs and applied event ids added (counts from its gauges, "
            "bytes per entry measured in the same run); broker, Redis and the Mongo-protocol server are "
            "reported, not judged (they hold data by design)"
        ),
        "processes": per,
    }


def plot_rss(series: dict[str, list[tuple[float, float]]], soak_s: float, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 5.5))
    for name, pts in sorted(series.items()):
        if not pts:
            continue
        style = "-" if name in JUDGED else "--" if name.startswith("scoring ") else ":"
        ax.plot([t / 60 for t, _ in pts], [m for _, m in pts], style, label=name)
    ax.axvspan(0, soak_s / 60, color="0.92", zorder=0, label="soak")
    ax.axvline(soak_s / 120, color="0.6", lw=0.8, ls="--")
    ax.set_xlabel("minutes since soak start (negative: set-up and ramp)")
    ax.set_ylabel("RSS, MiB (process group)")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, ncol=2)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_latency(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_ramp, ax_soak) = plt.subplots(2, 1, figsize=(10, 9))
    steps = report.get("max_search", {}).get("steps", [])
    if steps:
        conc = [s["concurrency"] for s in steps]
        ax_ramp.plot(conc, [s["requests_per_s"] for s in steps], "o-", color="tab:blue", label="requests/s")
        ax_ramp.set_xscale("log", base=2)
        ax_ramp.set_xlabel("closed-loop concurrency")
        ax_ramp.set_ylabel("requests/s (all kinds)")
        ax2 = ax_ramp.twinx()
        for kind, color in (("read_known", "tab:green"), ("write", "tab:red")):
            ax2.plot(conc, [s["by_kind"][kind]["p99_ms"] for s in steps], "s--", color=color, label=f"p99 {kind}")
        ax2.set_ylabel("p99 ms")
        ax2.set_yscale("log")
        lines = ax_ramp.get_legend_handles_labels()
        lines2 = ax2.get_legend_handles_labels()
        ax_ramp.legend(lines[0] + lines2[0], lines[1] + lines2[1], fontsize=8, loc="upper left")
        max_rps = report.get("max_search", {}).get("max_requests_per_s")
        ax_ramp.set_title(f"phase a: max search (max sustainable = {max_rps} requests/s)", fontsize=10)
        ax_ramp.grid(alpha=0.3)
    soak = report.get("soak", {})
    timeline = soak.get("timeline", []) if soak else []
    if timeline:
        t = [row["t_s"] / 60 for row in timeline]
        for kind, color in (("read_known", "tab:green"), ("read_unknown", "tab:olive"), ("write", "tab:red")):
            ax_soak.plot(t, [row[kind]["p50_ms"] for row in timeline], "-", color=color, lw=1, label=f"p50 {kind}")
            ax_soak.plot(t, [row[kind]["p99_ms"] for row in timeline], ":", color=color, lw=1, label=f"p99 {kind}")
        ax_soak.set_yscale("log")
        ax_soak.set_ylabel("latency ms (from scheduled send)")
        ax_soak.set_xlabel("minutes since soak start")
        ax3 = ax_soak.twinx()
        ax3.plot(t, [row["requests_per_s"] for row in timeline], color="tab:blue", alpha=0.5, lw=1, label="ok req/s")
        ax3.set_ylabel("ok requests/s")
        ax3.set_ylim(bottom=0)
        h1, l1 = ax_soak.get_legend_handles_labels()
        h2, l2 = ax3.get_legend_handles_labels()
        ax_soak.legend(h1 + h2, l1 + l2, fontsize=7, ncol=3, loc="upper left")
        ax_soak.set_title(
            f"phase b: open-loop soak at {soak.get('target_rate_per_s')} requests/s, "
            f"errors {soak.get('stats', {}).get('errors')}",
            fontsize=10,
        )
        ax_soak.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
