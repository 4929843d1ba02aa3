"""Image handling for the style networks: guards, decoding, network-sized tensors and back.

Product photos arrive from shops we do not control, so every image is checked
*before* its pixels are decoded: the encoded size, then the header's pixel
count (a 50 kB PNG can expand to gigabytes — a decompression bomb), then the
minimum size; only then are pixels decoded, and a truncated or corrupt file
fails there with a clear reason instead of taking the worker down. Each
rejection carries a short class ("too_large", "bomb", "corrupt", "too_small")
that becomes the dead-letter reason prefix and a metric label.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

# Never paper over truncated files: they must be rejected, not half-decoded.
ImageFile.LOAD_TRUNCATED_IMAGES = False
# TIFF is left out on purpose: a large parser surface for a format no shop photo needs.
ACCEPTED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP")


class ImageRejected(ValueError):
    """An image the worker will not process; ``kind`` is the dead-letter reason class."""

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(f"{kind}: {detail}")
        self.kind = kind
        self.detail = detail

    @property
    def reason(self) -> str:
        return f"{self.kind}: {self.detail}"


@dataclass(frozen=True)
class ImageLimits:
    """Acceptance limits, taken from the worker settings."""

    max_bytes: int = 10 * 1024 * 1024
    max_pixels: int = 40_000_000
    min_side: int = 32


def check_encoded_size(size: int, limits: ImageLimits) -> None:
    """First guard, usable before the bytes are even fetched (e.g. from a GridFS length)."""
    if size <= 0:
        raise ImageRejected("corrupt", "empty image")
    if size > limits.max_bytes:
        raise ImageRejected("too_large", f"{size} bytes is over the {limits.max_bytes}-byte limit")


def decode_image(data: bytes, limits: ImageLimits) -> Image.Image:
    """Guarded decode → RGB image, EXIF orientation applied, alpha flattened on white."""
    check_encoded_size(len(data), limits)
    try:
        with warnings.catch_warnings():
            # Pillow warns (and later raises) on big images; our own check below decides.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS)
    except Image.DecompressionBombError as exc:
        raise ImageRejected("bomb", str(exc)) from exc
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise ImageRejected("corrupt", f"not a readable image ({type(exc).__name__}: {exc})") from exc
    # Image.open only parsed the header: the size is known, no pixel is decoded yet.
    width, height = img.size
    if width * height > limits.max_pixels:
        raise ImageRejected(
            "bomb", f"{width}x{height} = {width * height} pixels is over the {limits.max_pixels}-pixel limit"
        )
    if min(width, height) < limits.min_side:
        raise ImageRejected("too_small", f"{width}x{height} is under the {limits.min_side}-pixel minimum side")
    try:
        img.load()
        oriented: Image.Image = ImageOps.exif_transpose(img) or img
    except Image.DecompressionBombError as exc:
        raise ImageRejected("bomb", str(exc)) from exc
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        raise ImageRejected("corrupt", f"truncated or corrupt pixel data ({exc})") from exc
    return flatten_to_rgb(oriented)


def flatten_to_rgb(img: Image.Image) -> Image.Image:
    """Composite transparency on white (product shots are cut out on white) and drop to RGB."""
    if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def to_array(img: Image.Image) -> np.ndarray:
    """HWC float32 in 0..1, the layout and range both networks take."""
    return np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0


def style_input(img: Image.Image, size: int) -> np.ndarray:
    """Centre-crop to a square, then resize: style statistics should not be squashed."""
    square = ImageOps.fit(img, (size, size), Image.Resampling.BICUBIC)
    return to_array(square)


@dataclass(frozen=True)
class Placement:
    """Where the content sits inside the padded square the network saw."""

    left: int
    top: int
    width: int
    height: int
    original: tuple[int, int]


def content_input(img: Image.Image, size: int) -> tuple[np.ndarray, Placement]:
    """Fit the longer side to ``size`` and reflect-pad the rest to a square.

    Reflection (not a flat colour) keeps the padding's statistics close to the
    photo's, so the network does not paint a frame that bleeds into the edges.
    """
    w, h = img.size
    scale = size / max(w, h)
    nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
    small = to_array(img.resize((nw, nh), Image.Resampling.BICUBIC))
    left, top = (size - nw) // 2, (size - nh) // 2
    pad = ((top, size - nh - top), (left, size - nw - left), (0, 0))
    mode = "reflect" if min(nw, nh) > max(pad[0][0], pad[0][1], pad[1][0], pad[1][1]) else "edge"
    padded = np.pad(small, pad, mode=mode)  # type: ignore[call-overload]
    return np.ascontiguousarray(padded, dtype=np.float32), Placement(left, top, nw, nh, (w, h))


def output_size(original: tuple[int, int], max_side: int) -> tuple[int, int]:
    w, h = original
    scale = min(1.0, max_side / max(w, h))
    return max(1, round(w * scale)), max(1, round(h * scale))


def from_network(out: np.ndarray, placement: Placement, max_side: int) -> Image.Image:
    """Crop the padding off a network output and scale back to the content's aspect ratio."""
    p = placement
    crop = np.clip(out[p.top : p.top + p.height, p.left : p.left + p.width], 0.0, 1.0)
    img = Image.fromarray((crop * 255.0 + 0.5).astype(np.uint8), "RGB")
    return img.resize(output_size(p.original, max_side), Image.Resampling.BICUBIC)


def blend(content: Image.Image, stylized: Image.Image, strength: float, preserve_color: bool) -> Image.Image:
    """Mix the stylized image back with the content.

    ``preserve_color`` keeps the content's chroma and takes only the luminance
    from the stylized image (so a red dress stays red); ``strength`` < 1 then
    blends pixel-wise towards the content.
    """
    base = content.convert("RGB").resize(stylized.size, Image.Resampling.BICUBIC)
    out = stylized
    if preserve_color:
        y, _, _ = stylized.convert("YCbCr").split()
        _, cb, cr = base.convert("YCbCr").split()
        out = Image.merge("YCbCr", (y, cb, cr)).convert("RGB")
    if strength < 1.0:
        out = Image.blend(base, out, float(max(0.0, strength)))
    return out


def encode(img: Image.Image, fmt: str = "JPEG", quality: int = 90) -> tuple[bytes, str]:
    """Encode for storage; returns (bytes, content type)."""
    buf = io.BytesIO()
    if fmt == "PNG":
        img.save(buf, "PNG", optimize=False)
        return buf.getvalue(), "image/png"
    img.save(buf, "JPEG", quality=quality)
    return buf.getvalue(), "image/jpeg"
