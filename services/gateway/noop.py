"""A no-op GatewayService on the same server bootstrap: the benchmark's baseline.

``python -m services.gateway.noop`` starts :class:`libs.common.server.ServiceRuntime`
with the gateway's settings (same interceptors, thread pool, health and
reflection) and a servicer that answers without touching any store. The gap
between it and the real gateway in the same run is what the gateway's own work
(Redis, ranking, metadata) costs; the rest is gRPC and Python.
"""

from __future__ import annotations

from collections.abc import Iterator

import grpc
from stylerec.v1 import gateway_pb2, gateway_pb2_grpc

from libs.common.logging import configure_logging
from libs.common.server import ServiceRuntime
from services.gateway.config import GatewaySettings


class NoopGatewayServicer(gateway_pb2_grpc.GatewayServiceServicer):
    def GetRecommendations(
        self, request: gateway_pb2.GetRecommendationsRequest, context: grpc.ServicerContext
    ) -> gateway_pb2.GetRecommendationsResponse:
        return gateway_pb2.GetRecommendationsResponse(strategy=gateway_pb2.POPULAR)

    def GetSimilarItems(
        self, request: gateway_pb2.GetSimilarItemsRequest, context: grpc.ServicerContext
    ) -> gateway_pb2.GetSimilarItemsResponse:
        return gateway_pb2.GetSimilarItemsResponse()

    def GetStylizedImage(
        self, request: gateway_pb2.GetStylizedImageRequest, context: grpc.ServicerContext
    ) -> Iterator[gateway_pb2.ImageChunk]:
        yield gateway_pb2.ImageChunk()


def main() -> None:
    settings = GatewaySettings(service_name="gateway-noop")
    configure_logging(settings.service_name, settings.log_level)
    runtime = ServiceRuntime(settings)
    runtime.add_service(
        "stylerec.v1.GatewayService", gateway_pb2_grpc.add_GatewayServiceServicer_to_server, NoopGatewayServicer()
    )
    runtime.start()
    runtime.serve_forever()


if __name__ == "__main__":
    main()
