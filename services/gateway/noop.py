"""A no-op GatewayService on the same server bootstrap: the benchmark's baseline.

``python -m services.gateway.noop`` starts :class:`libs.common.server.ServiceRuntime`
with the gateway's settings (same interceptors, thread pool, health and
reflection) and a servicer that answers without touching any store. The gap
between it and the real gateway in the same run is what the gateway's own work
(Redis, ranking, metadata) costs; the rest is gRPC and Python.

The no-op answers GetRecommendations with a canned answer of the same shape as a
real one (``STYLEREC_NOOP_ITEMS`` items with titles and scores, built once at
start-up), so the comparison isolates the gateway's work from the cost of
moving an answer of that size; ``STYLEREC_NOOP_ITEMS=0`` answers empty.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import grpc
from stylerec.v1 import gateway_pb2, gateway_pb2_grpc

from libs.common.logging import configure_logging
from libs.common.server import ServiceRuntime
from services.gateway.config import GatewaySettings


def canned_answer(n_items: int) -> gateway_pb2.GetRecommendationsResponse:
    resp = gateway_pb2.GetRecommendationsResponse(strategy=gateway_pb2.CF, model_version="noop-model-1")
    for i in range(n_items):
        resp.items.add(
            item_id=f"sku-{i}",
            title=f"Synthetic item {i}",
            category="mugs",
            price=float(1 + i),
            cf_score=1.0 - i / 20,
            final_score=1.0 - i / 20,
            image_ref=f"{i:024x}",
            stylized_status=gateway_pb2.STYLIZED_NOT_REQUESTED,
        )
    return resp


class NoopGatewayServicer(gateway_pb2_grpc.GatewayServiceServicer):
    def __init__(self, n_items: int = 10) -> None:
        self.answer = canned_answer(n_items)

    def GetRecommendations(
        self, request: gateway_pb2.GetRecommendationsRequest, context: grpc.ServicerContext
    ) -> gateway_pb2.GetRecommendationsResponse:
        return self.answer

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
    n_items = int(os.environ.get("STYLEREC_NOOP_ITEMS", "10"))
    runtime.add_service(
        "stylerec.v1.GatewayService",
        gateway_pb2_grpc.add_GatewayServiceServicer_to_server,
        NoopGatewayServicer(n_items),
    )
    runtime.start()
    runtime.serve_forever()


if __name__ == "__main__":
    main()
