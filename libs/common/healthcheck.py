"""Container health check over the standard ``grpc.health.v1`` protocol.

``python -m libs.common.healthcheck`` exits 0 iff the service in this container
answers SERVING, 1 otherwise. It is the image's HEALTHCHECK (Docker and
docker-compose have no native gRPC probe) and an ``exec`` fallback for
Kubernetes clusters older than 1.24; newer clusters use native gRPC probes.

Why a module and not ``grpc_health_probe``: that is a separate Go binary that
would have to be downloaded into the image at build time; this reuses the
grpcio already in the venv and reads the port from the same settings class
the service itself uses, so the probe can never look at the wrong port — nor
the wrong TLS setup: with a certificate configured it dials TLS, trusts the
service's CA and checks the name in the service's own certificate (it dials
127.0.0.1), presenting that certificate when the server demands client certs.
"""

from __future__ import annotations

import argparse
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from libs.common.channels import ClientSecurity, make_channel
from libs.common.settings import ServiceSettings
from libs.common.tls import TLSConfigError


def check(
    address: str, service: str = "", timeout_s: float = 3.0, security: ClientSecurity | None = None
) -> tuple[bool, str]:
    """Ask ``address`` for the health of ``service``; returns (serving, human-readable status)."""
    with make_channel(address, security) as channel:
        try:
            resp = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout_s
            )
        except grpc.RpcError as exc:
            code = exc.code() if hasattr(exc, "code") else None
            details = exc.details() if hasattr(exc, "details") else str(exc)
            return False, f"{address}: {code.name if code else 'error'}: {details}"
        status = health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)
        return resp.status == health_pb2.HealthCheckResponse.SERVING, f"{address}: {status}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m libs.common.healthcheck",
        description="Exit 0 iff the local gRPC service reports SERVING (grpc.health.v1).",
    )
    parser.add_argument(
        "--address",
        default="",
        help="host:port to check (default: 127.0.0.1:$STYLEREC_GRPC_PORT, as the service reads it)",
    )
    parser.add_argument("--service", default="", help="health service name ('' = the whole server)")
    parser.add_argument("--timeout", type=float, default=3.0, help="seconds to wait for the answer")
    args = parser.parse_args(argv)
    if args.timeout <= 0:
        print("healthcheck: --timeout must be > 0", file=sys.stderr)
        return 2
    settings = ServiceSettings()
    address = args.address or f"127.0.0.1:{settings.grpc_port}"
    try:
        security = ClientSecurity.for_own_server(settings)
    except TLSConfigError as exc:
        print(f"healthcheck: {exc}", file=sys.stderr)
        return 1
    ok, text = check(address, args.service, args.timeout, security)
    print(text, file=sys.stdout if ok else sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
