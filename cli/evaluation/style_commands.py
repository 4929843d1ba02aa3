"""`stylerec style-eval`: style-transfer quality of the shipped networks (concept paper §9.6).

For every (product photo, style image) pair it stylizes the product with the
worker's own engine and reports SSIM/PSNR against the content (structure
kept), style consistency cos(emb(result), emb(style)) and its gain over
cos(emb(content), emb(style)) (the style actually moved towards the target),
and latency. Writes ``out/style-eval/style_eval.json`` and a contact sheet.
The command fails (exit 1) when any pair shows no positive gain — that is the
quality bar, not a statistic.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from cli.datasets.images import synthetic_images
from cli.errors import UsageError

REPO = Path(__file__).resolve().parents[2]  # cli/<package>/<module>.py -> the repository
SHARED_IMAGES = REPO.parent / "shared" / "data" / "images"
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp"}
THUMB_H = 160


def register(sub: Any) -> None:
    p = sub.add_parser("style-eval", help="style-transfer quality: SSIM/PSNR, style consistency gain, latency")
    p.add_argument("--products", type=Path, help=f"content images (default {SHARED_IMAGES / 'products'})")
    p.add_argument("--styles", type=Path, help=f"style images (default {SHARED_IMAGES / 'styles'})")
    p.add_argument("--out", type=Path, default=REPO / "out" / "style-eval", help="output folder")
    p.add_argument("--limit", type=int, default=0, help="evaluate at most this many pairs (0 = all)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=cmd_style_eval)


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)


def _load(folder: Path | None, kind: str, engine: Any) -> tuple[list[tuple[str, Image.Image]], str]:
    """(name, decoded image) pairs and where they came from."""
    if folder is not None:
        if not folder.is_dir():
            raise UsageError(f"--{kind} {folder} is not a folder")
        files = _images_in(folder)
        if not files:
            raise UsageError(f"--{kind} {folder} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    else:
        default = SHARED_IMAGES / kind
        if not default.is_dir() or not _images_in(default):
            print(f"style-eval: {default} not found: using generated SYNTHETIC {kind}", file=sys.stderr)
            return synthetic_images(kind, 3), "synthetic"
        files = _images_in(default)
    loaded = []
    from services.style_worker.images import ImageRejected

    for f in files:
        try:
            loaded.append((f.name, engine.decode(f.read_bytes())))
        except ImageRejected as exc:
            print(f"style-eval: skipping {f}: {exc.reason}", file=sys.stderr)
    if not loaded:
        raise UsageError(f"no usable images among {len(files)} files in {files[0].parent}")
    return loaded, str(files[0].parent)


def _thumb(img: Image.Image) -> Image.Image:
    w = max(1, round(img.size[0] * THUMB_H / img.size[1]))
    return img.convert("RGB").resize((w, THUMB_H), Image.Resampling.BICUBIC)


def contact_sheet(rows: list[tuple[Image.Image, Image.Image, Image.Image, str]], path: Path) -> None:
    """One row per pair: content | style | result, with the pair's numbers underneath."""
    thumbs = [(_thumb(c), _thumb(s), _thumb(r), label) for c, s, r, label in rows]
    col_w = [max(t[0].size[0] for t in thumbs), max(t[1].size[0] for t in thumbs), max(t[2].size[0] for t in thumbs)]
    row_h = THUMB_H + 18
    sheet = Image.new("RGB", (sum(col_w) + 40, row_h * len(thumbs) + 10), "white")
    draw = ImageDraw.Draw(sheet)
    for r, (c, s, res, label) in enumerate(thumbs):
        x, y = 10, 5 + r * row_h
        for i, im in enumerate((c, s, res)):
            sheet.paste(im, (x, y))
            x += col_w[i] + 10
        draw.text((10, y + THUMB_H + 2), label, fill="black")
    sheet.save(path)


def _percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else 0.0


def cmd_style_eval(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from services.style_worker.config import StyleWorkerSettings
    from services.style_worker.engine import StyleEngine, StylizeRequest
    from services.style_worker.quality import content_scores, style_consistency

    if args.limit < 0:
        raise UsageError("--limit must be >= 0")
    for kind, folder in (("products", args.products), ("styles", args.styles)):
        if folder is not None and not folder.is_dir():  # fail before loading any network
            raise UsageError(f"--{kind} {folder} is not a folder")
    settings = StyleWorkerSettings()
    engine = StyleEngine.from_settings(settings)
    try:
        products, products_src = _load(args.products, "products", engine)
        styles, styles_src = _load(args.styles, "styles", engine)
        synthetic = "synthetic" in (products_src, styles_src)
        content_vecs = engine.embed_many([img for _, img in products])
        style_vecs = engine.embed_many([img for _, img in styles])
        pairs = [(p, s) for p in range(len(products)) for s in range(len(styles))]
        if args.limit:
            pairs = pairs[: args.limit]
        args.out.mkdir(parents=True, exist_ok=True)
        rows: list[dict[str, Any]] = []
        sheet_rows = []
        for pi, si in tqdm(pairs, desc="style-eval", unit="pair", file=sys.stderr):
            (pname, pimg), (sname, simg) = products[pi], styles[si]
            result, latency = engine.stylize_timed(StylizeRequest(pimg, style_vecs[si], 1.0, False))
            result_vec = engine.embed(result)
            s, p = content_scores(pimg, result)
            consistency, gain = style_consistency(result_vec, content_vecs[pi], style_vecs[si])
            rows.append(
                {
                    "content": pname,
                    "style": sname,
                    "ssim": round(s, 4),
                    "psnr_db": round(p, 3),
                    "style_consistency": round(consistency, 4),
                    "content_style_cosine": round(consistency - gain, 4),
                    "style_gain": round(gain, 4),
                    "latency_s": round(latency, 4),
                    "size": list(result.size),
                }
            )
            label = f"{pname} x {sname}: SSIM {s:.3f} PSNR {p:.1f} dB cons {consistency:.3f} gain {gain:+.3f}"
            sheet_rows.append((pimg, simg, result, label))
        sheet_path = args.out / "contact_sheet.png"
        contact_sheet(sheet_rows, sheet_path)
        gains = [r["style_gain"] for r in rows]
        latencies = [r["latency_s"] for r in rows]
        summary = {
            "pairs": len(rows),
            "all_gains_positive": all(g > 0 for g in gains),
            "min_style_gain": min(gains),
            "mean_style_gain": round(float(np.mean(gains)), 4),
            "mean_style_consistency": round(float(np.mean([r["style_consistency"] for r in rows])), 4),
            "mean_ssim": round(float(np.mean([r["ssim"] for r in rows])), 4),
            "mean_psnr_db": round(float(np.mean([r["psnr_db"] for r in rows])), 3),
            "latency_p50_s": round(_percentile(latencies, 50), 4),
            "latency_p95_s": round(_percentile(latencies, 95), 4),
            "images_per_s_sequential": round(len(rows) / sum(latencies), 3) if latencies else 0.0,
        }
        report = {
            "generated_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "synthetic": synthetic,
            "products_source": products_src,
            "styles_source": styles_src,
            "machine": {"cpu_count": _cpu_count(), "platform": platform.platform()},
            "provider": engine.provider,
            "batching_mode": engine.batching_mode,
            "strength": 1.0,
            "metric_notes": (
                "SSIM (Gaussian 11x11, sigma 1.5) and PSNR on BT.601 luminance, content vs result at the result's "
                "size; style consistency = cos(emb(result), emb(style)); gain = that minus cos(emb(content), "
                "emb(style)); embeddings from arbitrary_predict; latency = one stylization incl. pre/post-processing"
            ),
            "summary": summary,
            "pairs": rows,
            "contact_sheet": str(sheet_path),
        }
        (args.out / "style_eval.json").write_text(json.dumps(report, indent=2))
    finally:
        engine.close()
    if args.json:
        print(json.dumps({**summary, "synthetic": synthetic, "report": str(args.out / "style_eval.json")}, indent=2))
    else:
        print(
            f"style-eval: {summary['pairs']} pairs, mean SSIM {summary['mean_ssim']}, "
            f"PSNR {summary['mean_psnr_db']} dB, "
            f"consistency {summary['mean_style_consistency']}, min gain {summary['min_style_gain']}, "
            f"p50 {summary['latency_p50_s']} s -> {args.out}"
        )
    if not summary["all_gains_positive"]:
        print("style-eval: FAILED: some pairs show no positive style gain", file=sys.stderr)
        return 1
    return 0


def _cpu_count() -> int:
    import os

    return os.cpu_count() or 1
