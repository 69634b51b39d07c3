"""How m4ctl prints: streamed text, protobuf JSON lines, human units, stats and progress.

Everything the commands show goes through here, so stdout carries only results (text or
JSON) and stderr carries stats, progress and errors.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Sequence
from typing import Any

from google.protobuf import json_format
from m4client import LabelScore, ModelInfo, Timings, Usage, WordPrediction


def write(text: str) -> None:
    """Write to stdout and flush at once (streamed output)."""
    sys.stdout.write(text)
    sys.stdout.flush()


def json_line(message: Any) -> None:
    """One protobuf message (or a plain dict) as a line of JSON."""
    if isinstance(message, dict):
        write(json.dumps(message) + "\n")
        return
    write(json_format.MessageToJson(message, indent=None) + "\n")


def result(args: argparse.Namespace, info: dict[str, Any], quiet: str,
           lines: Sequence[str]) -> None:
    """A command's one result: `info` as a JSON line with --json, the `quiet` line with -q,
    else the human `lines`."""
    if args.json:
        write(json.dumps(info) + "\n")
    elif args.quiet:
        write(quiet + "\n")
    else:
        write("".join(line + "\n" for line in lines))


def err(text: str) -> None:
    """One line on stderr."""
    sys.stderr.write(text + "\n")
    sys.stderr.flush()


def human_bytes(n: float) -> str:
    """1536 → "1.5 KiB"."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def human_count(n: float) -> str:
    """135_000_000 → "135.0M"."""
    for limit, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if n >= limit:
            return f"{n / limit:.1f}{suffix}"
    return str(int(n))


def human_duration(seconds: float) -> str:
    """3725 → "1h 02m 05s"."""
    s = int(seconds)
    d, s = divmod(s, 86400)
    h, s = divmod(s, 3600)
    m, s = divmod(s, 60)
    if d:
        return f"{d}d {h:02d}h {m:02d}m"
    if h:
        return f"{h}h {m:02d}m {s:02d}s"
    return f"{m}m {s:02d}s" if m else f"{seconds:.1f}s"


def model_line(model: ModelInfo | None) -> str:
    if model is None:
        return "model: unknown"
    return f"model: {model.image_name} {model.image_version} ({model.image_digest[:12]})"


def stats(
    usage: Usage | None, timings: Timings | None, model: ModelInfo | None, finish: str | None
) -> None:
    """Usage and timings of a generation, on stderr."""
    u = usage or Usage()
    t = timings or Timings()
    rate = u.completion_tokens / (t.total_ms / 1000) if t.total_ms > 0 else 0.0
    err(
        f"tokens: {u.prompt_tokens} prompt + {u.completion_tokens} completion = "
        f"{u.total_tokens}; finish: {finish or 'unknown'}"
    )
    err(
        f"time: queue {t.queue_ms:.1f} ms, prefill {t.prefill_ms:.1f} ms, first token "
        f"{t.first_token_ms:.1f} ms, decode {t.decode_ms:.1f} ms, total {t.total_ms:.1f} ms "
        f"({rate:.1f} tok/s)"
    )
    err(model_line(model))


def vector_line(index: int, vector: Sequence[float], text: str | None = None, dims: int = 4) -> str:
    """`0  384d  norm 1.0000  [0.0123, -0.0456, …]  "text"`."""
    norm = math.sqrt(sum(v * v for v in vector))
    head = ", ".join(f"{v:.4f}" for v in vector[:dims])
    more = ", …" if len(vector) > dims else ""
    line = f"{index}  {len(vector)}d  norm {norm:.4f}  [{head}{more}]"
    if text is not None:
        preview = text if len(text) <= 40 else text[:39] + "…"
        line += f"  {preview!r}"
    return line


def ranking_lines(labels: Sequence[LabelScore], quiet: bool = False) -> list[str]:
    """Labels best first, aligned, with a bar for the score."""
    if quiet:
        return [ls.label for ls in labels]
    width = max((len(ls.label) for ls in labels), default=0)
    return [f"{ls.label:<{width}}  {ls.score:.4f}  {'█' * round(ls.score * 20)}" for ls in labels]


def prediction_lines(predictions: Sequence[WordPrediction], quiet: bool = False) -> list[str]:
    """Words most likely first, with probabilities."""
    if quiet:
        return [p.word for p in predictions]
    width = max((len(p.word) for p in predictions), default=0)
    return [f"{p.word:<{width}}  {p.probability:.4f}" for p in predictions]


def table(rows: Sequence[Sequence[str]]) -> list[str]:
    """Left-aligned columns separated by two spaces (the first row is the header)."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]


class Progress:
    """Build progress on stderr: a live counter on a TTY, a line per stage otherwise."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet
        self.tty = sys.stderr.isatty()
        self.stage: str | None = None
        self._last = 0.0

    def __call__(self, stage: str, done: int, total: int) -> None:
        if self.quiet:
            return
        new_stage = stage != self.stage
        if new_stage and self.tty and self.stage is not None:
            sys.stderr.write("\n")
        self.stage = stage
        count = f"{done:,}/{total:,} ({100 * done // total}%)" if total > 0 else f"{done:,}"
        if not self.tty:
            if new_stage:
                err(f"{stage}: {count}" if done else stage)
            return
        now = time.monotonic()
        if new_stage or done >= total or now - self._last >= 0.05:
            self._last = now
            sys.stderr.write(f"\r\x1b[K{stage}: {count}")
            sys.stderr.flush()

    def finish(self) -> None:
        """End the live line."""
        if self.tty and self.stage is not None and not self.quiet:
            sys.stderr.write("\n")
            sys.stderr.flush()
        self.stage = None
