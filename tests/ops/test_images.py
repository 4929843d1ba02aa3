"""Container images, checked without a Docker engine (there is none on dev or CI machines).

The four services (and the GPU style worker) are targets of one Dockerfile,
deploy/docker/service.Dockerfile. What ``docker build --target T`` from the
repository root would need and produce is checked statically: a slim final base
reached only through the runtime stages, a non-root user, no build tools or
tests in the image, a gRPC HEALTHCHECK, MALLOC_ARENA_MAX=2 and jemalloc, every COPY source
present in the build context after .dockerignore, the entry point module
shipped, and nothing the service imports left out of the image's requirement set.
"""

from __future__ import annotations

import ast
import importlib.metadata as md
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.ops.dockerfile import DockerIgnore, Stage, copy_sources, image, parse, stage_arg

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "deploy" / "docker" / "service.Dockerfile"
# target -> (service package, requirement set, the build ARG that cuts the set)
TARGETS = {
    "ingestion": ("ingestion", "light", "DROP_LIGHT"),
    "scoring": ("scoring", "scoring", "DROP_SCORING"),
    "style-worker": ("style_worker", "style", "DROP_STYLE"),
    "style-worker-gpu": ("style_worker", "style", "DROP_STYLE"),
    "gateway": ("gateway", "light", "DROP_LIGHT"),
}
SERVICES = ["ingestion", "scoring", "style_worker", "gateway"]
BUILD_TOOLS = re.compile(
    r"\b(gcc|g\+\+|build-essential|make|cmake|python3-dev|python3-pip|python3-venv|git|curl|wget)\b"
)
FIRST_PARTY = {"libs", "services", "cli", "tests", "scripts", "stylerec", "gen"}


def stages() -> list[Stage]:
    return parse(DOCKERFILE)[1]


def by_name(name: str) -> Stage:
    return {s.name: s for s in stages()}[name]


def final_stage(target: str) -> Stage:
    return image(stages(), target)


def venv_stage(target: str) -> str:
    """The stage the image's /opt/venv is copied from."""
    own = by_name(target)
    froms = [copy_sources(i) for i in own.all("COPY") if "from" in copy_sources(i)[2]]
    venvs = [flags["from"] for srcs, _dest, flags in froms if srcs == ["/opt/venv"]]
    assert len(venvs) == 1, f"{target}: expected one COPY --from=<deps> /opt/venv, got {venvs}"
    return venvs[0]


def context_files() -> list[str]:
    """Files a clean clone has (tracked and not ignored), relative to the repo root."""
    out = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    return [f for f in out if (REPO / f).exists()]


@pytest.fixture(scope="module")
def dockerignore() -> DockerIgnore:
    return DockerIgnore((REPO / ".dockerignore").read_text())


def test_one_dockerfile_for_every_service() -> None:
    # A per-service copy would drift from the shared shape again: there must be none.
    leftovers = sorted(str(p.relative_to(REPO)) for p in (REPO / "services").glob("*/Dockerfile*"))
    assert not leftovers, f"per-service Dockerfiles are back: {leftovers} (use deploy/docker/service.Dockerfile)"
    names = [s.name for s in stages()]
    assert len(names) == len(set(names)), f"duplicate stage names: {names}"
    assert set(TARGETS) <= set(names)
    for svc in SERVICES:
        assert svc in {pkg for pkg, _set, _arg in TARGETS.values()}, f"no image target for services/{svc}"


def test_dockerignore_keeps_local_state_out(dockerignore: DockerIgnore) -> None:
    for path in [".venv/bin/python", "gen/stylerec/v1/common_pb2.py", ".git/HEAD", "tests/conftest.py", "out/x.json"]:
        assert dockerignore.excluded(path), f"{path} would be sent to the Docker build context"
    for path in ["requirements.txt", "protos/stylerec/v1/common.proto", "libs/common/server.py"]:
        assert not dockerignore.excluded(path), f"{path} is needed by the image builds but .dockerignore drops it"
    assert dockerignore.excluded("libs/common/__pycache__/server.cpython-311.pyc")


@pytest.mark.parametrize("target", TARGETS)
def test_multistage_slim_nonroot(target: str) -> None:
    final = final_stage(target)
    if target.endswith("-gpu"):
        assert final.base.startswith("nvidia/cuda:") and "cudnn-runtime" in final.base, final.base
    else:
        assert re.fullmatch(r"python:3\.11-slim(-[a-z]+)?", final.base), f"final stage base {final.base}"
    # Multi-stage: the packages come from a deps stage, never installed into the image's own chain.
    assert venv_stage(target).startswith("deps-"), venv_stage(target)
    users = final.all("USER")
    assert users, "the final stage must switch to a non-root USER"
    user = users[-1].args.split(":")[0]
    assert user not in ("root", "0"), f"USER {user} is root"
    assert user.isdigit(), "a numeric USER lets Kubernetes verify runAsNonRoot"
    assert int(user) == 10001, "k8s manifests and compose run as uid 10001"
    env = " ".join(i.args for i in final.all("ENV"))
    # glibc's default arenas let the gRPC servers' RSS creep under load (docs/load.md).
    assert re.search(r"\bMALLOC_ARENA_MAX=2\b", env), f"{target}: MALLOC_ARENA_MAX=2 missing"
    # pymalloc kept every transient peak in ingestion's RSS; jemalloc, installed in the image, gives it
    # back. Scoring stays on pymalloc, which packs its state tighter (docs/load.md). The last ENV wins.
    preload, pymalloc = re.findall(r"\bLD_PRELOAD=(\S*)", env), re.findall(r"\bPYTHONMALLOC=(\S+)", env)
    want = ("", "pymalloc") if target == "scoring" else ("libjemalloc.so.2", "malloc")
    assert (preload[-1:], pymalloc[-1:]) == ([want[0]], [want[1]]), f"{target}: allocator {preload} {pymalloc}"
    installs = " ".join(" ".join(re.findall(r"apt-get install[^&;]*", i.args)) for i in final.all("RUN"))
    assert re.search(r"\blibjemalloc2\b", installs), f"{target}: libjemalloc2 not installed in the final stage"


@pytest.mark.parametrize("target", TARGETS)
def test_final_stage_has_no_build_tools_or_tests(target: str) -> None:
    final = final_stage(target)
    for ins in final.all("RUN"):
        installs = re.findall(r"apt-get install[^&;]*", ins.args)
        for cmd in installs:
            assert not BUILD_TOOLS.search(cmd), f"line {ins.line}: build tool installed in the final stage: {cmd}"
        assert "pip install" not in ins.args, (
            f"line {ins.line}: pip runs in the final stage; install in the build stage"
        )
    for ins in final.all("COPY") + final.all("ADD"):
        sources, _dest, flags = copy_sources(ins)
        if "from" in flags:
            continue
        for src in sources:
            assert not src.startswith("tests"), f"line {ins.line}: tests copied into the image"
            assert src not in (".", "./"), f"line {ins.line}: the whole context is copied into the image"
    # The tooling venv (grpcio-tools) must never be copied over.
    copied_from_build = [copy_sources(i)[0] for i in final.all("COPY") if "from" in copy_sources(i)[2]]
    assert ["/opt/venv"] in copied_from_build
    assert all("/opt/tools" not in src for srcs in copied_from_build for src in srcs)


def test_copy_sources_exist_in_build_context(dockerignore: DockerIgnore) -> None:
    files = context_files()
    all_stages = stages()
    for stage in all_stages:
        for ins in stage.all("COPY") + stage.all("ADD"):
            sources, _dest, flags = copy_sources(ins)
            if "from" in flags:
                assert flags["from"] in {s.name for s in all_stages}, f"line {ins.line}: unknown stage {flags['from']}"
                continue
            for src in sources:
                src = src.rstrip("/")
                under = [f for f in files if f == src or f.startswith(src + "/")]
                assert under, f"line {ins.line}: COPY source {src!r} does not exist in the repository"
                sent = [f for f in under if not dockerignore.excluded(f)]
                assert sent, f"line {ins.line}: COPY source {src!r} is excluded by .dockerignore"


@pytest.mark.parametrize("target", TARGETS)
def test_entrypoint_and_healthcheck_modules_are_shipped(target: str) -> None:
    final = final_stage(target)
    svc = TARGETS[target][0]
    entry = final.all("ENTRYPOINT")[-1].exec_form()
    assert entry == ["python", "-m", f"services.{svc}"], entry
    assert (REPO / "services" / svc / "__main__.py").exists()
    health = final.all("HEALTHCHECK")
    assert health, "no HEALTHCHECK"
    cmd = health[-1].exec_form()
    assert cmd == ["python", "-m", "libs.common.healthcheck"], cmd
    assert (REPO / "libs/common/healthcheck.py").exists()
    copied = {copy_sources(i)[0][0].rstrip("/") for i in final.all("COPY") if "from" not in copy_sources(i)[2]}
    assert {"libs", f"services/{svc}", "services/__init__.py"} <= copied
    others = {f"services/{s}" for s in SERVICES if s != svc}
    assert not copied & others, f"{target} ships another service's code: {copied & others}"
    env = " ".join(i.args for i in final.all("ENV"))
    ports = dict(re.findall(r"STYLEREC_(GRPC_PORT|METRICS_PORT)=(\d+)", env))
    exposed = set(" ".join(i.args for i in final.all("EXPOSE")).split())
    assert set(ports.values()) <= exposed, f"EXPOSE {exposed} misses {ports}"
    # The healthcheck reads STYLEREC_GRPC_PORT; it must match the service's own default port.
    settings_cls = {
        "ingestion": "IngestionSettings",
        "scoring": "ScoringSettings",
        "style_worker": "StyleWorkerSettings",
        "gateway": "GatewaySettings",
    }[svc]
    module = __import__(f"services.{svc}.config", fromlist=[settings_cls])
    fields = getattr(module, settings_cls).model_fields
    assert int(ports["GRPC_PORT"]) == fields["grpc_port"].default
    assert int(ports["METRICS_PORT"]) == fields["metrics_port"].default


def test_gpu_variant_uses_onnxruntime_gpu_and_cuda_base() -> None:
    deps = by_name(venv_stage("style-worker-gpu"))
    assert "cudnn" in deps.base and "cudnn" in final_stage("style-worker-gpu").base, (
        "build and runtime of the GPU image must share the CUDA base (same python)"
    )
    build = by_name("build")
    dropped = (stage_arg(build, "DROP_ALWAYS") + " " + stage_arg(build, "DROP_STYLE")).split()
    assert "onnxruntime-gpu" not in dropped
    assert "onnxruntime-gpu==" in (REPO / "requirements.txt").read_text()
    assert not re.search(r"^onnxruntime==", (REPO / "requirements.txt").read_text(), re.M)


def test_scoring_torch_is_the_pinned_cpu_wheel() -> None:
    deps = by_name(venv_stage("scoring"))
    text = " ".join(i.args for i in deps.instructions)
    assert "download.pytorch.org/whl/cpu" in text
    assert "grep -iE '^torch==' requirements.txt" in text
    assert re.search(r"^torch==2\.13\.0$", (REPO / "requirements.txt").read_text(), re.M)


# ---------- nothing a service imports is left out of its image ----------


def _imports(py: Path) -> set[str]:
    tree = ast.parse(py.read_text(), filename=str(py))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def _requirement_names(path: Path) -> set[str]:
    out = set()
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            out.add(_norm(re.split(r"[=<>!~\[; ]", line, maxsplit=1)[0]))
    return out


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _closure(dists: set[str]) -> set[str]:
    """The given distributions plus everything they require (as installed here)."""
    seen: set[str] = set()
    todo = list(dists)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            reqs = md.requires(name) or []
        except md.PackageNotFoundError:
            continue
        for req in reqs:
            if "extra ==" in req:
                continue
            todo.append(_norm(re.split(r"[=<>!~\[; (]", req, maxsplit=1)[0]))
    return seen


@pytest.mark.parametrize("target", TARGETS)
def test_every_import_of_the_service_is_installed_in_its_image(target: str) -> None:
    svc, req_set, drop_arg = TARGETS[target]
    build = by_name("build")
    # The wiring this test relies on: the image's venv comes from the deps stage that installs
    # requirements.<set>.txt, which the build stage cuts with <drop_arg>.
    cut = " ".join(i.args for i in build.all("RUN"))
    assert f'cut_set "${{{drop_arg}}}" > requirements.{req_set}.txt' in cut, f"build stage does not cut {req_set}"
    deps = by_name(venv_stage(target))
    installs = " ".join(i.args for i in deps.all("RUN") + deps.all("COPY"))
    assert f"requirements.{req_set}.txt" in installs, f"{deps.name} does not install requirements.{req_set}.txt"
    dropped = {_norm(p) for p in (stage_arg(build, "DROP_ALWAYS") + " " + stage_arg(build, drop_arg)).split()}
    kept_nodeps: set[str] = set()
    if "requirements.nodeps.txt" in installs:
        kept_nodeps = {_norm(p) for p in stage_arg(build, "KEEP_NODEPS").split()}
    runtime = (_requirement_names(REPO / "requirements.txt") - dropped) | kept_nodeps
    if "whl/cpu" in installs:
        runtime.add("torch")
    installed = _closure(runtime)
    dist_of = {k: [_norm(d) for d in v] for k, v in md.packages_distributions().items()}
    stdlib = set(sys.stdlib_module_names) | {"__future__"}

    sources = sorted((REPO / "libs").rglob("*.py")) + sorted((REPO / "services" / svc).rglob("*.py"))
    problems = []
    for py in sources:
        for module in _imports(py):
            top = module.split(".")[0]
            if top in stdlib:
                continue
            if top in FIRST_PARTY:
                if top == "services" and module.count(".") >= 1 and module.split(".")[1] != svc:
                    problems.append(
                        f"{py.relative_to(REPO)} imports {module}: another service's code is not in the image"
                    )
                elif top in {"cli", "tests", "scripts", "gen"}:
                    problems.append(f"{py.relative_to(REPO)} imports {module}: {top}/ is not in the image")
                continue
            dists = dist_of.get(top)
            if not dists:
                problems.append(f"{py.relative_to(REPO)} imports {module}: not installed in the dev venv either")
                continue
            if not any(d in installed for d in dists):
                problems.append(f"{py.relative_to(REPO)} imports {module} ({'/'.join(dists)}): dropped from the image")
    assert not problems, "\n".join(problems)


def test_drop_list_is_parsed_like_the_shell_does() -> None:
    # Guard the test's own reading of the ARGs: the RUN line turns them into a grep alternation.
    build = by_name("build")
    run = [i.args for i in build.all("RUN") if "DROP_ALWAYS" in i.args]
    assert run and "tr ' ' '|'" in run[0]
    assert "torch" in stage_arg(build, "DROP_LIGHT").split()
    assert "pytest" in stage_arg(build, "DROP_ALWAYS").split()
