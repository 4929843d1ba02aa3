"""Entry point: ``python -m services.gateway``."""

from __future__ import annotations

from stylerec.v1 import gateway_pb2_grpc

from libs.common.logging import configure_logging
from libs.common.pseudonym import Pseudonymizer
from libs.common.server import ServiceRuntime, redis_probe
from libs.common.stores import make_redis
from services.gateway.config import GatewaySettings
from services.gateway.server import GatewayServicer


def main() -> None:
    settings = GatewaySettings()
    configure_logging(settings.service_name, settings.log_level)
    runtime = ServiceRuntime(settings)
    r = make_redis(settings.redis_url, settings.store_timeout_s, settings.store_retries)
    runtime.require("redis", redis_probe(r))
    runtime.add_service(
        "stylerec.v1.GatewayService",
        gateway_pb2_grpc.add_GatewayServiceServicer_to_server,
        GatewayServicer(settings, r, Pseudonymizer(settings.effective_pseudonym_secret())),
    )
    runtime.on_shutdown(r.close)
    runtime.start()
    runtime.serve_forever()


if __name__ == "__main__":
    main()
