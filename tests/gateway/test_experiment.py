"""The λ experiment runs end to end on generated images (no ../shared/data needed) and labels itself synthetic."""

from __future__ import annotations

from pathlib import Path

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
