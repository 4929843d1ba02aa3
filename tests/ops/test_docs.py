"""The configuration reference and the metrics catalog are generated from the code and
must be committed fresh; the README's Deploy section points at them."""

from __future__ import annotations

from tests.ops.metrics_catalog import REPO, gen_docs


def test_generated_docs_are_fresh(capsys: object) -> None:
    rc = gen_docs().main(["--check"])
    assert rc == 0, "docs/configuration.md or docs/metrics.md is stale: run .venv/bin/python scripts/gen_config_docs.py"


def test_every_setting_is_documented() -> None:
    doc = (REPO / "docs/configuration.md").read_text()
    gen = gen_docs()
    for svc, cls in gen.settings_classes().items():
        for field in cls.model_fields:
            env = gen.env_name(cls, field)
            assert f"`{env}`" in doc, f"{env} ({svc}) missing from docs/configuration.md"


def test_every_metric_is_in_the_catalog() -> None:
    doc = (REPO / "docs/metrics.md").read_text()
    for name, m in gen_docs().declared_metrics().items():
        assert f"| `{name}` | {m.type} |" in doc, name
        assert name.startswith("stylerec_"), f"{name}: every StyleRec metric is prefixed stylerec_"
        if m.type == "counter":
            assert name.endswith("_total")
        assert not any(label in {"user_id", "user", "item_id", "item", "event_id"} for label in m.labels), (
            f"{name}: per-user/per-item labels explode cardinality and leak personal data"
        )


def test_deploy_docs_point_at_the_generated_reference() -> None:
    readme = (REPO / "README.md").read_text()
    deploy = readme.split("## Deploy", 1)[1]
    for needle in ("docs/deploy.md", "docs/configuration.md", "docker compose", "kubectl apply -k"):
        assert needle in deploy, needle
    guide = (REPO / "docs/deploy.md").read_text()
    alerts = [line.split("|")[1].strip() for line in guide.splitlines() if line.startswith("| StyleRec")]
    from tests.ops.promql import load_rules

    assert sorted(alerts) == sorted(r["alert"] for r in load_rules() if "alert" in r), "alert table in docs/deploy.md"
