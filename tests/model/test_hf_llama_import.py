"""The Hugging Face Llama importer: a small random LlamaForCausalLM round-trips exactly.

The network has random weights (it is not a model); it only checks names, layouts, RoPE and
GQA handling against transformers' own forward.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from m4d.builder.importers.hf_llama import HFImportError, import_hf_llama
from m4d.model.llama import LlamaConfig, greedy_generate, load_llama


@pytest.mark.parametrize("tied", [True, False])
def test_random_hf_llama_imports_with_logit_parity(tmp_path: Path, imported_llama, tied: bool) -> None:
    import transformers  # reference only

    torch.manual_seed(0)
    hf_cfg = transformers.LlamaConfig(
        vocab_size=imported_llama.config.vocab_size, hidden_size=64, intermediate_size=96,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, rope_theta=50000.0,
        rms_norm_eps=1e-5, max_position_embeddings=128, tie_word_embeddings=tied,
        bos_token_id=1, eos_token_id=2)
    ref = transformers.LlamaForCausalLM(hf_cfg).eval()
    src = tmp_path / "ckpt"
    ref.save_pretrained(src)
    (src / "tokenizer.json").write_bytes((imported_llama.dir / "tokenizer.json").read_bytes())
    (src / "tokenizer_config.json").write_text(
        json.dumps({"chat_template": imported_llama.component["chat_template"]}))

    comp = import_hf_llama(src, tmp_path / "out")
    assert comp["quantization"] == "none" and comp["kind"] == "llama"
    assert comp["chat_template"] == imported_llama.component["chat_template"]
    cfg = LlamaConfig.from_dict(comp["config"])
    assert (cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.rope_base, cfg.tie_embeddings) == (
        64, 4, 2, 50000.0, tied)
    ours = load_llama(tmp_path / "out" / comp["weights"], cfg, weight_format="float32",
                      compute_dtype=torch.float32)
    ids = torch.randint(0, cfg.vocab_size, (2, 23), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expect = ref(ids).logits
    assert (ours.forward_full(ids) - expect).abs().max().item() <= 1e-4
    ours.setup_caches(2, 23)
    assert (ours(ids, torch.arange(23).expand(2, 23)) - expect).abs().max().item() <= 1e-4
    # the dense checkpoint also serves as int8 / int4 (quantized at load)
    for fmt in ("int8", "int4", "bfloat16"):
        q = load_llama(tmp_path / "out" / comp["weights"], cfg, weight_format=fmt,
                       compute_dtype=torch.bfloat16)
        assert len(greedy_generate(q, ids[0].tolist(), 4, eos_id=None)) == 4


def test_hf_import_rejects_non_llama(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(HFImportError, match="not 'llama'"):
        import_hf_llama(tmp_path, tmp_path / "out")
