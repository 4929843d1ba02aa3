"""The gRPC server bootstrap every service uses: one shape for all four.

It wires the metrics interceptor, ``grpc.health.v1`` (SERVING only while the
service's dependencies answer), server reflection, the /metrics endpoint and
graceful shutdown on SIGTERM/SIGINT: health flips to NOT_SERVING, the server
stops accepting and gives in-flight calls ``shutdown_grace_s`` to finish, then
the registered shutdown hooks run in reverse order (stop consumers so they
commit, flush producers, close clients).
"""

from __future__ import annotations

import logging
import signal
import socket
import threading
from collections.abc import Callable, Sequence
from concurrent import futures
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from libs.common.metrics import DEPENDENCY_UP, SERVING, MetricsInterceptor, start_metrics_server
from libs.common.settings import ServiceSettings

log = logging.getLogger(__name__)

Probe = Callable[[], bool]

# Health service name that is SERVING whenever the process runs, whatever its
# dependencies say. Kubernetes liveness probes ask for it (``grpc.service``) so a
# Redis or Kafka outage makes pods unready (traffic moves away) without
# restarting them in a loop; readiness asks for "" (dependencies included).
LIVENESS_SERVICE = "stylerec.liveness"


def tcp_probe(addresses: Sequence[str], timeout_s: float = 1.0) -> Probe:
    """Reachable = at least one host:port accepts a TCP connection."""

    def probe() -> bool:
        for addr in addresses:
            host, _, port = addr.rpartition(":")
            try:
                with socket.create_connection((host, int(port)), timeout=timeout_s):
                    return True
            except OSError:
                continue
        return False

    return probe


def redis_probe(client: Any) -> Probe:
    def probe() -> bool:
        try:
            return bool(client.ping())
        except Exception:
            return False

    return probe


def mongo_probe(client: Any) -> Probe:
    def probe() -> bool:
        try:
            client.admin.command("ping")
            return True
        except Exception:
            return False

    return probe


class ServiceRuntime:
    """Holds the gRPC server, health state and shutdown hooks of one service process."""

    def __init__(self, settings: ServiceSettings, interceptors: Sequence[grpc.ServerInterceptor] = ()) -> None:
        self.settings = settings
        self.server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=settings.grpc_workers, thread_name_prefix="grpc"),
            interceptors=[MetricsInterceptor(), *interceptors],
            options=[
                ("grpc.max_receive_message_length", settings.grpc_max_receive_bytes),
                ("grpc.max_send_message_length", settings.grpc_max_send_bytes),
                ("grpc.so_reuseport", 0),
            ],
        )
        self.health = health.HealthServicer(experimental_non_blocking=True)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self._service_names: list[str] = [health.SERVICE_NAME]
        self._probes: dict[str, Probe] = {}
        self._hooks: list[Callable[[], None]] = []
        self._stopped = threading.Event()
        self._serving = False
        self.port = 0
        self.metrics_port = 0

    def add_service(self, full_name: str, register: Callable[[Any, grpc.Server], None], servicer: Any) -> None:
        """Register a servicer; ``full_name`` is e.g. ``stylerec.v1.GatewayService``."""
        register(servicer, self.server)
        self._service_names.append(full_name)

    def require(self, name: str, probe: Probe) -> None:
        """Health reports SERVING only while every required probe passes."""
        self._probes[name] = probe

    def on_shutdown(self, hook: Callable[[], None]) -> None:
        self._hooks.append(hook)

    def check_dependencies(self) -> dict[str, bool]:
        results = {}
        for name, probe in self._probes.items():
            ok = probe()
            DEPENDENCY_UP.labels(name).set(1 if ok else 0)
            results[name] = ok
        return results

    def _set_serving(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ["", *self._service_names[1:]]:
            self.health.set(name, status)
        SERVING.set(1 if serving else 0)
        if serving != self._serving:
            log.info("health changed", extra={"serving": serving})
        self._serving = serving

    def _health_loop(self) -> None:
        while not self._stopped.is_set():
            results = self.check_dependencies()
            self._set_serving(all(results.values()))
            if not all(results.values()):
                log.warning("dependency down", extra={"dependencies": results})
            self._stopped.wait(self.settings.health_interval_s)

    def start(self) -> int:
        reflection.enable_server_reflection([*self._service_names, reflection.SERVICE_NAME], self.server)
        self.port = self.server.add_insecure_port(f"{self.settings.grpc_host}:{self.settings.grpc_port}")
        if self.port == 0:
            raise RuntimeError(f"could not bind gRPC port {self.settings.grpc_port}")
        self.metrics_port = start_metrics_server(self.settings.metrics_port)
        self._set_serving(False)
        self.health.set(LIVENESS_SERVICE, health_pb2.HealthCheckResponse.SERVING)
        self.server.start()
        threading.Thread(target=self._health_loop, name="health", daemon=True).start()
        log.info(
            "service started",
            extra={"grpc_port": self.port, "metrics_port": self.metrics_port, "services": self._service_names},
        )
        return self.port

    def stop(self) -> None:
        if self._stopped.is_set():
            return
        self._stopped.set()
        self._set_serving(False)
        log.info("shutting down", extra={"grace_s": self.settings.shutdown_grace_s})
        self.server.stop(self.settings.shutdown_grace_s).wait()
        for hook in reversed(self._hooks):
            try:
                hook()
            except Exception:
                log.exception("shutdown hook failed")
        log.info("stopped")

    def serve_forever(self) -> None:
        """Block until SIGTERM/SIGINT, then shut down gracefully."""
        done = threading.Event()

        def on_signal(signum: int, _frame: Any) -> None:
            log.info("signal received", extra={"signal": signal.Signals(signum).name})
            done.set()

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        while not done.wait(1.0):
            pass
        self.stop()
