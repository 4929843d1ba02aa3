"""The numbers of `stylerec experiment report`: per-arm CTR and conversion from the impression
archive, with Wilson intervals and the relative lift of each arm over the control.

The unit is the impression (one GetRecommendations answer): CTR is the share of impressions with
at least one attributed click, conversion the share with at least one attributed purchase. The
attributions collection holds one row per impression item and outcome, so a shopper who clicks
three items of one list still makes that impression count once here (the Prometheus ratios count
per item; docs/experiments.md says which to read when).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pymongo.database import Database

from cli.evaluation.experiment_stats import relative_lift, wilson

OUTCOME_METRICS = {"ctr": "click", "conversion": "purchase"}


class ReportInputError(ValueError):
    """The asked-for experiment or control arm is not in the archive; the message lists what is."""


@dataclass
class ArmCounts:
    impressions: int = 0
    by_strategy: dict[str, int] = field(default_factory=dict)
    # outcome -> impressions with at least one such outcome
    converted: dict[str, set[str]] = field(default_factory=dict)
    # outcome -> attributed impression items
    items: dict[str, int] = field(default_factory=dict)


def experiments_in(db: Database[Any], impressions: str) -> dict[str, int]:
    """Experiment name -> impressions ('' = answers given while no experiment ran)."""
    rows = db[impressions].aggregate([{"$group": {"_id": "$experiment", "n": {"$sum": 1}}}])
    return {str(r["_id"] or ""): int(r["n"]) for r in rows}


def count_arms(db: Database[Any], experiment: str, impressions: str, attributions: str) -> dict[str, ArmCounts]:
    arms: dict[str, ArmCounts] = {}
    # A plain scan, not $group on two fields: the embedded Mongo-protocol server does not group by
    # a compound key. Two small fields per impression; fine for millions of rows in a CLI.
    for r in db[impressions].find({"experiment": experiment}, {"arm": 1, "strategy": 1, "_id": 0}):
        c = arms.setdefault(str(r.get("arm", "")), ArmCounts())
        c.impressions += 1
        strategy = str(r.get("strategy", ""))
        c.by_strategy[strategy] = c.by_strategy.get(strategy, 0) + 1
    for a in db[attributions].find(
        {"experiment": experiment}, {"arm": 1, "outcome": 1, "recommendation_id": 1, "_id": 0}
    ):
        c = arms.setdefault(str(a["arm"]), ArmCounts())
        outcome = str(a["outcome"])
        c.converted.setdefault(outcome, set()).add(str(a["recommendation_id"]))
        c.items[outcome] = c.items.get(outcome, 0) + 1
    return arms


def choose_control(arms: list[str], control: str | None) -> str:
    if control is not None:
        if control not in arms:
            raise ReportInputError(f"--control {control!r} is not an arm of this experiment; arms: {', '.join(arms)}")
        return control
    return "control" if "control" in arms else arms[0]


def build_report(
    db: Database[Any],
    experiment: str | None = None,
    control: str | None = None,
    impressions: str = "impressions",
    attributions: str = "attributions",
) -> dict[str, Any]:
    found = {name: n for name, n in experiments_in(db, impressions).items() if name}
    if experiment is None:
        if len(found) != 1:
            listed = ", ".join(sorted(found)) or "none (no impression carries an experiment arm)"
            raise ReportInputError(f"name the experiment with --experiment; experiments in the archive: {listed}")
        experiment = next(iter(found))
    if experiment not in found:
        listed = ", ".join(sorted(found)) or "none"
        raise ReportInputError(f"--experiment {experiment!r} has no impressions; experiments in the archive: {listed}")
    counts = count_arms(db, experiment, impressions, attributions)
    names = sorted(a for a in counts if counts[a].impressions)
    ctrl = choose_control(names, control)
    return report_from_counts(experiment, ctrl, counts)


def report_from_counts(experiment: str, control: str, counts: dict[str, ArmCounts]) -> dict[str, Any]:
    arms = []
    for name in sorted(counts, key=lambda a: (a != control, a)):
        c = counts[name]
        row: dict[str, Any] = {
            "arm": name,
            "control": name == control,
            "impressions": c.impressions,
            "impressions_by_strategy": dict(sorted(c.by_strategy.items())),
            "attributed_items": {o: c.items.get(o, 0) for o in ("click", "cart", "purchase")},
        }
        for metric, outcome in OUTCOME_METRICS.items():
            x = len(c.converted.get(outcome, ()))
            low, high = wilson(x, c.impressions)
            row[metric] = {
                "impressions_with_" + outcome: x,
                "rate": x / c.impressions if c.impressions else None,
                "ci95": [low, high],
            }
        arms.append(row)
    comparisons = []
    base = counts[control]
    for name in sorted(a for a in counts if a != control):
        c = counts[name]
        for metric, outcome in OUTCOME_METRICS.items():
            lift = relative_lift(
                len(c.converted.get(outcome, ())),
                c.impressions,
                len(base.converted.get(outcome, ())),
                base.impressions,
            )
            comparisons.append(
                {
                    "arm": name,
                    "versus": control,
                    "metric": metric,
                    "relative_lift": lift.lift,
                    "ci95": [lift.low, lift.high],
                    "significant": lift.significant,
                }
            )
    return {
        "experiment": experiment,
        "control": control,
        "unit": "impression (one GetRecommendations answer); rate = share with at least one attributed outcome",
        "arms": arms,
        "comparisons": comparisons,
    }


def pct(v: float | None) -> str:
    return "n/a" if v is None else f"{100 * v:.2f}%"


def format_report(r: dict[str, Any]) -> list[str]:
    lines = [f"experiment {r['experiment']!r}, control arm {r['control']!r}; unit: {r['unit']}"]
    lines.append(f"  {'arm':<14}{'impressions':>12}  {'CTR [95% CI]':<28}{'conversion [95% CI]':<28}")
    for a in r["arms"]:
        cells = []
        for metric in OUTCOME_METRICS:
            m = a[metric]
            cells.append(f"{pct(m['rate'])} [{pct(m['ci95'][0])}, {pct(m['ci95'][1])}]")
        lines.append(f"  {a['arm']:<14}{a['impressions']:>12}  {cells[0]:<28}{cells[1]:<28}")
        by = ", ".join(f"{s} {n}" for s, n in a["impressions_by_strategy"].items())
        lines.append(f"  {'':<14}strategies: {by}")
    for c in r["comparisons"]:
        verdict = "SIGNIFICANT" if c["significant"] else "not significant"
        lo, hi = c["ci95"]
        lines.append(
            f"  {c['metric']:<10} {c['arm']} vs {c['versus']}: lift {pct(c['relative_lift'])} "
            f"[{pct(lo)}, {pct(hi)}] -> {verdict}"
        )
    return lines
