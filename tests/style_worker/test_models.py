"""The networks, the batch rewrite, the batching modes, provider fallback, the batcher and the metrics."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from services.style_worker import providers
from services.style_worker.batcher import BatcherClosed, DynamicBatcher
from services.style_worker.engine import StyleEngine, StylizeRequest, cosine
from services.style_worker.models import (
    PREDICT,
    BatchRewriteError,
    Network,
    SessionConfig,
    StyleModels,
    default_models_dir,
    make_batch_dynamic,
)
from services.style_worker.quality import content_scores, psnr, ssim
from tests.style_worker.conftest import photo, texture

MODELS = default_models_dir()


def test_batch_rewrite_matches_batch_one_runs() -> None:
    """The rewritten graph gives, per image, exactly what the original batch-1 graph gives."""
    rng = np.random.default_rng(0)
    x = rng.random((3, 256, 256, 3), dtype=np.float32)
    cfg = SessionConfig()
    batched = Network(PREDICT, MODELS / f"{PREDICT}.onnx", cfg, "batched")
    sequential = Network(PREDICT, MODELS / f"{PREDICT}.onnx", cfg, "sequential")
    parallel = Network(PREDICT, MODELS / f"{PREDICT}.onnx", cfg, "parallel", parallel_sessions=2)
    assert batched.mode == "batched" and batched.input_shapes[0][0] == "batch"
    ref = sequential.run({sequential.inputs[0]: x})
    assert ref.shape == (3, 1, 1, 100)
    np.testing.assert_allclose(batched.run({batched.inputs[0]: x}), ref, atol=1e-5)
    np.testing.assert_allclose(parallel.run({parallel.inputs[0]: x}), ref, atol=1e-5)
    parallel.close()


def test_transform_batch_rewrite_is_exact() -> None:
    rng = np.random.default_rng(1)
    models = StyleModels(MODELS, SessionConfig(), "batched")
    seq = StyleModels(MODELS, SessionConfig(), "sequential")
    contents = rng.random((2, 384, 384, 3), dtype=np.float32)
    styles = rng.standard_normal((2, 100)).astype(np.float32)
    out = models.transform_batch(contents, styles)
    assert out.shape == (2, 384, 384, 3) and out.min() >= 0.0 and out.max() <= 1.0
    np.testing.assert_allclose(out, seq.transform_batch(contents, styles), atol=1e-5)


def test_rewrite_refuses_graphs_it_cannot_prove(tmp_path: Path) -> None:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])
    shape = helper.make_tensor("shape", TensorProto.INT64, [1], [4])  # drops the batch axis
    graph = helper.make_graph([helper.make_node("Reshape", ["x", "shape"], ["y"])], "g", [x], [y], [shape])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8  # what this ORT build reads
    path = tmp_path / "flatten.onnx"
    onnx.save(model, str(path))
    with pytest.raises(BatchRewriteError):
        make_batch_dynamic(path)
    net = Network("flatten", path, SessionConfig(), "batched")
    assert net.mode == "sequential"  # fell back instead of producing a wrong graph


def test_io_binding_path_gives_the_same_output() -> None:
    """IOBinding is what the worker uses on a GPU; on the CPU it can be forced and must agree."""
    x = np.random.default_rng(2).random((1, 256, 256, 3), dtype=np.float32)
    plain = Network(PREDICT, MODELS / f"{PREDICT}.onnx", SessionConfig(io_binding="off"), "sequential")
    bound = Network(PREDICT, MODELS / f"{PREDICT}.onnx", SessionConfig(io_binding="on"), "sequential")
    assert bound.config.use_io_binding() and not plain.config.use_io_binding()
    np.testing.assert_allclose(bound.run({bound.inputs[0]: x}), plain.run({plain.inputs[0]: x}), atol=1e-6)


def test_providers_fall_back_to_cpu_quietly(capfd: pytest.CaptureFixture[str]) -> None:
    providers.probe_providers.cache_clear()
    preference = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    chosen = providers.choose_providers(preference)
    probes = providers.probe_providers(tuple(preference))
    by_name = {p.provider: p for p in probes}
    assert by_name["CPUExecutionProvider"].ok
    if providers.cuda_device_count()[0] == 0:  # this dev box: no GPU, so no GPU provider
        assert chosen == ["CPUExecutionProvider"]
        assert not by_name["CUDAExecutionProvider"].ok and by_name["CUDAExecutionProvider"].reason
    err = capfd.readouterr().err
    assert "Failed to load" not in err and "cannot open shared object" not in err


def test_gpu_provider_library_failure_is_a_reason_not_a_crash(
    monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    """Driver says a GPU exists but the CUDA provider library cannot load: CPU, with the reason."""
    providers.probe_providers.cache_clear()
    monkeypatch.setattr(providers, "cuda_device_count", lambda: (1, ""))
    try:
        probes = providers.probe_providers(("CUDAExecutionProvider", "CPUExecutionProvider"))
        cuda = probes[0]
        assert not cuda.ok and "provider library does not load" in cuda.reason
        assert providers.choose_providers(["CUDAExecutionProvider", "CPUExecutionProvider"]) == ["CPUExecutionProvider"]
        captured = capfd.readouterr()
        assert "Failed to load" not in captured.out + captured.err  # preload chatter stays out of the logs
    finally:
        providers.probe_providers.cache_clear()


def test_dynamic_batcher_gathers_up_to_b_or_d() -> None:
    seen: list[int] = []

    def run(items: list[int]) -> list[int]:
        seen.append(len(items))
        return [i * 10 for i in items]

    b = DynamicBatcher("t", run, max_batch_size=4, max_delay_s=0.5)  # generous D: robust on a loaded box
    futures = [b.submit(i) for i in range(6)]
    assert [f.result(5) for f in futures] == [0, 10, 20, 30, 40, 50]
    assert seen == [4, 2]  # a full batch at once, then the rest after the delay
    start = time.perf_counter()
    assert b.run(7, timeout_s=5) == 70
    assert time.perf_counter() - start >= 0.45  # a lone request waited for company (up to D)
    b.close()
    with pytest.raises(BatcherClosed):
        b.submit(1)


def test_dynamic_batcher_zero_delay_and_errors() -> None:
    def run(items: list[int]) -> list[int]:
        if 13 in items:
            raise ValueError("unlucky")
        return items

    b = DynamicBatcher("t0", run, max_batch_size=8, max_delay_s=0.0)
    assert b.run(1, timeout_s=5) == 1
    with pytest.raises(ValueError, match="unlucky"):
        b.run(13, timeout_s=5)
    assert b.run(2, timeout_s=5) == 2  # the batcher survives a failed batch
    barrier = threading.Barrier(3)
    results: list[int] = []

    def client(i: int) -> None:
        barrier.wait()
        results.append(b.run(i, timeout_s=5))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == [0, 1, 2]
    b.close()


def test_engine_stylizes_towards_the_style(engine: StyleEngine) -> None:
    content, style = photo(200, 140, seed=3), texture(seed=4)
    c_vec, s_vec = engine.embed_many([content, style])
    out = engine.stylize(StylizeRequest(content, s_vec, 1.0, False))
    assert out.size == (200, 140)
    gain = cosine(engine.embed(out), s_vec) - cosine(c_vec, s_vec)
    assert gain > 0
    s, p = content_scores(content, out)
    assert 0.0 < s < 1.0 and p > 5
    weak = engine.stylize(StylizeRequest(content, s_vec, 0.3, True))
    assert content_scores(content, weak)[0] > s  # less strength keeps more of the content


def test_house_styles(engine: StyleEngine) -> None:
    out = engine.house_style(photo(96, 64), [0.0] * 25 + [1.0])
    assert out.size == (96, 64)
    with pytest.raises(ValueError):
        engine.house_style(photo(96, 64), [1.0])


def test_ssim_and_psnr_reference_points() -> None:
    rng = np.random.default_rng(5)
    a = rng.random((64, 64)) * 255
    assert ssim(a, a) == pytest.approx(1.0)
    assert psnr(a, a) == 100.0
    noisy = np.clip(a + rng.normal(0, 20, a.shape), 0, 255)
    assert 0 < ssim(a, noisy) < 1
    assert 15 < psnr(a, noisy) < 25  # sigma 20 noise is ~22 dB
    with pytest.raises(ValueError):
        ssim(a, a[:10])
