"""GatewayService servicer: request validation and mapping; the work lives in the domain modules."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import NoReturn

import grpc
from bson import ObjectId
from bson.errors import InvalidId
from stylerec.v1 import gateway_pb2, gateway_pb2_grpc

from libs.common.errors import abort_invalid
from libs.common.pseudonym import Pseudonymizer
from services.gateway.config import GatewaySettings
from services.gateway.deadlines import Deadline, DependencyUnavailable
from services.gateway.downstream import Degradation, Downstream
from services.gateway.experiments import Experiments
from services.gateway.impressions import ImpressionPublisher
from services.gateway.metrics import STYLIZED_BYTES
from services.gateway.recommend import Recommender
from services.gateway.similar import SimilarItems
from services.gateway.stylized import read_stylized_ref

log = logging.getLogger(__name__)

# Request bounds (docs/security.md, "Input limits"): ids and the category filter are short
# strings, the exclusion list a page's worth; with them a request stays far below the
# gateway's 512 KiB transport cap (grpc_max_receive_bytes).
MAX_ID_LENGTH = 256
MAX_EXCLUDES = 1000
MAX_CATEGORY_LENGTH = 256


def abort(context: grpc.ServicerContext, code: grpc.StatusCode, message: str) -> NoReturn:
    context.abort(code, message)
    raise AssertionError("context.abort returned")


def sniff_content_type(head: bytes) -> str:
    if head.startswith(b"\x89PNG"):
        return "image/png"
    if head.startswith(b"\xff\xd8"):
        return "image/jpeg"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "image/webp"
    return "application/octet-stream"


class GatewayServicer(gateway_pb2_grpc.GatewayServiceServicer):
    def __init__(
        self,
        settings: GatewaySettings,
        downstream: Downstream,
        pseudonymize: Pseudonymizer,
        recommender: Recommender,
        similar: SimilarItems,
        experiments: Experiments | None = None,
        impressions: ImpressionPublisher | None = None,
    ) -> None:
        self.settings = settings
        self.experiments = experiments or Experiments.from_settings(settings)
        # None (unit setups without a broker): answers get no recommendation id and nothing is published.
        self.impressions = impressions
        self.ds = downstream
        self.pseudonymize = pseudonymize
        self.recommender = recommender
        self.similar = similar

    def _deadline(self, context: grpc.ServicerContext) -> Deadline:
        return Deadline.from_context(
            context.time_remaining(), self.settings.default_deadline_s, self.settings.deadline_reserve_s
        )

    def _check_k(self, context: grpc.ServicerContext, k: int) -> None:
        if k < 0 or k > self.settings.max_k:
            abort_invalid(context, f"k must be in 0..{self.settings.max_k} (0 = default)", [("k", "out of range")])

    def GetRecommendations(
        self, request: gateway_pb2.GetRecommendationsRequest, context: grpc.ServicerContext
    ) -> gateway_pb2.GetRecommendationsResponse:
        violations = []
        if not request.user_id:
            violations.append(("user_id", "required"))
        elif len(request.user_id) > MAX_ID_LENGTH:
            violations.append(("user_id", f"longer than {MAX_ID_LENGTH} characters"))
        if request.k < 0 or request.k > self.settings.max_k:
            violations.append(("k", f"must be in 0..{self.settings.max_k} (0 = default)"))
        f = request.filters
        if f.min_price < 0:
            violations.append(("filters.min_price", "must not be negative"))
        if f.max_price < 0:
            violations.append(("filters.max_price", "must not be negative (0 = no upper bound)"))
        if f.max_price > 0 and f.min_price > f.max_price:
            violations.append(("filters.max_price", "must not be below min_price"))
        if len(f.category) > MAX_CATEGORY_LENGTH:
            violations.append(("filters.category", f"longer than {MAX_CATEGORY_LENGTH} characters"))
        if len(f.exclude_item_ids) > MAX_EXCLUDES:
            violations.append(("filters.exclude_item_ids", f"at most {MAX_EXCLUDES} ids"))
        else:
            for n, item in enumerate(f.exclude_item_ids):
                if len(item) > MAX_ID_LENGTH:
                    violations.append((f"filters.exclude_item_ids[{n}]", f"longer than {MAX_ID_LENGTH} characters"))
                    break
        if violations:
            abort_invalid(context, "invalid GetRecommendations request: " + violations[0][1], violations)
        user = self.pseudonymize(request.user_id)
        assignment = self.experiments.assign(user)
        resp = self.recommender.recommend(request, self._deadline(context), user, assignment.arm)
        if self.impressions is not None:
            self.impressions.stamp(resp, user, assignment)
        return resp

    def GetSimilarItems(
        self, request: gateway_pb2.GetSimilarItemsRequest, context: grpc.ServicerContext
    ) -> gateway_pb2.GetSimilarItemsResponse:
        if not request.item_id or len(request.item_id) > MAX_ID_LENGTH:
            abort_invalid(context, "item_id is required", [("item_id", "required, at most 256 characters")])
        self._check_k(context, request.k)
        mode = request.mode or gateway_pb2.SIMILARITY_BLEND
        if mode not in (gateway_pb2.SIMILARITY_CF, gateway_pb2.SIMILARITY_STYLE, gateway_pb2.SIMILARITY_BLEND):
            abort_invalid(context, f"unknown similarity mode {request.mode}", [("mode", "CF, STYLE or BLEND")])
        deg = Degradation()
        items = self.similar.similar(
            request.item_id, request.k or self.settings.default_k, mode, self._deadline(context), deg
        )
        return gateway_pb2.GetSimilarItemsResponse(
            items=items, mode=mode, degraded=deg.degraded, degraded_reason=deg.reason()
        )

    def GetStylizedImage(
        self, request: gateway_pb2.GetStylizedImageRequest, context: grpc.ServicerContext
    ) -> Iterator[gateway_pb2.ImageChunk]:
        violations = []
        if not request.user_id or len(request.user_id) > MAX_ID_LENGTH:
            violations.append(("user_id", "required, at most 256 characters"))
        if not request.item_id or len(request.item_id) > MAX_ID_LENGTH:
            violations.append(("item_id", "required, at most 256 characters"))
        if len(request.style_item_id) > MAX_ID_LENGTH:
            violations.append(("style_item_id", "at most 256 characters"))
        if violations:
            abort_invalid(context, "invalid GetStylizedImage request", violations)
        deadline = self._deadline(context)
        user = self.pseudonymize(request.user_id)
        style_item = request.style_item_id
        try:
            if not style_item:
                deg = Degradation()
                profile = self.recommender.user_state(user, deadline, deg).profile
                if deg.degraded:
                    abort(context, grpc.StatusCode.UNAVAILABLE, f"style profile unavailable: {deg.reason()}")
                if profile is None or not profile.anchor:
                    abort(context, grpc.StatusCode.NOT_FOUND, "user has no style anchor; pass style_item_id")
                style_item = profile.anchor
            ref = read_stylized_ref(self.ds, request.item_id, style_item, deadline)
        except DependencyUnavailable as exc:
            abort(context, grpc.StatusCode.UNAVAILABLE, f"stylized image lookup failed: {exc}")
        if not ref:
            abort(
                context,
                grpc.StatusCode.NOT_FOUND,
                f"no stylized image of {request.item_id!r} in the style of {style_item!r} (yet); "
                "GetRecommendations with want_stylized enqueues it",
            )
        yield from self._stream(ref, context)

    def _stream(self, ref: str, context: grpc.ServicerContext) -> Iterator[gateway_pb2.ImageChunk]:
        bucket = self.ds.gridfs
        if bucket is None:
            abort(context, grpc.StatusCode.UNAVAILABLE, "image store not configured")
        try:
            stream = bucket.open_download_stream(ObjectId(ref))
        except InvalidId:
            abort(context, grpc.StatusCode.DATA_LOSS, f"stored reference {ref!r} is not a GridFS id")
        except Exception as exc:
            abort(context, grpc.StatusCode.NOT_FOUND, f"stylized image {ref} not readable: {type(exc).__name__}")
        meta = stream.metadata or {}
        total = int(stream.length)
        first = True
        content_type = str(meta.get("content_type") or meta.get("contentType") or "")
        chunk_size = self.settings.image_chunk_bytes
        try:
            while True:
                if not context.is_active():
                    return
                data = stream.read(chunk_size)
                if not data:
                    break
                if first:
                    content_type = content_type or sniff_content_type(data[:16])
                STYLIZED_BYTES.inc(len(data))
                yield gateway_pb2.ImageChunk(
                    data=data, content_type=content_type if first else "", total_size=total if first else 0
                )
                first = False
        finally:
            stream.close()
