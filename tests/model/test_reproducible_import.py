"""Importing the same GGUF twice gives the same bytes, so the same image digest."""

from __future__ import annotations

import hashlib
from pathlib import Path

from m4d.builder.importers.gguf_llama import import_gguf_llama

from tests.model.conftest import smollm2_gguf_path


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_gguf_import_is_byte_for_byte_reproducible(tmp_path: Path) -> None:
    a = import_gguf_llama(smollm2_gguf_path(), tmp_path / "a")
    b = import_gguf_llama(smollm2_gguf_path(), tmp_path / "b")
    assert a == b
    for name in ("model.safetensors", "tokenizer.json"):
        assert digest(tmp_path / "a" / name) == digest(tmp_path / "b" / name), name
