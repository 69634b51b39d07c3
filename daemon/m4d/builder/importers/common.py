"""Image build stage, what every importer shares: the progress callback, strict reading of a
checkpoint's JSON files, and reproducible safetensors writes.

A component's tensors are written sorted, contiguous, with one metadata key only: safetensors
writes its metadata map in hash order, so several keys would make a file's bytes (and the
image digest) differ from build to build.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from m4image.fsutil import atomic_file
from safetensors.torch import save_file

# (stage, done, total): an importer reports each stage's progress through it
Progress = Callable[[str, int, int], None]


def read_json(path: Path, error: type[Exception], folder_kind: str = "", *,
              required: bool = True) -> Any:
    """A JSON file of the checkpoint; ``error`` when it is missing (unless not ``required``:
    then ``{}``) or not valid JSON. ``folder_kind`` ("Whisper checkpoint") names what the
    folder should be in the message about a missing file."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        if not required:
            return {}
        hint = f"; is {path.parent} a {folder_kind} folder?" if folder_kind else ""
        raise error(f"{path} is missing{hint}") from None
    except json.JSONDecodeError as e:
        raise error(f"{path} is not valid JSON: {e}") from None


def write_tensors(tensors: dict[str, torch.Tensor], path: Path,
                  dtype: torch.dtype | None = torch.float32, progress: Progress | None = None,
                  stage: str = "write") -> None:
    """Save ``tensors`` (sorted, contiguous, in ``dtype``; None keeps each one's) atomically,
    with the one metadata key ``{"format": "pt"}``."""
    out: dict[str, torch.Tensor] = {}
    for i, name in enumerate(sorted(tensors), 1):
        t = tensors[name] if dtype is None else tensors[name].to(dtype)
        out[name] = t.contiguous()
        if progress:
            progress(stage, i, len(tensors))
    with atomic_file(path) as tmp:
        save_file(out, str(tmp), metadata={"format": "pt"})
