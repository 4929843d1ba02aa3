"""Input hardening: per-service gRPC message caps and per-field bounds answer with clear errors.

Transport caps are checked against real processes (a gateway and an ingestion
started from the session infrastructure); the bounds added to the style
worker's Stylize validation are checked on the servicer with a faked gRPC
context, since they are refused before any model is touched.
"""

from __future__ import annotations

import io
import uuid
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2
from PIL import Image
from pydantic import ValidationError
from stylerec.v1 import gateway_pb2, gateway_pb2_grpc, ingestion_pb2, ingestion_pb2_grpc, style_pb2

from cli.localstack.stack import Stack
from libs.common.errors import violations_of
from services.gateway.config import GatewaySettings
from services.ingestion.config import IngestionSettings
from services.ingestion.images import ImageError, check_image
from services.style_worker.config import StyleWorkerSettings
from services.style_worker.models import EMBEDDING_DIM, HOUSE_STYLES
from services.style_worker.server import StyleWorkerServicer
from tests.ingestion.conftest import LIMITS_ENV, make_event

# ---------------------------------------------------------------- settings


def test_defaults_fit_each_service_payloads() -> None:
    ing = IngestionSettings()
    assert ing.max_request_bytes < ing.grpc_max_receive_bytes <= 32 * 1024 * 1024
    assert ing.grpc_max_send_bytes >= ing.max_image_bytes
    gw = GatewaySettings()
    assert gw.grpc_max_receive_bytes <= 1024 * 1024 and gw.grpc_max_send_bytes > gw.image_chunk_bytes
    sw = StyleWorkerSettings()
    assert sw.grpc_max_receive_bytes >= 2 * sw.max_image_bytes


@pytest.mark.parametrize(
    ("cls", "kwargs", "fragment"),
    [
        (IngestionSettings, {"grpc_max_receive_bytes": 1024 * 1024}, "max_request_bytes"),
        (IngestionSettings, {"grpc_max_send_bytes": 1024 * 1024}, "max_image_bytes"),
        (GatewaySettings, {"grpc_max_send_bytes": 64 * 1024}, "image_chunk_bytes"),
        (StyleWorkerSettings, {"grpc_max_receive_bytes": 1024 * 1024}, "two images"),
    ],
)
def test_caps_below_the_in_app_limits_are_refused(cls: Any, kwargs: dict[str, int], fragment: str) -> None:
    with pytest.raises(ValidationError, match=fragment):
        cls(**kwargs)


# ---------------------------------------------------------------- gateway, real process


@pytest.fixture(scope="module")
def gateway(infra: Stack) -> Iterator[str]:
    name = f"gateway-hard-{uuid.uuid4().hex[:8]}"
    infra.start_service("gateway", instance=name, extra_env={"STYLEREC_PSEUDONYM_SECRET": "test-secret-hardening"})
    infra.wait_serving([name], timeout_s=60)
    yield infra.addr_of(name)
    infra.stop_component(name)


def test_gateway_refuses_an_oversized_message(gateway: str) -> None:
    # 2000 ids of 300 characters: ~600 KiB, over the gateway's 512 KiB cap.
    req = gateway_pb2.GetRecommendationsRequest(
        user_id="u1", filters=gateway_pb2.Filters(exclude_item_ids=["x" * 300] * 2000)
    )
    assert req.ByteSize() > GatewaySettings().grpc_max_receive_bytes
    with grpc.insecure_channel(gateway) as ch, pytest.raises(grpc.RpcError) as err:
        gateway_pb2_grpc.GatewayServiceStub(ch).GetRecommendations(req, timeout=10)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err.value.details()
    # The process is unharmed: a normal request still gets its answer.
    with grpc.insecure_channel(gateway) as ch:
        resp = gateway_pb2_grpc.GatewayServiceStub(ch).GetRecommendations(
            gateway_pb2.GetRecommendationsRequest(user_id="u1", k=3), timeout=10
        )
    assert resp is not None


@pytest.mark.parametrize(
    ("filters", "field"),
    [
        (gateway_pb2.Filters(category="c" * 257), "filters.category"),
        (gateway_pb2.Filters(exclude_item_ids=["ok", "i" * 257]), "filters.exclude_item_ids[1]"),
        (gateway_pb2.Filters(exclude_item_ids=["i"] * 1001), "filters.exclude_item_ids"),
    ],
)
def test_gateway_filter_bounds(gateway: str, filters: gateway_pb2.Filters, field: str) -> None:
    with grpc.insecure_channel(gateway) as ch, pytest.raises(grpc.RpcError) as err:
        gateway_pb2_grpc.GatewayServiceStub(ch).GetRecommendations(
            gateway_pb2.GetRecommendationsRequest(user_id="u1", filters=filters), timeout=10
        )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in [f for f, _ in violations_of(err.value)]


# ---------------------------------------------------------------- ingestion, real process


def test_ingestion_transport_cap_comes_from_settings(infra: Stack) -> None:
    """Between max_request_bytes and the cap: the descriptive in-app answer; above the cap: the transport's."""
    name = f"ingestion-hard-{uuid.uuid4().hex[:8]}"
    cap = 320 * 1024  # LIMITS_ENV sets max_request_bytes to 256 KiB
    infra.start_service(
        "ingestion",
        instance=name,
        extra_env={**LIMITS_ENV, "STYLEREC_ROLE": "api", "STYLEREC_GRPC_MAX_RECEIVE_BYTES": str(cap)},
    )
    try:
        infra.wait_serving([name], timeout_s=60)

        def request(page_len: int) -> ingestion_pb2.IngestEventsRequest:
            events = [make_event(f"u{i}", "item-1") for i in range(100)]
            for e in events:
                e.context.page = "p" * page_len
            return ingestion_pb2.IngestEventsRequest(events=events)

        between, above = request(2900), request(3600)
        assert 256 * 1024 < between.ByteSize() < cap < above.ByteSize()
        with grpc.insecure_channel(infra.addr_of(name)) as ch:
            stub = ingestion_pb2_grpc.IngestionServiceStub(ch)
            with pytest.raises(grpc.RpcError) as err:
                stub.IngestEvents(between, timeout=10)
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "bytes exceeds the maximum" in (err.value.details() or "")
            assert violations_of(err.value)
            with pytest.raises(grpc.RpcError) as err:
                stub.IngestEvents(above, timeout=10)
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert not violations_of(err.value)  # refused by gRPC before the handler ran
    finally:
        infra.stop_component(name)


# ---------------------------------------------------------------- images


def _png(w: int, h: int) -> bytes:
    buf = io.BytesIO()
    Image.new("L", (w, h), 0).save(buf, "PNG")
    return buf.getvalue()


def test_ingestion_photo_over_the_pixel_limit_is_refused_from_its_header() -> None:
    data = _png(400, 400)  # 160 000 pixels in well under a kilobyte
    assert len(data) < 5_000
    with pytest.raises(ImageError, match="exceeds 100000 pixels"):
        check_image(data, max_bytes=100_000, max_pixels=100_000)


# ---------------------------------------------------------------- style worker Stylize bounds


class _Aborted(Exception):
    pass


class _FakeContext:
    """A unit test's stand-in for grpc.ServicerContext: keeps what abort_with_status was given."""

    def __init__(self) -> None:
        self.status: Any = None

    def abort_with_status(self, status: Any) -> None:
        self.status = status
        raise _Aborted


def _fields(ctx: _FakeContext) -> list[str]:
    assert ctx.status.code == grpc.StatusCode.INVALID_ARGUMENT
    raw = dict(ctx.status.trailing_metadata)["grpc-status-details-bin"]
    status = status_pb2.Status.FromString(raw)
    bad = error_details_pb2.BadRequest()
    status.details[0].Unpack(bad)
    return [v.field for v in bad.field_violations]


@pytest.mark.parametrize(
    ("request_kwargs", "field"),
    [
        ({"style_embedding": [float("nan")] * EMBEDDING_DIM}, "style_embedding"),
        ({"house_style_weights": [float("inf")] + [0.0] * (HOUSE_STYLES - 1)}, "house_style_weights"),
        ({"style_embedding": [0.1] * (EMBEDDING_DIM + 1)}, "style_embedding"),
        ({"style_embedding": [0.1] * EMBEDDING_DIM, "strength": float("nan")}, "strength"),
    ],
)
def test_stylize_refuses_non_finite_or_misshapen_vectors(request_kwargs: dict[str, Any], field: str) -> None:
    servicer = StyleWorkerServicer(StyleWorkerSettings(), engine=None)  # type: ignore[arg-type]
    ctx = _FakeContext()
    with pytest.raises(_Aborted):
        servicer.Stylize(style_pb2.StylizeRequest(content_image=b"", **request_kwargs), ctx)
    assert field in _fields(ctx)
