"""Keyword options of the client methods, as TypedDicts for `**options` signatures.

The sync and asyncio clients and the request core (`_calls`) take the same options through
these, so type checkers and IDEs see the same names everywhere and no signature is written
twice.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypedDict

from ._images import InstallProgress
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


class CallOptions(TypedDict, total=False):
    """What every inference call takes besides its input: the task id ("" for the RPC's
    default task), the priority class and the deadline in seconds (None: the client's)."""

    task: str
    priority: Priority | str | None
    timeout: float | None


class FormatOptions(TypedDict, total=False):
    """Structured output, at most one of: a JSON schema (a dict, or its JSON text) the
    output validates against, a regex it matches, or the choices it is one of."""

    json_schema: Mapping[str, Any] | str | None
    regex: str | None
    choices: Sequence[str] | None


class GenerateOptions(SamplingOptions, CallOptions, FormatOptions, total=False):
    """Everything `generate()` and `chat()` take besides their input."""


class TurnOptions(SamplingOptions, FormatOptions, total=False):
    """Everything a session's turn takes besides its message: sampling, a format, the
    priority, the deadline and `tool_choice` ("auto" when the session has tools: the model
    answers or calls one; "none"; "required"; or a tool's name)."""

    priority: Priority | str | None
    timeout: float | None
    tool_choice: str


class RunOptions(SamplingOptions, total=False):
    """Everything `run()` takes besides the task id and the inputs (`num_predictions`: for
    tasks that predict words; 0 is the daemon's default)."""

    num_predictions: int
    priority: Priority | str | None
    timeout: float | None


class InstallOptions(TypedDict, total=False):
    """The options of `install_image()`: the tar's size when known (for progress), whether a
    security_version below the device's floor is accepted, whether the image becomes the
    trial at once, a callback for each progress message, and the deadline."""

    total_bytes: int
    allow_downgrade: bool
    activate: bool
    progress: Callable[[InstallProgress], None] | None
    timeout: float | None
