"""Keyword options of the generation methods, as TypedDicts for `**options` signatures.

`complete()`, `chat_complete()` and `run()` forward these to `generate()`/`chat()` or to the
sampling parameters, so type checkers and IDEs see the same names everywhere.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypedDict

from .types import Priority


class SamplingOptions(TypedDict, total=False):
    """Sampling parameters; a missing key leaves the daemon's default."""

    max_tokens: int | None
    temperature: float | None
    top_p: float | None
    top_k: int | None
    seed: int | None
    stop: str | Sequence[str] | None
    ignore_eos: bool


class GenerateOptions(SamplingOptions, total=False):
    """Everything `generate()` and `chat()` take besides their input."""

    task: str
    priority: Priority | str | None
    timeout: float | None
