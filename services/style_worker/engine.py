"""The style engine: images in, embeddings and stylized images out, through the dynamic batchers.

Everything that runs a network goes through here — Kafka jobs, gRPC previews,
the evaluation and the benchmark — so they all exercise the same batching and
the same image handling, and a number measured by the benchmark is the number
the service gets.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from services.style_worker import images
from services.style_worker.batcher import DynamicBatcher
from services.style_worker.config import StyleWorkerSettings
from services.style_worker.metrics import PROVIDER_INFO
from services.style_worker.models import EMBEDDING_DIM, SessionConfig, StyleModels, default_models_dir
from services.style_worker.providers import choose_providers, probe_providers

log = logging.getLogger(__name__)


def l2_normalize(v: np.ndarray) -> np.ndarray:
    """Unit-length float32 copy (zero vector stays zero) — the stored embedding format."""
    v = np.asarray(v, dtype=np.float32).reshape(-1)
    n = float(np.linalg.norm(v))
    return v / n if n > 0 else v


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.dot(l2_normalize(a), l2_normalize(b)))


@dataclass(frozen=True)
class StylizeRequest:
    content: Image.Image
    style_vector: np.ndarray  # raw 100-d output of the predict network
    strength: float = 1.0
    preserve_color: bool = False


@dataclass(frozen=True)
class _TransformItem:
    content: np.ndarray
    style: np.ndarray


class StyleEngine:
    """Style networks + one dynamic batcher per network + the image pipeline around them."""

    def __init__(
        self,
        models: StyleModels,
        *,
        max_batch_size: int = 4,
        max_delay_s: float = 0.01,
        limits: images.ImageLimits | None = None,
        max_output_side: int = 1024,
    ) -> None:
        self.models = models
        self.limits = limits or images.ImageLimits()
        self.max_output_side = max_output_side
        self.max_batch_size = max_batch_size
        self.max_delay_s = max_delay_s
        self.embed_size = int(models.predict.input_shapes[0][1])
        self.stylize_size = int(models.transform.input_shapes[0][1])
        self._embedder: DynamicBatcher[np.ndarray, np.ndarray] = DynamicBatcher(
            "arbitrary_predict", self._run_embed, max_batch_size, max_delay_s
        )
        self._transformer: DynamicBatcher[_TransformItem, np.ndarray] = DynamicBatcher(
            "arbitrary_transform", self._run_transform, max_batch_size, max_delay_s
        )

    @classmethod
    def from_settings(cls, settings: StyleWorkerSettings, models: StyleModels | None = None) -> StyleEngine:
        """The engine the worker runs: providers probed, networks loaded, batchers sized from settings."""
        models = models or models_from_settings(settings)
        return cls(
            models,
            max_batch_size=settings.max_batch_size,
            max_delay_s=settings.max_batch_delay_ms / 1000.0,
            limits=images.ImageLimits(settings.max_image_bytes, settings.max_image_pixels, settings.min_image_side),
            max_output_side=settings.max_output_side,
        )

    # ---- batch runners (called on the batcher threads) ----
    def _run_embed(self, batch: list[np.ndarray]) -> list[np.ndarray]:
        out = self.models.embed_batch(np.stack(batch))
        return [out[i].copy() for i in range(len(batch))]

    def _run_transform(self, batch: list[_TransformItem]) -> list[np.ndarray]:
        contents = np.stack([b.content for b in batch])
        styles = np.stack([b.style for b in batch])
        out = self.models.transform_batch(contents, styles)
        return [out[i] for i in range(len(batch))]

    # ---- public API ----
    @property
    def provider(self) -> str:
        return self.models.provider

    @property
    def batching_mode(self) -> str:
        return self.models.transform.mode

    def decode(self, data: bytes) -> Image.Image:
        """Guarded decode (raises images.ImageRejected with the reason class)."""
        return images.decode_image(data, self.limits)

    def submit_embed_array(self, arr: np.ndarray) -> Future[np.ndarray]:
        """A ready [256,256,3] 0..1 tensor → Future of the raw 100-d vector (bench/eval entry)."""
        return self._embedder.submit(arr)

    def submit_transform_array(self, content: np.ndarray, style_vector: np.ndarray) -> Future[np.ndarray]:
        """A ready [384,384,3] content tensor + raw style vector → Future of the network output."""
        style = np.asarray(style_vector, dtype=np.float32).reshape(EMBEDDING_DIM)
        return self._transformer.submit(_TransformItem(content, style))

    def embed_many(self, imgs: Sequence[Image.Image]) -> list[np.ndarray]:
        """Raw style vectors of decoded images; all submitted at once so they batch together."""
        futures = [self._embedder.submit(images.style_input(img, self.embed_size)) for img in imgs]
        return [f.result() for f in futures]

    def embed(self, img: Image.Image) -> np.ndarray:
        return self.embed_many([img])[0]

    def stylize_many(self, requests: Sequence[StylizeRequest]) -> list[Image.Image]:
        """Stylize several contents at once (one batcher submission each, then post-process)."""
        prepared = [images.content_input(r.content, self.stylize_size) for r in requests]
        futures = [
            self.submit_transform_array(arr, r.style_vector) for (arr, _), r in zip(prepared, requests, strict=True)
        ]
        results = []
        for fut, (_, placement), r in zip(futures, prepared, requests, strict=True):
            out = images.from_network(fut.result(), placement, self.max_output_side)
            results.append(images.blend(r.content, out, r.strength, r.preserve_color))
        return results

    def stylize(self, request: StylizeRequest) -> Image.Image:
        return self.stylize_many([request])[0]

    def stylize_timed(self, request: StylizeRequest) -> tuple[Image.Image, float]:
        start = time.perf_counter()
        img = self.stylize(request)
        return img, time.perf_counter() - start

    def house_style(self, content: Image.Image, weights: Sequence[float]) -> Image.Image:
        """Render in a mix of the 26 fixed house styles (multistyle26), at the content's own size."""
        size = images.output_size(content.size, self.max_output_side)
        arr = images.to_array(content.resize(size, Image.Resampling.BICUBIC))
        out = np.clip(self.models.house_style(arr, weights), 0.0, 1.0)
        return Image.fromarray((out * 255.0 + 0.5).astype(np.uint8), "RGB")

    def close(self, close_models: bool = True) -> None:
        """Drain and stop the batchers; ``close_models=False`` keeps the sessions for another engine."""
        self._embedder.close()
        self._transformer.close()
        if close_models:
            self.models.close()


def session_config(settings: StyleWorkerSettings, providers: list[str] | None = None) -> SessionConfig:
    """Probe the preferred providers once and describe how sessions are built."""
    preference = settings.provider_preference
    chosen = providers or choose_providers(preference, settings.gpu_device_id)
    for probe in probe_providers(tuple(preference), settings.gpu_device_id):
        PROVIDER_INFO.labels(probe.provider).set(1 if probe.provider == chosen[0] else 0)
    return SessionConfig(
        providers=chosen,
        intra_op_threads=settings.intra_op_threads,
        inter_op_threads=settings.inter_op_threads,
        io_binding=settings.io_binding,
        device_id=settings.gpu_device_id,
        trt_cache_dir=settings.trt_cache_dir,
    )


def models_from_settings(
    settings: StyleWorkerSettings, mode: str | None = None, providers: list[str] | None = None
) -> StyleModels:
    config = session_config(settings, providers)
    models_dir = Path(settings.models_dir) if settings.models_dir else default_models_dir()
    models = StyleModels(models_dir, config, mode or settings.batching_mode, settings.parallel_sessions)
    log.info(
        "style networks loaded",
        extra={"providers": config.providers, "mode": models.transform.mode, "models_dir": str(models_dir)},
    )
    return models
