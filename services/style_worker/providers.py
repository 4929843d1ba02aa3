"""Choosing ONNX Runtime execution providers that actually work on this machine.

``onnxruntime-gpu`` lists TensorRT and CUDA as *available* even on a machine
without a GPU; asking for them there makes ORT print a wall of library-loading
errors and then silently fall back. So the worker probes each provider once,
quietly and cheapest check first (driver → provider library → a one-node
session), and only hands the ones that passed to its real sessions. The probe
result is cached for the process and exported as a metric label and in
``ModelInfo`` so an operator can see *why* a GPU pod runs on the CPU.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import io
import logging
from dataclasses import dataclass
from pathlib import Path

import onnxruntime as ort

log = logging.getLogger(__name__)

TRT = "TensorrtExecutionProvider"
CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
GPU_PROVIDERS = (TRT, CUDA)
_PROVIDER_LIBS = {TRT: "libonnxruntime_providers_tensorrt.so", CUDA: "libonnxruntime_providers_cuda.so"}


@dataclass(frozen=True)
class ProviderProbe:
    """Outcome of probing one provider: ``ok`` and, when not, the first reason it failed."""

    provider: str
    ok: bool
    reason: str = ""


def cuda_device_count() -> tuple[int, str]:
    """Number of CUDA devices via the driver API (silent when there is no driver)."""
    try:
        lib = ctypes.CDLL("libcuda.so.1")
    except OSError as exc:
        return 0, f"no CUDA driver ({exc})"
    if lib.cuInit(0) != 0:
        return 0, "cuInit failed (driver present, no usable GPU)"
    count = ctypes.c_int(0)
    if lib.cuDeviceGetCount(ctypes.byref(count)) != 0:
        return 0, "cuDeviceGetCount failed"
    return int(count.value), "" if count.value else "driver reports 0 devices"


def _tiny_model() -> bytes:
    """A one-node Identity graph: enough for ORT to initialise a provider."""
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "probe", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return bytes(model.SerializeToString())


def _probe_gpu_provider(provider: str, device_id: int) -> ProviderProbe:
    if provider not in ort.get_available_providers():
        return ProviderProbe(provider, False, "not built into this onnxruntime package")
    n, why = cuda_device_count()
    if n <= device_id:
        return ProviderProbe(provider, False, why or f"device {device_id} not present ({n} devices)")
    # CUDA/cuDNN from pip wheels (nvidia-*) are found only after preloading; it
    # prints on failure, so keep its chatter out of the logs.
    if hasattr(ort, "preload_dlls"):
        sink = io.StringIO()
        with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink), contextlib.suppress(Exception):
            ort.preload_dlls()
    capi = Path(ort.__file__).parent / "capi"
    try:
        ctypes.CDLL(str(capi / _PROVIDER_LIBS[provider]))
    except OSError as exc:
        return ProviderProbe(provider, False, f"provider library does not load: {exc}")
    opts = ort.SessionOptions()
    opts.log_severity_level = 4
    try:
        sess = ort.InferenceSession(_tiny_model(), opts, providers=[(provider, {"device_id": device_id}), CPU])
    except Exception as exc:  # ORT raises its own exception types
        return ProviderProbe(provider, False, f"session creation failed: {exc}")
    if sess.get_providers()[0] != provider:
        return ProviderProbe(provider, False, "ORT fell back to another provider")
    return ProviderProbe(provider, True)


@functools.lru_cache(maxsize=8)
def probe_providers(preference: tuple[str, ...], device_id: int = 0) -> tuple[ProviderProbe, ...]:
    """Probe each provider in ``preference`` once per process; CPU always works."""
    results = []
    for provider in preference:
        if provider == CPU:
            results.append(ProviderProbe(CPU, True))
        else:
            results.append(_probe_gpu_provider(provider, device_id))
    if not any(r.provider == CPU for r in results):
        results.append(ProviderProbe(CPU, True))
    for r in results:
        if not r.ok:
            log.info("execution provider unavailable", extra={"provider": r.provider, "reason": r.reason})
    return tuple(results)


def choose_providers(preference: list[str], device_id: int = 0) -> list[str]:
    """The providers from ``preference`` that loaded, in order, CPU last as the fallback."""
    probes = probe_providers(tuple(preference), device_id)
    chosen = [p.provider for p in probes if p.ok and p.provider != CPU]
    return [*chosen, CPU]


def provider_options(provider: str, device_id: int, trt_cache_dir: str = "") -> dict[str, str]:
    """Session options per provider (engine cache for TensorRT, device for both GPU ones)."""
    if provider == TRT:
        opts = {"device_id": str(device_id), "trt_fp16_enable": "True"}
        if trt_cache_dir:
            opts.update({"trt_engine_cache_enable": "True", "trt_engine_cache_path": trt_cache_dir})
        return opts
    if provider == CUDA:
        return {"device_id": str(device_id), "cudnn_conv_algo_search": "HEURISTIC"}
    return {}
