"""Test helpers for OCR: render text lines with Pillow and score what was read.

Shared by the model tests and the daemon tests: ``render_lines`` draws lines of text in a DejaVu
font onto a white canvas and returns PNG bytes; ``char_accuracy`` is 1 - (character edit
distance / reference length).
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

FONT_DIR = Path("/usr/share/fonts/truetype/dejavu")

# (font file, pixel size) pairs the OCR tests render with.
FONTS: list[tuple[str, int]] = [
    ("DejaVuSans.ttf", 32),
    ("DejaVuSerif.ttf", 28),
    ("DejaVuSansMono.ttf", 24),
]

# Lines of ordinary text: words, digits and punctuation that english_g2 can output.
TEST_LINES: list[list[str]] = [
    ["Hello world", "Invoice 2024-07"],
    ["The quick brown fox", "jumps over the lazy dog"],
    ["Total: $42.50", "Call 555-0199 today"],
    ["Meeting at 10:30 AM", "Room B12, floor 3"],
]


def font_path(name: str) -> Path:
    path = FONT_DIR / name
    if not path.is_file():
        raise FileNotFoundError(f"font {path} is missing (Debian package fonts-dejavu-core)")
    return path


def render_lines(
    lines: Sequence[str],
    font: str = "DejaVuSans.ttf",
    size: int = 32,
    *,
    margin: int = 24,
    line_gap: float = 0.8,
    min_width: int = 0,
    fmt: str = "PNG",
) -> bytes:
    """Black text, one line under the other, on a white RGB canvas; returns encoded bytes."""
    return encode(render_image(lines, font, size, margin=margin, line_gap=line_gap, min_width=min_width), fmt)


def render_image(
    lines: Sequence[str],
    font: str = "DejaVuSans.ttf",
    size: int = 32,
    *,
    margin: int = 24,
    line_gap: float = 0.8,
    min_width: int = 0,
) -> Image.Image:
    """As ``render_lines`` but returns the PIL image."""
    f = ImageFont.truetype(str(font_path(font)), size)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    boxes = [probe.textbbox((0, 0), line, font=f) for line in lines]
    step = int(size * (1 + line_gap))
    width = max([min_width] + [b[2] + 2 * margin for b in boxes])
    height = 2 * margin + step * (len(lines) - 1) + size + size // 3
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    for i, line in enumerate(lines):
        draw.text((margin, margin + i * step), line, fill="black", font=f)
    return img


def encode(img: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance between two strings (insert, delete, substitute cost 1)."""
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def char_accuracy(predicted: str, reference: str) -> float:
    """1 - edit distance / reference length (can go below 0 for very wrong output)."""
    if not reference:
        return 1.0 if not predicted else 0.0
    return 1.0 - edit_distance(predicted, reference) / len(reference)
