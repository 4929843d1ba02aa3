"""The λ experiment runs end to end on generated images (no ../shared/data needed) and labels itself synthetic."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from cli.evaluation.experiment_style_lambda import run_experiment
from cli.main import main


def test_style_lambda_experiment_without_shared_data(tmp_path: Path) -> None:
    result = run_experiment(None, tmp_path, n_users=200, seed=1)
    assert result["benchmark"].startswith("SYNTHETIC")
    assert "GENERATED images" in result["catalog"]["images"]
    assert 0.0 <= result["chosen"]["lambda"] <= 1.0
    t = result["test"]
    assert 0.0 <= t["ndcg10_cf_only"] <= 1.0 and 0.0 <= t["ndcg10_with_style_rerank"] <= 1.0
    assert (tmp_path / "style_lambda.json").exists()


def test_style_lambda_command_rejects_bad_input(capsys: object) -> None:
    assert main(["experiment", "style-lambda", "--users", "3"]) == 2


# ---------- online experiments: statistics, report, and the simulation through the real stack ----------
def test_wilson_and_lift_intervals() -> None:
    from cli.evaluation.experiment_stats import relative_lift, wilson

    low, high = wilson(10, 100)
    assert (round(low, 4), round(high, 4)) == (0.0552, 0.1744)  # the textbook Wilson interval
    assert wilson(0, 50)[0] == 0.0 and wilson(50, 50)[1] == 1.0 and wilson(0, 0) == (0.0, 1.0)
    up = relative_lift(150, 500, 100, 500)
    assert up.lift is not None and abs(up.lift - 0.5) < 1e-9 and up.significant
    assert up.low is not None and up.high is not None and 0 < up.low < 0.5 < up.high
    assert not relative_lift(105, 500, 100, 500).significant
    assert relative_lift(0, 500, 100, 500).lift is None  # no interval against or of zero


def seed_archive(db: Any, prefix: str) -> tuple[str, str]:
    """Impressions and attributions as the archiver writes them: control 40/200 clicked, treat 70/200."""
    imps, atts = f"{prefix}_impressions", f"{prefix}_attributions"
    rows, outs = [], []
    for arm, clicked, bought in (("control", 40, 10), ("treat", 70, 12)):
        for n in range(200):
            rid = f"rec_{arm}_{n}"
            rows.append(
                {"_id": rid, "experiment": "e1", "arm": arm, "strategy": "CF", "user_id": "u", "items": ["a", "b"]}
            )
            if n < clicked:  # two clicked items of one list still make one clicked impression
                for item in ("a", "b"):
                    outs.append(
                        {
                            "_id": f"{rid}|{item}|click",
                            "experiment": "e1",
                            "arm": arm,
                            "outcome": "click",
                            "recommendation_id": rid,
                        }
                    )
            if n < bought:
                outs.append(
                    {
                        "_id": f"{rid}|a|purchase",
                        "experiment": "e1",
                        "arm": arm,
                        "outcome": "purchase",
                        "recommendation_id": rid,
                    }
                )
    rows.append({"_id": "rec_other", "experiment": "e2", "arm": "x", "strategy": "CF", "user_id": "u", "items": ["a"]})
    db[imps].insert_many(rows)
    db[atts].insert_many(outs)
    return imps, atts


def test_report_command_json_text_and_bad_arguments(infra: Any, capsys: Any) -> None:
    import json as jsonlib
    import uuid

    from pymongo import MongoClient

    client: MongoClient[Any] = MongoClient(infra.mongo_uri)
    imps, atts = seed_archive(client["stylerec"], f"rep_{uuid.uuid4().hex[:8]}")
    client.close()
    base = [
        "experiment",
        "report",
        "--mongo-uri",
        infra.mongo_uri,
        "--impressions-collection",
        imps,
        "--attributions-collection",
        atts,
    ]
    assert main([*base, "--experiment", "e1", "--json"]) == 0
    r = jsonlib.loads(capsys.readouterr().out)
    assert r["control"] == "control" and [a["arm"] for a in r["arms"]] == ["control", "treat"]
    control, treat = r["arms"]
    assert control["impressions"] == 200 and control["ctr"]["impressions_with_click"] == 40
    assert control["ctr"]["rate"] == 0.2 and treat["ctr"]["rate"] == 0.35 and treat["attributed_items"]["click"] == 140
    assert [round(x, 4) for x in control["ctr"]["ci95"]] == [0.1505, 0.2609]  # Wilson, z = 1.96
    ctr = next(c for c in r["comparisons"] if c["metric"] == "ctr")
    conv = next(c for c in r["comparisons"] if c["metric"] == "conversion")
    assert abs(ctr["relative_lift"] - 0.75) < 1e-9 and ctr["significant"] and ctr["ci95"][0] > 0
    assert not conv["significant"] and conv["ci95"][0] < 0 < conv["ci95"][1]
    assert main([*base, "--experiment", "e1", "--control", "treat"]) == 0
    text = capsys.readouterr().out
    assert "control arm 'treat'" in text and "SIGNIFICANT" in text and "not significant" in text

    # Bad arguments: exit 2 and a message naming what is allowed.
    assert main([*base]) == 2  # two experiments in the archive: which one?
    assert "e1, e2" in capsys.readouterr().err
    assert main([*base, "--experiment", "nope"]) == 2
    assert "experiments in the archive: e1, e2" in capsys.readouterr().err
    assert main([*base, "--experiment", "e1", "--control", "zzz"]) == 2
    assert "arms: control, treat" in capsys.readouterr().err
    assert main(["experiment", "report", "--mongo-uri", "http://x"]) == 2
    assert "mongodb://" in capsys.readouterr().err
    assert main(["experiment", "online", "--users", "3"]) == 2
    assert main(["experiment", "online", "--requests-per-user", "0"]) == 2


def test_online_experiment_finds_the_planted_lift_and_no_aa_difference(infra: Any) -> None:
    """SYNTHETIC shoppers through a real ingestion and two real gateways on the session infra."""
    from cli.evaluation.experiment_online import SYNTHETIC, run_online

    t0 = time.monotonic()
    # Printed lines show in the report of a failure: how far each stage got, and when.
    result = run_online(
        150, 2, seed=7, stack=infra, redis_db=9, progress=lambda line: print(f"{time.monotonic() - t0:6.1f} s {line}")
    )
    assert result["benchmark"] == SYNTHETIC
    p = result["pipeline"]
    assert p["impressions_archived"] == p["impressions_sent"] == 600
    assert p["attributed_as_planted"] == p["outcomes_planted"] > 100 and p["attributed_not_planted"] == 0
    planted = next(c for c in result["reports"]["planted"]["comparisons"] if c["metric"] == "ctr")
    assert planted["significant"] and planted["ci95"][0] > 0, planted
    for c in result["reports"]["aa"]["comparisons"]:
        assert not c["significant"] and c["ci95"][0] < 0 < c["ci95"][1], c
    assert all(result["checks"].values()), result["checks"]
    strategies = {a["arm"]: a["impressions_by_strategy"] for a in result["reports"]["planted"]["arms"]}
    assert set(strategies["control"]) == {"CF"} and set(strategies["style"]) == {"STYLE_PERSONALIZED"}
