"""StyleWorkerService servicer (admin / preview API)."""

from __future__ import annotations

import io

import grpc
import numpy as np
from PIL import Image, UnidentifiedImageError
from stylerec.v1 import style_pb2, style_pb2_grpc

from libs.common.errors import abort_invalid
from services.style_worker.config import StyleWorkerSettings
from services.style_worker.models import StyleModels


class StyleWorkerServicer(style_pb2_grpc.StyleWorkerServiceServicer):
    def __init__(self, settings: StyleWorkerSettings, models: StyleModels) -> None:
        self.settings = settings
        self.models = models

    def Embed(self, request: style_pb2.EmbedRequest, context: grpc.ServicerContext) -> style_pb2.EmbedResponse:
        if len(request.image) > self.settings.max_image_bytes:
            abort_invalid(context, "image too large", [("image", f"over {self.settings.max_image_bytes} bytes")])
        try:
            img = Image.open(io.BytesIO(request.image)).convert("RGB").resize((256, 256))
        except (UnidentifiedImageError, OSError) as exc:
            abort_invalid(context, f"image could not be decoded: {exc}", [("image", "corrupt")])
        arr = np.asarray(img, dtype=np.float32) / 255.0
        emb = self.models.embed(arr)
        return style_pb2.EmbedResponse(embedding=emb.tolist(), provider=self.models.providers[0])

    def ModelInfo(
        self, request: style_pb2.StyleModelInfoRequest, context: grpc.ServicerContext
    ) -> style_pb2.StyleModelInfoResponse:
        return style_pb2.StyleModelInfoResponse(active_providers=self.models.providers)
