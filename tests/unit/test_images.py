"""m4d.prepare.images: safe decoding of untrusted image bytes."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from m4d.errors import InvalidArgument
from m4d.prepare.images import decode_image
from PIL import Image

MB = 1 << 20
LIMITS = {"max_bytes": 4 * MB, "max_pixels": 4_000_000}


def _encode(img: Image.Image, fmt: str, **kw: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _gradient(w: int = 64, h: int = 48) -> Image.Image:
    x = np.linspace(0, 255, w, dtype=np.uint8)[None, :].repeat(h, 0)
    y = np.linspace(0, 255, h, dtype=np.uint8)[:, None].repeat(w, 1)
    return Image.fromarray(np.stack([x, y, 255 - x], axis=2), "RGB")


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares width x height (8-bit grey) but carries one tiny IDAT: a bomb's shape."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 16)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_decodes_supported_formats_to_rgb(fmt: str) -> None:
    src = _gradient()
    img = decode_image(_encode(src, fmt, quality=95) if fmt != "PNG" else _encode(src, fmt), **LIMITS)
    assert img.mode == "RGB" and img.size == (64, 48)
    diff = np.abs(np.asarray(img, dtype=int) - np.asarray(src, dtype=int)).mean()
    assert diff < (0.01 if fmt == "PNG" else 8)


def test_grey_palette_and_16_bit_become_rgb() -> None:
    grey = Image.fromarray(np.full((10, 12), 77, np.uint8), "L")
    assert decode_image(_encode(grey, "PNG"), **LIMITS).getpixel((3, 3)) == (77, 77, 77)
    pal = _gradient().convert("P")
    assert decode_image(_encode(pal, "PNG"), **LIMITS).mode == "RGB"
    deep = Image.fromarray(np.full((6, 7), 50000, np.uint16))
    assert decode_image(_encode(deep, "PNG"), **LIMITS).getpixel((0, 0)) == (195, 195, 195)  # 50000 >> 8


def test_transparency_is_composited_on_white() -> None:
    rgba = Image.new("RGBA", (20, 10), (0, 0, 0, 0))  # fully transparent black
    rgba.putpixel((5, 5), (0, 0, 0, 255))  # one opaque black pixel
    img = decode_image(_encode(rgba, "PNG"), **LIMITS)
    assert img.getpixel((0, 0)) == (255, 255, 255)
    assert img.getpixel((5, 5)) == (0, 0, 0)


def test_exif_orientation_is_applied() -> None:
    src = Image.new("RGB", (40, 20), "white")
    src.paste((255, 0, 0), (0, 0, 10, 20))  # red band on the left
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    img = decode_image(_encode(src, "JPEG", exif=exif.tobytes(), quality=95), **LIMITS)
    assert img.size == (20, 40)
    r, g, _ = img.getpixel((10, 3))  # the left band is now at the top
    assert r > 200 and g < 60


def test_refuses_oversized_bytes_naming_the_limit() -> None:
    data = _encode(_gradient(), "PNG")
    with pytest.raises(InvalidArgument, match=rf"{len(data)} bytes; the limit is 100 bytes"):
        decode_image(data, max_bytes=100, max_pixels=10**6)


def test_refuses_empty_and_non_bytes() -> None:
    with pytest.raises(InvalidArgument, match="empty"):
        decode_image(b"", **LIMITS)
    with pytest.raises(InvalidArgument, match="must be bytes"):
        decode_image("not bytes", **LIMITS)  # type: ignore[arg-type]


@pytest.mark.parametrize("fmt,name", [("GIF", "GIF"), ("BMP", "BMP"), ("TIFF", "TIFF"), ("ICO", "ICO")])
def test_refuses_other_formats_by_name(fmt: str, name: str) -> None:
    data = _encode(_gradient(32, 32), fmt)
    with pytest.raises(InvalidArgument, match=rf"a {name} image; only PNG, JPEG and WebP"):
        decode_image(data, **LIMITS)


def test_refuses_unrecognised_bytes() -> None:
    with pytest.raises(InvalidArgument, match="unrecognised format"):
        decode_image(b"hello, this is not an image at all", **LIMITS)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_refuses_truncated_images(fmt: str) -> None:
    rng = np.random.default_rng(0)
    noisy = Image.fromarray(rng.integers(0, 255, (120, 160, 3), dtype=np.uint8), "RGB")
    data = _encode(noisy, fmt)
    with pytest.raises(InvalidArgument, match=rf"{fmt}"):
        decode_image(data[: len(data) // 2], **LIMITS)


def test_refuses_corrupt_header() -> None:
    data = bytearray(_encode(_gradient(), "PNG"))
    data[20:28] = b"\xff" * 8  # garble IHDR (and its CRC no longer matches)
    with pytest.raises(InvalidArgument, match="PNG image"):
        decode_image(bytes(data), **LIMITS)


def test_refuses_decompression_bomb_before_decoding() -> None:
    bomb = _png_header_only(10_000, 10_000)  # 100 Mpx declared in ~80 bytes
    assert len(bomb) < 200
    with pytest.raises(InvalidArgument, match=r"10000x10000 = 100000000 pixels; the limit is 4000000 pixels"):
        decode_image(bomb, **LIMITS)
    # Beyond Pillow's own bomb limit too: still our InvalidArgument, not a Pillow exception.
    with pytest.raises(InvalidArgument, match="pixels"):
        decode_image(_png_header_only(60_000, 60_000), **LIMITS)


def test_refuses_zero_size_image() -> None:
    with pytest.raises(InvalidArgument, match="PNG image"):
        decode_image(_png_header_only(0, 10), **LIMITS)
