"""Options that only make sense together: an option implies its data set, a contradiction is exit 2.

Before these checks, `stylerec eval --interactions F --user-col ... --protocol temporal`
without the word `csv` evaluated ML-100K and printed its numbers as F's.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from cli.main import main


def clicks(tmp_path: Path) -> Path:
    rows = ["who;what;when"] + [f"u{u};i{(u * 7 + j) % 40};{j * 1000 + u}" for u in range(60) for j in range(8)]
    data = tmp_path / "clicks.csv"
    data.write_text("\n".join(rows) + "\n")
    return data


CSV_ARGS = ["--user-col", "who", "--item-col", "what", "--time-col", "when", "--sep", ";"]


def test_interactions_implies_the_csv_data_set(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = clicks(tmp_path)
    out = tmp_path / "report.json"
    rc = main(["eval", "--interactions", str(data), *CSV_ARGS, "--protocol", "temporal", "--algorithms", "ease",
               "--no-tune", "--out", str(out)])  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    report = json.loads(out.read_text())
    assert report["dataset"]["name"] == "clicks.csv", report["dataset"]
    assert report["protocol"] == "temporal"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["ml-100k", "--interactions", "{data}"], "data set ml-100k contradicts --interactions"),
        (["synthetic", "--user-col", "who"], "data set synthetic contradicts --user-col"),
        (["online-retail", "--sep", ";"], "data set online-retail contradicts --sep"),
        (["csv", "--path", "{data}"], "data set csv contradicts --path"),
        (["ml-100k", "--path", "{data}"], "data set ml-100k contradicts --path"),
        (["--path", "{data}", "--interactions", "{data}"], "name two different data sets"),
        (["--user-col", "who", "--item-col", "what"], "dataset csv needs --interactions FILE"),
        (["--interactions", "{data}", "--user-col", "who"], "dataset csv needs --interactions FILE"),
        (["--interactions", "{missing}", "--user-col", "u", "--item-col", "i"], "no such file"),
        (["--interactions", "{data}", "--user-col", "who", "--item-col", "what", "--protocol", "temporal"],
         "protocol temporal orders interactions by time: pass --time-col"),
        (["--interactions", "{data}", "--user-col", "who", "--item-col", "what", "--protocol", "leave-last-out"],
         "protocol leave-last-out orders interactions by time"),
    ],
)  # fmt: skip
def test_contradicting_options_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    data = clicks(tmp_path)
    argv = [a.format(data=data, missing=tmp_path / "missing.csv") for a in args]
    assert main(["eval", *argv, "--out", str(tmp_path / "r.json")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "r.json").exists(), "nothing may be evaluated when the options contradict"


def test_the_reported_example_as_a_person_types_it(tmp_path: Path) -> None:
    data = clicks(tmp_path)
    res = subprocess.run(
        [sys.executable, "-m", "cli.main", "eval", "ml-100k", "--interactions", str(data), *CSV_ARGS],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert res.returncode == 2
    assert "stylerec: error: data set ml-100k contradicts --interactions" in res.stderr
    assert "Traceback" not in res.stderr


def test_experiment_refuses_a_missing_images_dir(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Before, a mistyped --images-dir quietly ran on generated images instead.
    rc = main(["experiment", "style-lambda", "--images-dir", str(tmp_path / "nope"), "--out-dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 2 and f"--images-dir {tmp_path / 'nope'}: not a folder" in err


def test_recommend_k_must_be_positive(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["recommend", "alice", "-k", "0", "--addr", "127.0.0.1:1"]) == 2
    assert "-k must be 1 or more" in capsys.readouterr().err
