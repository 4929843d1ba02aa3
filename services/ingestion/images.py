"""Item photos: fetch by URL with size/time limits, and check bytes before anyone decodes them.

Why so careful: a catalog feed is untrusted input. A URL may point at a huge
file, a slow server, a non-HTTP scheme or an internal address; image bytes may
be a decompression bomb. Everything here reads headers only and stops at the
configured limits, so a bad item costs at most ``max_image_bytes`` of memory and
``image_fetch_timeout_s`` of one worker thread.
"""

from __future__ import annotations

import io
import ipaddress
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
import warnings
from dataclasses import dataclass
from typing import IO, Any

from PIL import Image

from services.ingestion import metrics

CONTENT_TYPES = {"JPEG": "image/jpeg", "PNG": "image/png", "WEBP": "image/webp", "GIF": "image/gif"}


class ImageError(ValueError):
    """The photo is unusable; the message is the per-item rejection reason."""


@dataclass(frozen=True)
class CheckedImage:
    data: bytes
    content_type: str
    width: int
    height: int


def check_image(data: bytes, *, max_bytes: int, max_pixels: int) -> CheckedImage:
    """Header-only check: format, dimensions and pixel budget; never decodes the pixels."""
    if not data:
        raise ImageError("image is empty")
    if len(data) > max_bytes:
        raise ImageError(f"image larger than {max_bytes} bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            fmt = img.format or ""
            width, height = img.size
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError(f"image rejected as a decompression bomb: {exc}") from exc
    except Exception as exc:  # Pillow raises many types for garbage input
        raise ImageError(f"image is not a readable JPEG/PNG/WEBP/GIF ({type(exc).__name__})") from exc
    if fmt not in CONTENT_TYPES:
        raise ImageError(f"image format {fmt or 'unknown'} not accepted (JPEG, PNG, WEBP, GIF)")
    if width <= 0 or height <= 0:
        raise ImageError("image has no pixels")
    if width * height > max_pixels:
        raise ImageError(f"image of {width}x{height} exceeds {max_pixels} pixels")
    try:
        # verify() walks the container structure (chunk CRCs for PNG) without decoding pixels.
        Image.open(io.BytesIO(data)).verify()
    except Exception as exc:
        raise ImageError(f"image is truncated or corrupt ({type(exc).__name__})") from exc
    return CheckedImage(data=data, content_type=CONTENT_TYPES[fmt], width=width, height=height)


def _check_url(url: str, allow_private: bool) -> None:
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise ImageError("image.url must be http:// or https://")
    if not parts.hostname:
        raise ImageError("image.url has no host")
    if parts.username or parts.password:
        raise ImageError("image.url must not carry credentials")
    if allow_private:
        return
    try:
        infos = socket.getaddrinfo(parts.hostname, parts.port or (443 if parts.scheme == "https" else 80))
    except (socket.gaierror, UnicodeError) as exc:
        raise ImageError(f"image.url host does not resolve ({exc})") from exc
    for info in infos:
        ip = ipaddress.ip_address(info[4][0])
        if ip.is_private or ip.is_loopback or ip.is_link_local or ip.is_reserved or ip.is_multicast:
            raise ImageError("image.url points at a private or loopback address")


class _SafeRedirects(urllib.request.HTTPRedirectHandler):
    """Follow at most a few redirects, each re-checked like the original URL."""

    max_redirections = 3

    def __init__(self, allow_private: bool) -> None:
        super().__init__()
        self.allow_private = allow_private

    def redirect_request(
        self, req: urllib.request.Request, fp: IO[bytes], code: int, msg: str, headers: Any, newurl: str
    ) -> urllib.request.Request | None:
        _check_url(newurl, self.allow_private)
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def fetch_image(url: str, *, max_bytes: int, timeout_s: float, allow_private: bool) -> bytes:
    """Download ``url`` within ``max_bytes`` and ``timeout_s`` (total), or raise ImageError."""
    start = time.monotonic()
    outcome = "error"
    try:
        _check_url(url, allow_private)
        opener = urllib.request.build_opener(_SafeRedirects(allow_private))
        req = urllib.request.Request(url, headers={"User-Agent": "stylerec-ingestion/1", "Accept": "image/*"})
        deadline = start + timeout_s
        try:
            with opener.open(req, timeout=timeout_s) as resp:
                declared = resp.headers.get("Content-Length")
                if declared and declared.isdigit() and int(declared) > max_bytes:
                    outcome = "too_large"
                    raise ImageError(f"image.url: Content-Length {declared} exceeds {max_bytes} bytes")
                chunks: list[bytes] = []
                total = 0
                while True:
                    if time.monotonic() > deadline:
                        outcome = "timeout"
                        raise ImageError(f"image.url: download took longer than {timeout_s:g}s")
                    chunk = resp.read(64 * 1024)
                    if not chunk:
                        break
                    total += len(chunk)
                    if total > max_bytes:
                        outcome = "too_large"
                        raise ImageError(f"image.url: body exceeds {max_bytes} bytes")
                    chunks.append(chunk)
        except urllib.error.HTTPError as exc:
            raise ImageError(f"image.url: HTTP {exc.code}") from exc
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            if isinstance(reason, socket.timeout | TimeoutError):
                outcome = "timeout"
                raise ImageError(f"image.url: no answer within {timeout_s:g}s") from exc
            raise ImageError(f"image.url: fetch failed ({reason})") from exc
        outcome = "ok"
        return b"".join(chunks)
    finally:
        metrics.IMAGE_FETCH_SECONDS.labels(outcome).observe(time.monotonic() - start)
