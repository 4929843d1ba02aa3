"""The gRPC server bootstrap every service uses: one shape for all four.

It wires the metrics interceptor, ``grpc.health.v1`` (SERVING only while the
service's dependencies answer), server reflection, the /metrics endpoint and
graceful shutdown on SIGTERM/SIGINT: health flips to NOT_SERVING, the server
stops accepting and gives in-flight calls ``shutdown_grace_s`` to finish, then
the registered shutdown hooks run in reverse order (stop consumers so they
commit, flush producers, close clients).

Transport security and callers are set up here too, so all four services get
the same rules (docs/security.md): TLS or mTLS on the gRPC port when a
certificate is configured, and the bearer-token interceptor (libs/common/authz.py)
when callers are. A configuration that cannot be served (half a key pair, prod
without TLS or callers) stops the process before it binds anything.
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

from libs.common.authz import AuthInterceptor, Authorizer
from libs.common.metrics import DEPENDENCY_UP, SERVING, MetricsInterceptor, start_metrics_server
from libs.common.settings import ServiceSettings
from libs.common.tls import TLSConfigError, read_ca, server_credentials

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
        self._credentials = self._security(settings)
        security: list[grpc.ServerInterceptor] = []
        if settings.auth_callers:
            security.append(AuthInterceptor(Authorizer(settings.auth_callers, settings.auth_enforced)))
        self.server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=settings.grpc_workers, thread_name_prefix="grpc"),
            # Metrics outermost, so refused calls are counted (UNAUTHENTICATED, PERMISSION_DENIED) too.
            interceptors=[MetricsInterceptor(), *security, *interceptors],
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

    @staticmethod
    def _security(settings: ServiceSettings) -> grpc.ServerCredentials | None:
        """Server credentials (None = plaintext), or exit 2 with the reason: refuse, never half-secure."""
        problems = settings.security_problems()
        credentials = None
        if not problems and settings.tls_enabled:
            try:
                credentials = server_credentials(
                    settings.tls_cert_file, settings.tls_key_file, settings.tls_ca_file, settings.tls_client_auth
                )
            except TLSConfigError as exc:
                problems.append(str(exc))
        elif not problems and settings.tls_ca_file:
            try:  # a client-only CA (the gateway calling scoring over TLS): check it now, not on the first call
                read_ca(settings.tls_ca_file)
            except TLSConfigError as exc:
                problems.append(str(exc))
        if problems:
            for problem in problems:
                log.error("refusing to start", extra={"error": problem})
            raise SystemExit(2)
        if credentials is None:
            log.warning(
                "gRPC server is PLAINTEXT (no STYLEREC_TLS_CERT_FILE/KEY_FILE): dev only, "
                "STYLEREC_MODE=prod refuses to start like this"
            )
        else:
            log.info("gRPC server uses TLS", extra={"mtls": settings.tls_client_auth})
        if not settings.auth_callers:
            log.warning(
                "caller authentication is OFF (no STYLEREC_AUTH_CALLERS): every caller may call every RPC; "
                "dev only, STYLEREC_MODE=prod refuses to start like this"
            )
        elif not settings.auth_enforced:
            log.warning(
                "STYLEREC_AUTH_REQUIRED=false: calls without a token run as 'anonymous'; presented tokens are checked"
            )
        else:
            log.info("caller authentication on", extra={"callers": [c.name for c in settings.auth_callers]})
        return credentials

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
        address = f"{self.settings.grpc_host}:{self.settings.grpc_port}"
        if self._credentials is not None:
            self.port = self.server.add_secure_port(address, self._credentials)
        else:
            self.port = self.server.add_insecure_port(address)
        if self.port == 0:
            raise RuntimeError(f"could not bind gRPC port {self.settings.grpc_port}")
        self.metrics_port = start_metrics_server(self.settings.metrics_port)
        self._set_serving(False)
        self.health.set(LIVENESS_SERVICE, health_pb2.HealthCheckResponse.SERVING)
        self.server.start()
        threading.Thread(target=self._health_loop, name="health", daemon=True).start()
        log.info(
            "service started",
            extra={
                "grpc_port": self.port,
                "metrics_port": self.metrics_port,
                "services": self._service_names,
                "tls": self._credentials is not None,
            },
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
