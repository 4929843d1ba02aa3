"""docker-compose.yml against the Compose Specification JSON schema, plus the checks the
schema cannot make: real KRaft Kafka, health checks everywhere, start-up ordering on
health, a GPU profile, every STYLEREC_ variable a real settings field, mounts present."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from libs.common.settings import ServiceSettings
from tests.ops.metrics_catalog import gen_docs

REPO = Path(__file__).resolve().parents[2]
# The schema ships with the shared workspace, next to the repository. Missing = failure:
# the compose file would otherwise go unvalidated in CI without anyone noticing.
SCHEMA = REPO.parent / "shared" / "schemas" / "compose-spec.json"
OUR_SERVICES = {
    "ingestion": "ingestion",
    "scoring": "scoring",
    "style-worker": "style-worker",
    "style-worker-gpu": "style-worker",
    "gateway": "gateway",
}


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return dict(yaml.safe_load((REPO / "docker-compose.yml").read_text()))


def test_schema_is_available() -> None:
    assert SCHEMA.exists(), f"Compose Specification schema missing at {SCHEMA} (../shared/schemas/compose-spec.json)"


def test_validates_against_compose_spec(compose: dict[str, Any]) -> None:
    schema = json.loads(SCHEMA.read_text())
    validator = jsonschema.Draft7Validator(schema)
    errors = sorted(validator.iter_errors(compose), key=lambda e: list(e.absolute_path))
    assert not errors, "\n".join(f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in errors[:20])


def test_schema_validation_catches_mistakes(compose: dict[str, Any]) -> None:
    # Guard against a vacuous validator: a misspelled key must be rejected.
    broken = json.loads(json.dumps(compose))
    broken["services"]["gateway"]["helthcheck"] = broken["services"]["gateway"].pop("healthcheck")
    validator = jsonschema.Draft7Validator(json.loads(SCHEMA.read_text()))
    assert list(validator.iter_errors(broken))


def test_stack_members(compose: dict[str, Any]) -> None:
    services = compose["services"]
    for name in ["kafka", "kafka-init", "redis", "mongo", "ingestion", "scoring", "style-worker", "gateway",
                 "prometheus", "grafana", "style-worker-gpu"]:  # fmt: skip
        assert name in services, name
    assert not any("zookeeper" in n for n in services), "KRaft mode: no ZooKeeper"
    kafka = services["kafka"]
    assert kafka["image"].startswith("apache/kafka:")
    assert "controller" in kafka["environment"]["KAFKA_PROCESS_ROLES"]
    assert str(kafka["environment"]["KAFKA_AUTO_CREATE_TOPICS_ENABLE"]).lower() == "false"
    assert re.fullmatch(r"[A-Za-z0-9_-]{22}", kafka["environment"]["CLUSTER_ID"]), "CLUSTER_ID must be a base64 UUID"
    init = services["kafka-init"]
    assert init["entrypoint"] == ["python", "-m", "libs.common.create_topics"]
    assert (REPO / "libs/common/create_topics.py").exists()
    assert services["redis"]["image"].startswith("redis:")
    assert services["mongo"]["image"].startswith("mongo:")


def test_health_checks_and_ordering(compose: dict[str, Any]) -> None:
    services = compose["services"]
    for name, svc in services.items():
        hc = svc.get("healthcheck")
        if name == "kafka-init":
            assert hc == {"disable": True}, "the one-shot job has no health to report"
            continue
        assert hc and hc.get("test"), f"{name} has no healthcheck"
        for dep, cond in svc.get("depends_on", {}).items():
            assert isinstance(cond, dict), f"{name}: depends_on {dep} must use the long form with a condition"
            want = "service_completed_successfully" if dep == "kafka-init" else "service_healthy"
            assert cond.get("condition") == want, f"{name} -> {dep}: condition {cond.get('condition')}, want {want}"
    for name in OUR_SERVICES:
        svc = services[name]
        assert svc["healthcheck"]["test"] == ["CMD", "python", "-m", "libs.common.healthcheck"], name
        deps = svc["depends_on"]
        assert {"kafka-init", "redis", "mongo"} <= set(deps), f"{name} must wait for its backbone"
    assert services["kafka-init"]["depends_on"]["kafka"]["condition"] == "service_healthy"
    assert services["gateway"]["depends_on"]["scoring"]["condition"] == "service_healthy"


def test_services_are_hardened(compose: dict[str, Any]) -> None:
    for name in OUR_SERVICES:
        svc = compose["services"][name]
        assert svc["read_only"] is True, name
        assert svc["cap_drop"] == ["ALL"], name
        assert "no-new-privileges:true" in svc["security_opt"], name
        assert svc["deploy"]["resources"]["limits"]["memory"], name


def test_builds_point_at_existing_dockerfiles(compose: dict[str, Any]) -> None:
    from tests.ops.dockerfile import parse

    built = set()
    for name, svc in compose["services"].items():
        build = svc.get("build")
        if not build:
            continue
        context = REPO / build["context"]
        assert context.is_dir(), name
        dockerfile = context / build["dockerfile"]
        assert dockerfile.is_file(), f"{name}: {build['dockerfile']} missing"
        # One Dockerfile for every service; the target picks the image.
        assert build["dockerfile"] == "deploy/docker/service.Dockerfile", f"{name}: {build['dockerfile']}"
        stages = {s.name for s in parse(dockerfile)[1]}
        assert build.get("target") in stages, f"{name}: target {build.get('target')!r} is not a stage of {dockerfile}"
        # The image name says which target it was built from (kafka-init reuses the ingestion image).
        assert svc["image"].split(":")[0] == f"stylerec/{build['target']}", f"{name}: {svc['image']}"
        built.add(build["target"])
    assert built == {"ingestion", "scoring", "style-worker", "style-worker-gpu", "gateway"}


def test_gpu_profile(compose: dict[str, Any]) -> None:
    gpu = compose["services"]["style-worker-gpu"]
    assert gpu["profiles"] == ["gpu"]
    assert gpu["build"]["target"] == "style-worker-gpu"
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    assert "style-worker" in gpu["networks"]["default"]["aliases"]
    for name, svc in compose["services"].items():
        if name != "style-worker-gpu":
            assert "profiles" not in svc, f"{name} must start without a profile"


def test_environment_names_are_real_settings(compose: dict[str, Any]) -> None:
    """A typo in an env var name is silently ignored by pydantic (extra='ignore'): catch it here."""
    classes = gen_docs().settings_classes()
    for name, svc_key in OUR_SERVICES.items():
        cls = classes[svc_key]
        env = compose["services"][name]["environment"]
        for key in env:
            assert key.startswith("STYLEREC_"), f"{name}: {key}"
            field = key.removeprefix("STYLEREC_").lower()
            assert field in cls.model_fields, f"{name}: {key} is not a field of {cls.__name__}"
        assert int(env["STYLEREC_GRPC_PORT"]) == cls.model_fields["grpc_port"].default
        assert int(env["STYLEREC_METRICS_PORT"]) == cls.model_fields["metrics_port"].default
    gw = compose["services"]["gateway"]["environment"]
    assert gw["STYLEREC_SCORING_ADDR"] == "scoring:50052"
    assert gw["STYLEREC_STYLE_WORKER_ADDR"] == "style-worker:50053"
    assert "pseudonym_secret" in ServiceSettings.model_fields


def test_secret_is_required_not_defaulted() -> None:
    text = (REPO / "docker-compose.yml").read_text()
    assert re.search(r"STYLEREC_PSEUDONYM_SECRET: \$\{STYLEREC_PSEUDONYM_SECRET:\?", text), (
        "compose must refuse to start without a real pseudonymization key"
    )


def test_observability_mounts_exist(compose: dict[str, Any]) -> None:
    for name in ("prometheus", "grafana"):
        for volume in compose["services"][name]["volumes"]:
            src = str(volume).split(":")[0]
            if src.startswith("./"):
                assert (REPO / src).exists(), f"{name} mounts missing {src}"
    prom = yaml.safe_load((REPO / "deploy/prometheus/prometheus.yml").read_text())
    scraped = {}
    for job in prom["scrape_configs"]:
        for sd in job.get("dns_sd_configs", []):
            for host in sd["names"]:
                scraped[host] = sd["port"]
    for name in ("ingestion", "scoring", "style-worker", "gateway"):
        port = int(compose["services"][name]["environment"]["STYLEREC_METRICS_PORT"])
        assert scraped.get(name) == port, f"Prometheus does not scrape {name}:{port}"
