"""Image guards and the pre/post-processing around the networks (pure functions, no processes)."""

from __future__ import annotations

import io

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from services.style_worker import images
from services.style_worker.images import ImageLimits, ImageRejected, decode_image
from tests.style_worker.conftest import encoded, photo, png_with_header_size

LIMITS = ImageLimits(max_bytes=200_000, max_pixels=1_000_000, min_side=32)


def kind_of(data: bytes, limits: ImageLimits = LIMITS) -> str:
    with pytest.raises(ImageRejected) as err:
        decode_image(data, limits)
    assert err.value.reason.startswith(err.value.kind + ": ")
    return err.value.kind


def test_good_png_and_jpeg_decode_to_rgb() -> None:
    for data in (encoded(photo()), encoded(photo(), "JPEG", quality=90)):
        img = decode_image(data, LIMITS)
        assert img.mode == "RGB" and img.size == (160, 120)


def test_rejections_carry_their_class() -> None:
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 255, (300, 300, 3), dtype=np.uint8))
    assert kind_of(encoded(noise)) == "too_large"  # ~270 kB of PNG noise
    assert kind_of(png_with_header_size(20_000, 20_000)) == "bomb"  # 400 Mpx claimed by a 70-byte file
    jpeg = encoded(photo(), "JPEG")
    assert kind_of(jpeg[: len(jpeg) // 2]) == "corrupt"  # truncated
    assert kind_of(b"\x89PNG\r\n\x1a\n" + b"garbage" * 20) == "corrupt"
    assert kind_of(b"") == "corrupt"
    assert kind_of(b"%PDF-1.4 not an image at all") == "corrupt"
    assert kind_of(encoded(photo(16, 200))) == "too_small"


def test_bomb_is_rejected_before_pixels_are_decoded() -> None:
    # A real 2000x2000 image under a 1 Mpx limit: refused from the header alone.
    data = encoded(Image.new("L", (2000, 2000), 0))
    assert len(data) < LIMITS.max_bytes
    assert kind_of(data) == "bomb"


def test_exif_orientation_is_applied() -> None:
    img = photo(160, 120)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise on display
    data = encoded(img, "JPEG", exif=exif.tobytes())
    assert decode_image(data, LIMITS).size == (120, 160)


def test_alpha_is_flattened_on_white() -> None:
    rgba = Image.new("RGBA", (64, 64), (255, 0, 0, 0))  # fully transparent red
    rgba.putpixel((0, 0), (0, 0, 255, 255))
    out = decode_image(encoded(rgba), LIMITS)
    assert out.mode == "RGB"
    assert out.getpixel((10, 10)) == (255, 255, 255)
    assert out.getpixel((0, 0)) == (0, 0, 255)


def test_content_round_trip_keeps_aspect_ratio() -> None:
    img = photo(300, 150)
    arr, placement = images.content_input(img, 384)
    assert arr.shape == (384, 384, 3) and arr.dtype == np.float32
    assert (placement.width, placement.height) == (384, 192)
    back = images.from_network(arr, placement, max_side=1024)
    assert back.size == (300, 150)
    # the un-padded region is the photo itself: cropping must land on it
    diff = np.abs(np.asarray(back, dtype=float) - np.asarray(img, dtype=float)).mean()
    assert diff < 12
    small = images.from_network(arr, placement, max_side=100)
    assert small.size == (100, 50)


def test_style_input_is_square_without_distortion() -> None:
    arr = images.style_input(photo(300, 100), 256)
    assert arr.shape == (256, 256, 3) and arr.min() >= 0.0 and arr.max() <= 1.0


def test_strength_and_preserve_colour() -> None:
    content = Image.new("RGB", (40, 40), (200, 30, 30))
    stylized = Image.new("RGB", (40, 40), (30, 30, 200))
    assert images.blend(content, stylized, 1.0, False).getpixel((5, 5)) == (30, 30, 200)
    half = images.blend(content, stylized, 0.5, False).getpixel((5, 5))
    assert all(abs(a - b) <= 1 for a, b in zip(half, (115, 30, 115), strict=True))
    kept = images.blend(content, stylized, 1.0, True).getpixel((5, 5))
    assert kept[0] > kept[2]  # content's red hue survives, luminance from the stylized image


def test_encode_formats() -> None:
    data, ctype = images.encode(photo(), "JPEG", 80)
    assert ctype == "image/jpeg" and Image.open(io.BytesIO(data)).format == "JPEG"
    data, ctype = images.encode(photo(), "PNG")
    assert ctype == "image/png" and Image.open(io.BytesIO(data)).format == "PNG"


_PNG = encoded(photo(64, 48))
_JPEG = encoded(photo(64, 48), "JPEG")


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    base=st.sampled_from([_PNG, _JPEG]),
    cut=st.integers(min_value=0, max_value=4000),
    flips=st.lists(st.tuples(st.integers(min_value=0, max_value=4000), st.integers(0, 255)), max_size=8),
)
def test_damaged_images_never_escape_as_other_errors(base: bytes, cut: int, flips: list[tuple[int, int]]) -> None:
    """Whatever a shop uploads, the worker gets an RGB image or an ImageRejected - never a crash."""
    data = bytearray(base[: max(1, len(base) - cut)])
    for pos, value in flips:
        data[pos % len(data)] = value
    try:
        img = decode_image(bytes(data), LIMITS)
    except ImageRejected as exc:
        assert exc.kind in {"too_large", "bomb", "corrupt", "too_small"}
    else:
        assert img.mode == "RGB" and min(img.size) >= LIMITS.min_side
