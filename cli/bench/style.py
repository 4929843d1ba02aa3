"""`stylerec bench style`: the worker's inference path against a bare ONNX Runtime loop.

Speed is a ratio measured in one run on one machine: for each batch size B a
"round" of B requests arrives at once; the worker's engine (dynamic batcher +
the configured batching mode) and a bare ``InferenceSession.run`` loop over
the *same* network and the *same* preprocessed inputs both serve it, round
after round in rotating order (the dev box is shared: load drifts, and
interleaving at round granularity makes the drift hit every contender alike).
images/s = images / summed wall time of its rounds; a request's latency = its
finish - round start.
The bare loop cannot batch (the shipped graphs are batch-1), so any ratio above
1 at B > 1 is what dynamic batching buys. Every batching mode (batched graph,
parallel sessions, sequential) is measured so the default can be chosen by
evidence; the JSON names the winner.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from cli.errors import UsageError

REPO = Path(__file__).resolve().parents[2]  # cli/<package>/<module>.py -> the repository
SHARED_PRODUCTS = REPO.parent / "shared" / "data" / "images" / "products"
MODES = ("batched", "parallel", "sequential")
PROVIDER_ALIASES = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
}


def register_bench(bench_sub: Any) -> None:
    p = bench_sub.add_parser("style", help="style worker inference vs a bare ONNX Runtime loop (images/s, p50/p95)")
    p.add_argument("--batch-sizes", default="1,2,4,8", help="comma-separated batch sizes (default 1,2,4,8)")
    p.add_argument("--images", type=int, default=16, help="images per batch size, contender and repeat (default 16)")
    p.add_argument("--repeats", type=int, default=3, help="passes over the images, interleaved (default 3)")
    p.add_argument("--modes", default=",".join(MODES), help=f"batching modes to compare (default {','.join(MODES)})")
    p.add_argument("--models", default="transform,predict", help="networks: transform,predict (default both)")
    p.add_argument("--provider", choices=sorted(PROVIDER_ALIASES), default="", help="force one execution provider")
    p.add_argument("--delay-ms", type=float, default=None, help="batcher max delay (default: worker setting)")
    p.add_argument("--out", type=Path, default=REPO / "out" / "bench" / "style.json")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=cmd_bench_style)


def _ints(text: str, what: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError as exc:
        raise UsageError(f"{what}: expected comma-separated integers, got {text!r}") from exc
    if not values or any(v < 1 or v > 64 for v in values):
        raise UsageError(f"{what}: values must be within 1..64")
    return values


def _inputs(n: int, kind: str, seed: int = 3) -> tuple[list[np.ndarray], list[np.ndarray], str]:
    """Preprocessed content tensors, style vectors' source images and where they came from."""
    from services.style_worker.images import ImageLimits, content_input, decode_image, style_input

    photos = []
    if SHARED_PRODUCTS.is_dir():
        for f in sorted(SHARED_PRODUCTS.iterdir()):
            if f.suffix.lower() in (".jpg", ".jpeg", ".png"):
                photos.append(decode_image(f.read_bytes(), ImageLimits()))
    source = f"{len(photos)} product photos from {SHARED_PRODUCTS}"
    if not photos:
        from cli.datasets.images import synthetic_images

        photos = [img for _, img in synthetic_images("products", 4, seed)]
        source = "SYNTHETIC generated images (../shared/data not found)"
    contents = [content_input(photos[i % len(photos)], 384)[0] for i in range(n)]
    styles = [style_input(photos[i % len(photos)], 256) for i in range(n)]
    return contents, styles, source


def _stats(latencies: list[float], images: int, wall: float) -> dict[str, float]:
    lat = np.asarray(latencies)
    return {
        "images_per_s": round(images / wall, 3),
        "p50_ms": round(float(np.percentile(lat, 50)) * 1000, 2),
        "p95_ms": round(float(np.percentile(lat, 95)) * 1000, 2),
        "wall_s": round(wall, 3),
    }


def _bare_round(
    session: Any, feeds_of: Callable[[int], dict[str, np.ndarray]], output: str
) -> Callable[[list[int]], list[float]]:
    def serve(idx: list[int]) -> list[float]:
        t0 = time.perf_counter()
        done = []
        for i in idx:
            session.run([output], feeds_of(i))
            done.append(time.perf_counter() - t0)
        return done

    return serve


def _engine_round(submit: Callable[[int], Any]) -> Callable[[list[int]], list[float]]:
    def serve(idx: list[int]) -> list[float]:
        t0 = time.perf_counter()
        futures = [submit(i) for i in idx]
        done = []
        for f in futures:
            f.result()
            done.append(time.perf_counter() - t0)
        return done

    return serve


def cmd_bench_style(args: argparse.Namespace) -> int:
    import onnxruntime as ort
    from tqdm import tqdm

    from services.style_worker.config import StyleWorkerSettings
    from services.style_worker.engine import StyleEngine, models_from_settings
    from services.style_worker.models import PREDICT, TRANSFORM, default_models_dir
    from services.style_worker.providers import CPU, choose_providers, probe_providers

    sizes = _ints(args.batch_sizes, "--batch-sizes")
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not modes or any(m not in MODES for m in modes):
        raise UsageError(f"--modes: choose from {', '.join(MODES)}")
    nets = [m.strip() for m in args.models.split(",") if m.strip()]
    if not nets or any(m not in ("transform", "predict") for m in nets):
        raise UsageError("--models: choose from transform, predict")
    if args.images < 1 or args.repeats < 1:
        raise UsageError("--images and --repeats must be >= 1")
    settings = StyleWorkerSettings()
    preference = settings.provider_preference
    if args.provider:
        wanted = PROVIDER_ALIASES[args.provider]
        preference = [wanted] if wanted == CPU else [wanted, CPU]
    providers = choose_providers(preference, settings.gpu_device_id)
    if args.provider and providers[0] != PROVIDER_ALIASES[args.provider]:
        reasons = {p.provider: p.reason for p in probe_providers(tuple(preference), settings.gpu_device_id)}
        wanted = PROVIDER_ALIASES[args.provider]
        raise UsageError(f"{wanted} does not load here: {reasons.get(wanted, 'not probed')}")
    delay_ms = settings.max_batch_delay_ms if args.delay_ms is None else args.delay_ms
    n = args.images
    contents, style_imgs, source = _inputs(n, "products")
    models_dir = Path(settings.models_dir) if settings.models_dir else default_models_dir()

    # One bare session per network, built as a user of ORT would: defaults, same providers.
    bare_opts = ort.SessionOptions()
    bare_opts.log_severity_level = 3
    if settings.intra_op_threads:
        bare_opts.intra_op_num_threads = settings.intra_op_threads
    bare = {
        name: ort.InferenceSession(str(models_dir / f"{name}.onnx"), bare_opts, providers=providers)
        for name in (PREDICT, TRANSFORM)
    }
    bare_provider = bare[TRANSFORM].get_providers()[0]
    p_in = bare[PREDICT].get_inputs()[0].name
    p_out = bare[PREDICT].get_outputs()[0].name
    raw_styles = [np.asarray(bare[PREDICT].run([p_out], {p_in: s[None]})[0]).reshape(100) for s in style_imgs]
    t_in = [i.name for i in bare[TRANSFORM].get_inputs()]
    t_out = bare[TRANSFORM].get_outputs()[0].name

    def predict_feeds(i: int) -> dict[str, np.ndarray]:
        return {p_in: style_imgs[i][None]}

    def transform_feeds(i: int) -> dict[str, np.ndarray]:
        return {t_in[0]: contents[i][None], t_in[1]: raw_styles[i].reshape(1, 1, 1, 100)}

    report_models: dict[str, Any] = {}
    net_names = {"transform": TRANSFORM, "predict": PREDICT}
    steps = len(nets) * len(sizes) * args.repeats
    progress = tqdm(total=steps, desc="bench style", unit="run", file=sys.stderr)
    loaded = {mode: models_from_settings(settings, mode, providers) for mode in modes}
    try:
        for net in nets:
            name = net_names[net]
            feeds_of = transform_feeds if net == "transform" else predict_feeds
            out_name = t_out if net == "transform" else p_out
            # warm-up: first runs allocate arenas and pick kernels
            for _ in range(2):
                bare[name].run([out_name], feeds_of(0))
            per_size: dict[str, Any] = {}
            for b in sizes:
                contenders: dict[str, Callable[[list[int]], list[float]]] = {
                    "bare": _bare_round(bare[name], feeds_of, out_name)
                }
                engines = []
                for mode in modes:
                    engine = StyleEngine(loaded[mode], max_batch_size=b, max_delay_s=delay_ms / 1000.0)
                    engines.append(engine)

                    def submit(i: int, engine: StyleEngine = engine, net: str = net) -> Any:
                        if net == "transform":
                            return engine.submit_transform_array(contents[i], raw_styles[i])
                        return engine.submit_embed_array(style_imgs[i])

                    contenders[mode] = _engine_round(submit)
                    contenders[mode](list(range(min(b, n))))  # warm-up at this batch size
                # Interleave round by round, rotating the order, so load that drifts on a shared
                # machine hits every contender alike; each contender's totals are pooled.
                walls: dict[str, float] = dict.fromkeys(contenders, 0.0)
                lats: dict[str, list[float]] = {k: [] for k in contenders}
                per_rep: dict[str, list[float]] = {k: [] for k in contenders}
                order = list(contenders)
                turn = 0
                for _rep in range(args.repeats):
                    rep_wall = dict.fromkeys(contenders, 0.0)
                    for r in range(0, n, b):
                        idx = list(range(r, min(n, r + b)))
                        for key in order[turn % len(order) :] + order[: turn % len(order)]:
                            start = time.perf_counter()
                            lats[key].extend(contenders[key](idx))
                            rep_wall[key] += time.perf_counter() - start
                        turn += 1
                    for key, w in rep_wall.items():
                        walls[key] += w
                        per_rep[key].append(round(n / w, 3))
                    progress.update(1)
                for engine in engines:
                    engine.close(close_models=False)
                row: dict[str, Any] = {}
                for key in contenders:
                    row[key] = _stats(lats[key], n * args.repeats, walls[key])
                    row[key]["images_per_s_repeats"] = per_rep[key]
                for mode in modes:
                    row[mode]["ratio_vs_bare"] = round(row[mode]["images_per_s"] / row["bare"]["images_per_s"], 3)
                    row[mode]["effective_mode"] = loaded[mode].transform.mode
                per_size[str(b)] = row
            report_models[name] = per_size
    finally:
        progress.close()
        for m in loaded.values():
            m.close()

    winner, verdict = _verdict(report_models, modes, sizes)
    report = {
        "generated_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {
            "cpu_count": os.cpu_count(),
            "platform": platform.platform(),
            "load_avg_1m_at_end": round(os.getloadavg()[0], 2),
        },
        "provider": bare_provider,
        "providers": providers,
        "inputs": source,
        "images_per_batch_size": n,
        "repeats": args.repeats,
        "max_batch_delay_ms": delay_ms,
        "intra_op_threads": settings.intra_op_threads or "ort-default",
        "method": (
            "rounds of B simultaneous requests, contenders interleaved round by round in rotating order; "
            "worker = StyleEngine (dynamic batcher + mode) on the same preprocessed tensors as a bare "
            "InferenceSession.run loop over the shipped batch-1 graph; images/s = images / summed round wall "
            "time; latency = request finish - round start"
        ),
        "models": report_models,
        "best_mode": winner,
        "goal": verdict,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        _print_table(report)
    return 0


def _verdict(models: dict[str, Any], modes: list[str], sizes: list[int]) -> tuple[str, dict[str, Any]]:
    """Best mode = highest mean ratio at B > 1 on the transform network (the expensive one)."""
    key = "arbitrary_transform" if "arbitrary_transform" in models else next(iter(models))
    rows = models[key]
    batched_sizes = [b for b in sizes if b > 1] or sizes

    def mean_ratio(mode: str) -> float:
        return float(np.mean([rows[str(b)][mode]["ratio_vs_bare"] for b in batched_sizes]))

    best = max(modes, key=mean_ratio)
    verdict: dict[str, Any] = {"network": key, "mode": best, "target_b1": 0.9, "target_batched": 1.0}
    if "1" in rows:
        verdict["ratio_b1"] = rows["1"][best]["ratio_vs_bare"]
        verdict["b1_met"] = verdict["ratio_b1"] >= 0.9
    verdict["ratios_batched"] = {str(b): rows[str(b)][best]["ratio_vs_bare"] for b in sizes if b > 1}
    verdict["batched_met"] = all(r > 1.0 for r in verdict["ratios_batched"].values())
    verdict["mean_ratio_by_mode"] = {m: round(mean_ratio(m), 3) for m in modes}
    return best, verdict


def _print_table(report: dict[str, Any]) -> None:
    print(f"provider {report['provider']}, inputs: {report['inputs']}")
    for name, per_size in report["models"].items():
        print(f"{name}:")
        for b, row in per_size.items():
            parts = [f"bare {row['bare']['images_per_s']:.2f}/s p95 {row['bare']['p95_ms']:.0f}ms"]
            for mode, st in row.items():
                if mode != "bare":
                    ratio = st["ratio_vs_bare"]
                    parts.append(f"{mode} {st['images_per_s']:.2f}/s x{ratio:.2f} p95 {st['p95_ms']:.0f}ms")
            print(f"  B={b}: " + " | ".join(parts))
    print(f"best mode: {report['best_mode']}; goal: {json.dumps(report['goal'])}")


def main(argv: list[str] | None = None) -> int:
    """``python -m cli.bench.style [options]``: the same command without the rest of the CLI.

    For machines that have only what this benchmark needs (the GPU check installs
    a minimal set of wheels; the full ``stylerec`` CLI imports every area's clients).
    """
    parser = argparse.ArgumentParser(prog="python -m cli.bench.style")
    sub = parser.add_subparsers(dest="bench", required=True)
    register_bench(sub)
    args = parser.parse_args(["style", *(sys.argv[1:] if argv is None else argv)])
    try:
        return int(args.func(args) or 0)
    except UsageError as exc:
        print(f"bench style: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
