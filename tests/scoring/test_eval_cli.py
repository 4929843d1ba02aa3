"""`stylerec eval`: bad input gets a message and exit code 2; a small run writes its JSON report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cli.main import main


def test_bad_input_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert (
        main(["eval", "csv", "--interactions", str(tmp_path / "missing.csv"), "--user-col", "u", "--item-col", "i"])
        == 2
    )
    assert "no such file" in capsys.readouterr().err
    assert main(["eval", "synthetic", "--algorithms", "ease,svd"]) == 2
    assert "unknown algorithm" in capsys.readouterr().err
    assert main(["eval", "csv", "--interactions", str(tmp_path / "x.csv")]) == 2


def test_csv_run_writes_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rows = ["who;what;when"] + [f"u{u};i{(u * 7 + j) % 40};{j * 1000 + u}" for u in range(60) for j in range(8)]
    data = tmp_path / "clicks.csv"
    data.write_text("\n".join(rows) + "\n")
    out = tmp_path / "report.json"
    rc = main(
        [
            "eval",
            "csv",
            "--interactions",
            str(data),
            "--user-col",
            "who",
            "--item-col",
            "what",
            "--time-col",
            "when",
            "--sep",
            ";",
            "--protocol",
            "temporal",
            "--algorithms",
            "ease",
            "--no-tune",
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    report = json.loads(out.read_text())
    assert [r["algorithm"] for r in report["results"]] == ["popularity", "ease"]
    assert report["protocol"] == "temporal"
    assert "| ease |" in capsys.readouterr().out
