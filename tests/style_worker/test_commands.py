"""`stylerec style-eval` and `stylerec bench style` as a person runs them (small inputs: fast)."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from tests.style_worker.conftest import photo, texture

STYLEREC = [sys.executable, "-m", "cli.main"]


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*STYLEREC, *args], capture_output=True, text=True, timeout=240)


def test_style_eval_writes_report_and_contact_sheet(tmp_path: Path) -> None:
    products, styles, out = tmp_path / "p", tmp_path / "s", tmp_path / "out"
    products.mkdir()
    styles.mkdir()
    photo(200, 150, seed=1).save(products / "a.png")
    texture(seed=2).save(styles / "t.png")
    (styles / "notes.txt").write_text("ignored: not an image suffix")
    res = run("style-eval", "--products", str(products), "--styles", str(styles), "--out", str(out), "--json")
    assert res.returncode == 0, res.stderr
    summary = json.loads(res.stdout)
    assert summary["pairs"] == 1 and summary["all_gains_positive"] is True
    report = json.loads((out / "style_eval.json").read_text())
    [pair] = report["pairs"]
    assert pair["content"] == "a.png" and pair["style"] == "t.png"
    assert 0 < pair["ssim"] < 1 and pair["psnr_db"] > 0 and pair["style_gain"] > 0 and pair["latency_s"] > 0
    assert pair["style_consistency"] > pair["content_style_cosine"]
    assert report["synthetic"] is False
    sheet = Image.open(out / "contact_sheet.png")
    assert sheet.size[1] >= 160


def test_style_eval_bad_folder_exits_2(tmp_path: Path) -> None:
    res = run("style-eval", "--products", str(tmp_path / "nope"), "--out", str(tmp_path / "o"))
    assert res.returncode == 2 and "is not a folder" in res.stderr and "Traceback" not in res.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    res = run("style-eval", "--products", str(empty), "--out", str(tmp_path / "o"))
    assert res.returncode == 2 and "holds no images" in res.stderr


def test_bench_style_writes_ratios(tmp_path: Path) -> None:
    out = tmp_path / "style.json"
    res = run(
        "bench", "style", "--images", "2", "--repeats", "1", "--batch-sizes", "1,2",
        "--models", "predict", "--modes", "sequential,parallel", "--out", str(out),
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    report = json.loads(out.read_text())
    rows = report["models"]["arbitrary_predict"]
    assert set(rows) == {"1", "2"}
    for row in rows.values():
        assert row["bare"]["images_per_s"] > 0
        for mode in ("sequential", "parallel"):
            assert row[mode]["ratio_vs_bare"] > 0 and row[mode]["p95_ms"] >= row[mode]["p50_ms"]
    assert report["provider"] == "CPUExecutionProvider" or report["provider"].endswith("ExecutionProvider")
    assert report["best_mode"] in ("sequential", "parallel")


def test_bench_style_refuses_a_provider_that_does_not_load(tmp_path: Path) -> None:
    from services.style_worker.providers import cuda_device_count

    res = run("bench", "style", "--provider", "cuda", "--images", "1", "--out", str(tmp_path / "x.json"))
    if cuda_device_count()[0] == 0:  # this dev box: no GPU
        assert res.returncode == 2 and "does not load" in res.stderr and "Traceback" not in res.stderr
    res = run("bench", "style", "--batch-sizes", "0", "--out", str(tmp_path / "x.json"))
    assert res.returncode == 2 and "1..64" in res.stderr


def test_style_eval_without_shared_data_uses_labelled_synthetic_images(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import cli.evaluation.style_commands as sc

    monkeypatch.setattr(sc, "SHARED_IMAGES", tmp_path / "no-shared-data")
    args = argparse.Namespace(products=None, styles=None, out=tmp_path / "out", limit=2, json=True)
    assert sc.cmd_style_eval(args) == 0
    report = json.loads((tmp_path / "out" / "style_eval.json").read_text())
    assert report["synthetic"] is True and report["products_source"] == "synthetic"
    assert report["summary"]["pairs"] == 2
    assert "SYNTHETIC" in capsys.readouterr().err
