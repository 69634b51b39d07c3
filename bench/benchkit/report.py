"""Benchmark helpers (outside the serving pipeline): from samples to what a bench prints.

Medians, percentiles and ratios that tolerate missing values (a reference that is not
installed gives None, printed as "-"); the alternation of compared sides over rounds;
progress lines on stderr; the aligned text table with notes that the scripts print on
stdout, or their result as JSON (`--json`).
"""

from __future__ import annotations

import datetime as dt
import json
import statistics
import sys
from collections.abc import Callable, Container, Iterable, Sequence
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


def progress(name: str) -> Callable[[str], None]:
    """A function that prints `[name] message` on stderr (the table goes to stdout)."""

    def log(message: str) -> None:
        print(f"[{name}] {message}", file=sys.stderr, flush=True)

    return log


def median(values: Iterable[float | None]) -> float | None:
    """The median of the values that are present; None if there are none."""
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def pct(values: list[float], q: float) -> float | None:
    import numpy as np

    return float(np.percentile(values, q)) if values else None


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def leading_agreement(a: list[int], b: list[int]) -> int:
    """How many tokens two greedy generations share from the start."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def alternate(sides: Sequence[T], round_index: int) -> Sequence[T]:
    """The compared sides in their order on even rounds and reversed on odd ones, so that
    neither always runs first (after the other has warmed or heated the machine)."""
    return sides if round_index % 2 == 0 else sides[::-1]


def stamp() -> dict[str, str]:
    """When and how the result was made: the first keys of every JSON result."""
    return {"date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "command": " ".join([Path(sys.executable).name, *sys.argv])}


def num(v: float | None, digits: int = 1) -> str:
    return "-" if v is None else f"{v:,.{digits}f}"


def render_table(titles: list[str], header: list[str], rows: list[list[str]],
                 right: Container[int], notes: list[str]) -> str:
    """Title lines, then the columns padded to their widest cell (the columns in `right`
    aligned right), then the notes as a bullet list."""
    widths = [max(len(line[i]) for line in [header, *rows]) for i in range(len(header))]

    def fmt(line: list[str]) -> str:
        cells = [c.rjust(w) if i in right else c.ljust(w)
                 for i, (c, w) in enumerate(zip(line, widths, strict=True))]
        return "  ".join(cells).rstrip()

    out = [*titles, fmt(header), "  ".join("-" * w for w in widths)]
    out += [fmt(line) for line in rows]
    out += [""] + [f"* {n}" for n in notes]
    return "\n".join(out)


def emit(result: Any, render: Callable[[Any], str], as_json: bool) -> None:
    """Prints the result on stdout: as JSON with `--json`, else as `render` makes it."""
    print(json.dumps(result, indent=2) if as_json else render(result))
