"""StyleWorkerService servicer: the synchronous admin / preview API of the worker.

Bulk work arrives over Kafka; these RPCs exist for previews, tests and
operators. They run through the same engine (and therefore the same dynamic
batchers) as the Kafka jobs, so concurrent previews batch with queued jobs.
"""

from __future__ import annotations

import logging
import math
import time

import grpc
import numpy as np
import onnxruntime as ort
from stylerec.v1 import style_pb2, style_pb2_grpc

from libs.common.errors import abort_invalid
from services.style_worker.config import StyleWorkerSettings
from services.style_worker.engine import StyleEngine, StylizeRequest, l2_normalize
from services.style_worker.images import ImageRejected, check_encoded_size, encode
from services.style_worker.metrics import IMAGES_REJECTED
from services.style_worker.models import EMBEDDING_DIM, HOUSE_STYLES
from services.style_worker.providers import probe_providers

log = logging.getLogger(__name__)


class StyleWorkerServicer(style_pb2_grpc.StyleWorkerServiceServicer):
    def __init__(self, settings: StyleWorkerSettings, engine: StyleEngine) -> None:
        self.settings = settings
        self.engine = engine

    def _decode(self, data: bytes, field: str, context: grpc.ServicerContext):  # type: ignore[no-untyped-def]
        try:
            return self.engine.decode(data)
        except ImageRejected as exc:
            IMAGES_REJECTED.labels(exc.kind, "grpc").inc()
            abort_invalid(context, f"{field} rejected: {exc.reason}", [(field, exc.reason)])

    def Stylize(self, request: style_pb2.StylizeRequest, context: grpc.ServicerContext) -> style_pb2.StylizeResponse:
        start = time.perf_counter()
        problems = []
        if not request.content_image:
            problems.append(("content_image", "required"))
        has_vector = len(request.style_embedding) > 0
        has_house = len(request.house_style_weights) > 0
        if not (request.style_image or has_vector or has_house):
            problems.append(("style_image", "one of style_image, style_embedding or house_style_weights is required"))
        if has_vector and len(request.style_embedding) != EMBEDDING_DIM:
            problems.append(("style_embedding", f"needs {EMBEDDING_DIM} values, got {len(request.style_embedding)}"))
        if has_house and len(request.house_style_weights) != HOUSE_STYLES:
            problems.append(("house_style_weights", f"needs {HOUSE_STYLES} values"))
        # NaN/inf would flow through the network into an all-NaN image instead of an error.
        for name in ("style_embedding", "house_style_weights"):
            if not all(math.isfinite(x) for x in getattr(request, name)):
                problems.append((name, "values must be finite numbers"))
        if not 0.0 <= request.strength <= 1.0:
            problems.append(("strength", "must be within 0..1 (0 = default 1.0)"))
        for name in ("content_image", "style_image"):
            data = getattr(request, name)
            if data:
                try:
                    check_encoded_size(len(data), self.engine.limits)
                except ImageRejected as exc:
                    problems.append((name, exc.reason))
        if problems:
            abort_invalid(context, "invalid stylize request", problems)
        content = self._decode(request.content_image, "content_image", context)
        strength = request.strength or 1.0
        if has_house:
            out = self.engine.house_style(content, list(request.house_style_weights))
        else:
            if has_vector:
                vector = np.asarray(request.style_embedding, dtype=np.float32)
            else:
                vector = self.engine.embed(self._decode(request.style_image, "style_image", context))
            out = self.engine.stylize(StylizeRequest(content, vector, strength, request.preserve_color))
        data, content_type = encode(out, self.settings.output_format, self.settings.jpeg_quality)
        return style_pb2.StylizeResponse(
            image=data,
            content_type=content_type,
            width=out.size[0],
            height=out.size[1],
            provider=self.engine.provider,
            latency_seconds=time.perf_counter() - start,
        )

    def Embed(self, request: style_pb2.EmbedRequest, context: grpc.ServicerContext) -> style_pb2.EmbedResponse:
        if not request.image:
            abort_invalid(context, "image is required", [("image", "required")])
        img = self._decode(request.image, "image", context)
        raw = self.engine.embed(img)
        return style_pb2.EmbedResponse(
            embedding=[float(x) for x in l2_normalize(raw)],
            provider=self.engine.provider,
            raw_embedding=[float(x) for x in raw],
        )

    def ModelInfo(
        self, request: style_pb2.StyleModelInfoRequest, context: grpc.ServicerContext
    ) -> style_pb2.StyleModelInfoResponse:
        probes = probe_providers(tuple(self.settings.provider_preference), self.settings.gpu_device_id)
        return style_pb2.StyleModelInfoResponse(
            available_providers=list(ort.get_available_providers()),
            active_providers=list(self.engine.models.transform.active_providers),
            models=[
                style_pb2.StyleModel(name=name, path=str(path), providers=providers, inputs=inputs)
                for name, path, providers, inputs in self.engine.models.files()
            ],
            max_batch_size=self.engine.max_batch_size,
            max_batch_delay_ms=round(self.engine.max_delay_s * 1000),
            batching_mode=self.engine.batching_mode,
            provider_probes=[
                style_pb2.ProviderProbe(provider=p.provider, loaded=p.ok, reason=p.reason) for p in probes
            ],
            intra_op_threads=self.settings.intra_op_threads,
            io_binding=self.engine.models.config.use_io_binding(),
        )
