"""Request preparation, image input: decode untrusted image bytes safely.

``decode_image`` is the only way request bytes become pixels. It accepts PNG, JPEG and WebP
(sniffed from the bytes, never from a name or a client's claim), checks the byte size and the
declared pixel count *before* any pixel is decoded (decompression bombs), applies the EXIF
orientation and returns an RGB ``PIL.Image``. Transparent pixels are composited onto white, so
dark text on a transparent background stays readable. Every refusal is an ``InvalidArgument``
that names what was wrong and the limit. Pixels become an encoder's input tensor in
``m4d.prepare.vision``.
"""

from __future__ import annotations

import io
import struct
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from m4d.errors import InvalidArgument

# format name -> the PIL plugin that decodes it
SUPPORTED_FORMATS = {"PNG": "PNG", "JPEG": "JPEG", "WEBP": "WEBP"}


def sniff_format(data: bytes) -> str:
    """The container format from the first bytes: "PNG", "JPEG", "WEBP", or a name to refuse."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if data.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if len(data) >= 12 and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "GIF"
    if data.startswith(b"BM"):
        return "BMP"
    if data[:4] in (b"II*\x00", b"MM\x00*"):
        return "TIFF"
    if data[:4] == b"\x00\x00\x01\x00":
        return "ICO"
    if data.startswith(b"%PDF"):
        return "PDF"
    if len(data) >= 12 and data[4:8] == b"ftyp":
        brand = data[8:12]
        return "AVIF" if brand in (b"avif", b"avis") else "HEIF/MP4"
    if data.startswith(b"\x00\x00\x00\x0cjP  ") or data.startswith(b"\xff\x4f\xff\x51"):
        return "JPEG 2000"
    head = data[:256].lstrip().lower()
    if head.startswith(b"<?xml") or head.startswith(b"<svg"):
        return "SVG/XML"
    return "unknown"


def decode_image(data: bytes, *, max_bytes: int, max_pixels: int) -> Image.Image:
    """Decode PNG/JPEG/WebP bytes to an RGB image, refusing anything unsafe or malformed.

    Raises ``InvalidArgument`` for: empty or oversized input (> ``max_bytes``), a format other
    than PNG/JPEG/WebP, undecodable or truncated data, a zero-size image, and an image whose
    declared width x height exceeds ``max_pixels`` (checked from the header, before decoding).
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise InvalidArgument(f"image must be bytes, got {type(data).__name__}")
    data = bytes(data)
    if not data:
        raise InvalidArgument("image is empty (0 bytes)")
    if len(data) > max_bytes:
        raise InvalidArgument(f"image is {len(data)} bytes; the limit is {max_bytes} bytes")
    fmt = sniff_format(data)
    if fmt not in SUPPORTED_FORMATS:
        what = "an unrecognised format" if fmt == "unknown" else f"a {fmt} image"
        raise InvalidArgument(f"image is {what}; only PNG, JPEG and WebP are accepted")

    try:
        with warnings.catch_warnings():
            # PIL warns (then errors) on its own bomb limit; ours below is stricter and clearer.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=[SUPPORTED_FORMATS[fmt]])
    except Image.DecompressionBombError as e:
        raise InvalidArgument(f"{fmt} image is too large to decode ({e}); the limit is {max_pixels} pixels") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as e:
        raise InvalidArgument(f"{fmt} image cannot be decoded: {e}") from None

    width, height = img.size  # declared by the header; no pixel is decoded yet
    if width <= 0 or height <= 0:
        raise InvalidArgument(f"{fmt} image has zero size ({width}x{height})")
    if width * height > max_pixels:
        raise InvalidArgument(
            f"{fmt} image is {width}x{height} = {width * height} pixels; the limit is {max_pixels} pixels"
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img.load()
            oriented = ImageOps.exif_transpose(img)
    except Image.DecompressionBombError as e:
        raise InvalidArgument(f"{fmt} image is too large to decode ({e}); the limit is {max_pixels} pixels") from None
    except (OSError, SyntaxError, ValueError, EOFError, struct.error) as e:
        raise InvalidArgument(f"{fmt} image is truncated or corrupt: {e}") from None
    return _to_rgb(oriented)


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB; transparency is composited onto white, 16-bit scaled to 8-bit."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("I", "I;16", "I;16B", "I;16L", "I;16N"):
        arr = np.asarray(img).astype(np.uint32)  # [H, W], 0..65535
        img = Image.fromarray((arr >> 8).astype(np.uint8), mode="L")
        mode = "L"
    if mode == "P" and "transparency" in img.info:
        img, mode = img.convert("RGBA"), "RGBA"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")
