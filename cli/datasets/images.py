"""Pictures for the style experiments and benchmarks: the product photos and style images of
``../shared/data/images``, or generated stand-ins that say they are synthetic.

* :func:`find_images`: both folders decoded (the style-λ experiment, the demo's art and photo prints);
* :func:`synthetic_images`: generated products or styles (``style-eval`` and ``bench style``
  without the shared data).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


def _load(path: Path) -> Image.Image:
    return Image.open(path).convert("RGB")


def synthetic_products_and_styles(seed: int = 7) -> tuple[dict[str, Image.Image], dict[str, Image.Image]]:
    """Generated 'product photos' (shapes on backgrounds) and 'styles' (textures). SYNTHETIC."""
    rng = np.random.default_rng(seed)
    products: dict[str, Image.Image] = {}
    colors = [(200, 40, 40), (40, 160, 60), (40, 80, 200), (220, 180, 30), (150, 60, 170), (30, 170, 170)]
    for n, c in enumerate(colors):
        img = Image.new("RGB", (320, 320), (235, 235, 230))
        d = ImageDraw.Draw(img)
        if n % 3 == 0:
            d.ellipse((60, 60, 260, 260), fill=c)
        elif n % 3 == 1:
            d.rectangle((70, 50, 250, 270), fill=c)
        else:
            d.polygon([(160, 40), (280, 270), (40, 270)], fill=c)
        products[f"synthetic-product-{n}"] = img
    styles: dict[str, Image.Image] = {}
    yy, xx = np.mgrid[0:256, 0:256]
    patterns = {
        "stripes": (np.sin(xx / 6.0) > 0)[..., None] * np.array([30, 30, 120]) + 100,
        "checker": (((xx // 32) + (yy // 32)) % 2)[..., None] * np.array([180, 90, 20]) + 40,
        "swirl": (np.sin(np.hypot(xx - 128, yy - 128) / 5.0) * 0.5 + 0.5)[..., None] * np.array([60, 200, 120]),
        "noise": rng.integers(0, 255, size=(256, 256, 3)),
        "waves": (np.sin(xx / 9.0 + np.sin(yy / 13.0) * 3) * 0.5 + 0.5)[..., None] * np.array([230, 120, 200]),
    }
    for name, arr in patterns.items():
        styles[f"synthetic-{name}"] = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    return products, styles


def find_images(images_dir: Path | None) -> tuple[dict[str, Image.Image], dict[str, Image.Image], str]:
    """(products, styles, source label) from ``images_dir``/products and /styles, else generated stand-ins."""
    if images_dir is not None:
        prod_dir, style_dir = images_dir / "products", images_dir / "styles"
        if prod_dir.is_dir() and style_dir.is_dir():
            products = {p.stem: _load(p) for p in sorted(prod_dir.iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES}
            styles = {p.stem: _load(p) for p in sorted(style_dir.iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES}
            if products and styles:
                return products, styles, f"real photos and style images from {images_dir}"
    products, styles = synthetic_products_and_styles()
    return products, styles, "GENERATED images (../shared/data not found): synthetic photos and textures"


def synthetic_images(kind: str, n: int, seed: int = 7) -> list[tuple[str, Image.Image]]:
    """Generated stand-ins (labelled synthetic) for a machine without ../shared/data.

    Products: a smooth background with a few solid shapes (object-like
    structure). Styles: strongly coloured stroke textures.
    """
    rng = np.random.default_rng(seed + (0 if kind == "products" else 1000))
    out = []
    for i in range(n):
        if kind == "products":
            h, w = 320, 400
            yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
            base = np.stack([0.6 + 0.3 * xx, 0.5 + 0.3 * yy, 0.7 - 0.2 * xx], axis=-1)
            img = Image.fromarray((np.clip(base, 0, 1) * 255).astype(np.uint8))
            draw = ImageDraw.Draw(img)
            for _ in range(4):
                x0, y0 = int(rng.integers(0, w - 80)), int(rng.integers(0, h - 80))
                colour = tuple(int(c) for c in rng.integers(0, 255, 3))
                draw.ellipse([x0, y0, x0 + int(rng.integers(40, 160)), y0 + int(rng.integers(40, 160))], fill=colour)
        else:
            size = 256
            freq = rng.uniform(4, 20, 3)
            yy, xx = np.mgrid[0:size, 0:size] / size
            angle = rng.uniform(0, np.pi)
            t = np.cos(angle) * xx + np.sin(angle) * yy
            noise = rng.random((size, size))
            arr = np.stack([0.5 + 0.5 * np.sin(2 * np.pi * f * t + 3 * noise) for f in freq], axis=-1)
            img = Image.fromarray((arr * 255).astype(np.uint8))
        out.append((f"synthetic-{kind}-{i}", img))
    return out
