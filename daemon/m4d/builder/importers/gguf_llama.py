"""GGUF (llama.cpp) Llama checkpoint -> M4 firmware-image component (image-build stage).

Writes ``model.safetensors`` and ``tokenizer.json`` into ``out_dir`` and returns the component
description for the image manifest. Tensors get Hugging Face names; quantized tensors are kept
losslessly, never requantized, as ``X.qweight``, ``X.scales`` and (two kinds) ``X.mins``
(codecs and exact layouts in ``m4d.builder.gguf_blocks``):

* kind ``q4_1``: qweight uint8 [N, K/2] (byte i = element 2i low nibble | 2i+1 high),
  scales and mins [N, K/32]; w = q * scale + min. From Q4_1 (fp16 d, m), Q4_0 (fp16 d, -8 d)
  and Q4_K (float32 d*sc, -dmin*m per sub-block of 32).
* kind ``q8_0``: qweight int8 [N, K], scales [N, K/32] or [N, K/16]; w = q * scale. From Q8_0
  (fp16 d), Q5_0 (q - 16, fp16 d) and Q6_K (q - 32, float32 d*sc per 16).
* kind ``q8_1``: qweight uint8 [N, K] (0..31), float32 scales and mins [N, K/32];
  w = q * scale + min. From Q5_K.
* F32/F16/BF16 ``X`` -> ``X`` dense as stored (F16 widened to float32).

Any other GGUF type is a ``GGUFImportError``. llama.cpp permutes the rows of
``attn_q``/``attn_k`` for its RoPE; the permutation is undone here on qweight, scales and mins
alike (whole rows move, so quantized blocks stay exact), giving HF ``rotate_half`` layout.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from m4image.fsutil import atomic_file
from safetensors.torch import save_file

from m4d.builder.gguf_blocks import NIBBLE_ORDER, SPLITTERS, split_blocks
from m4d.builder.importers.common import Progress
from m4d.model.llama import LlamaConfig
from m4d.prepare.tokenizer import tokenizer_from_gguf

log = logging.getLogger(__name__)

_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


class GGUFImportError(ValueError):
    """The GGUF file is not a Llama checkpoint this importer can convert."""


def hf_tensor_name(gguf_name: str) -> str:
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    parts = gguf_name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[2] in _LAYER_NAMES:
        return f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}.{parts[3]}"
    raise GGUFImportError(f"unexpected GGUF tensor {gguf_name!r}: not a Llama tensor")


def unpermute_rows(a: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation on any [N, ...] row-major array."""
    rows = a.shape[0]
    head_dim = rows // n_head
    out = a.reshape(n_head, head_dim // 2, 2, *a.shape[1:]).swapaxes(1, 2)
    return np.ascontiguousarray(out.reshape(a.shape))


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def config_from_gguf(reader: Any) -> LlamaConfig:
    def get(key: str, default: Any = None) -> Any:
        f = reader.fields.get(key)
        if f is None:
            if default is None:
                raise GGUFImportError(f"GGUF metadata lacks {key!r}")
            return default
        return f.contents()

    arch = get("general.architecture")
    if arch != "llama":
        raise GGUFImportError(f"architecture {arch!r} is not 'llama'")
    n_heads = int(get("llama.attention.head_count"))
    dim = int(get("llama.embedding_length"))
    rope_dim = int(get("llama.rope.dimension_count", dim // n_heads))
    if rope_dim != dim // n_heads:
        raise GGUFImportError(f"partial rotary ({rope_dim} of {dim // n_heads}) is not supported")
    tensors = {t.name for t in reader.tensors}
    vocab = get("llama.vocab_size", len(get("tokenizer.ggml.tokens")))
    return LlamaConfig(
        vocab_size=int(vocab),
        dim=dim,
        n_layers=int(get("llama.block_count")),
        n_heads=n_heads,
        n_kv_heads=int(get("llama.attention.head_count_kv", n_heads)),
        ffn_dim=int(get("llama.feed_forward_length")),
        rope_base=float(f"{float(get('llama.rope.freq_base', 10000.0)):.7g}"),
        norm_eps=float(f"{float(get('llama.attention.layer_norm_rms_epsilon')):.7g}"),
        max_seq_len=int(get("llama.context_length")),
        tie_embeddings="output.weight" not in tensors,
        bos_id=int(get("tokenizer.ggml.bos_token_id")) if "tokenizer.ggml.bos_token_id" in reader.fields else None,
        eos_id=int(get("tokenizer.ggml.eos_token_id")) if "tokenizer.ggml.eos_token_id" in reader.fields else None,
    )


def _convert_tensor(t: Any, hf_name: str, cfg: LlamaConfig) -> dict[str, torch.Tensor]:
    """One GGUF tensor -> the stored tensors (see module docstring)."""
    from gguf import GGMLQuantizationType as Q

    n_perm = cfg.n_heads if hf_name.endswith("q_proj.weight") else (
        cfg.n_kv_heads if hf_name.endswith("k_proj.weight") else 0)

    def rows(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(unpermute_rows(a, n_perm) if n_perm else np.ascontiguousarray(a))

    data = np.asarray(t.data)
    if int(t.tensor_type) in SPLITTERS:
        stored = split_blocks(t.tensor_type, data)
        return {key: rows(a) for key, a in stored.tensors(hf_name).items()}
    if t.tensor_type in (Q.F32, Q.F16):
        return {hf_name: rows(data.astype(np.float32))}
    if t.tensor_type == Q.BF16:
        return {hf_name: rows(data).view(torch.bfloat16)}
    raise GGUFImportError(f"tensor {t.name!r} has unsupported type {t.tensor_type.name}")


def write_safetensors_atomic(tensors: dict[str, torch.Tensor], path: Path,
                             metadata: dict[str, str]) -> None:
    """Write to a temp file beside `path` (mode 0644: the daemon's user must read it; save_file
    alone makes 0600), fsync, rename, fsync the directory."""
    with atomic_file(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


def import_gguf_llama(gguf_path: Path, out_dir: Path, progress: Progress | None = None) -> dict[str, Any]:
    """Convert ``gguf_path`` into ``out_dir``; return the manifest component description."""
    import gguf

    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    if not gguf_path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {gguf_path}")
    out_dir.mkdir(parents=True, exist_ok=True)
    report: Progress = progress or (lambda stage, done, total: None)

    reader = gguf.GGUFReader(str(gguf_path))
    cfg = config_from_gguf(reader)
    template = reader.fields.get("tokenizer.chat_template")
    if template is None:
        raise GGUFImportError("GGUF metadata has no tokenizer.chat_template")

    tensors: dict[str, torch.Tensor] = {}
    total = len(reader.tensors)
    quant_types: set[str] = set()
    for i, t in enumerate(reader.tensors):
        hf_name = hf_tensor_name(t.name)
        tensors.update(_convert_tensor(t, hf_name, cfg))
        if len(t.shape) == 2:
            quant_types.add(t.tensor_type.name)
        report("tensors", i + 1, total)
    for needed in ("model.embed_tokens.weight", "model.norm.weight"):
        if not any(k == needed or k.startswith(needed + ".") for k in tensors):
            raise GGUFImportError(f"GGUF lacks {needed}")

    report("write", 0, 1)
    # One metadata key: safetensors writes several in hash order, which would change the
    # file's bytes (and so the image digest) from one build to the next.
    write_safetensors_atomic(tensors, out_dir / "model.safetensors",
                             {"format": f"m4-llama; int4 nibble order: {NIBBLE_ORDER}"})
    report("write", 1, 1)

    report("tokenizer", 0, 1)
    tok = tokenizer_from_gguf(reader)
    tmp = out_dir / ".tokenizer.json.tmp"
    tok.save(str(tmp))
    os.replace(tmp, out_dir / "tokenizer.json")
    report("tokenizer", 1, 1)

    report("sha256", 0, 1)
    digest = sha256_file(gguf_path)
    report("sha256", 1, 1)
    linear_types = quant_types - {"Q8_0"}  # the embedding is Q8_0 in llama.cpp's Q4_1 files
    quantization = linear_types.pop().lower() if len(linear_types) == 1 else "mixed"
    log.info("imported %s: %d tensors, %s", gguf_path.name, total, quantization)
    return {
        "kind": "llama",
        "config": cfg.to_dict(),
        "weights": "model.safetensors",
        "tokenizer": "tokenizer.json",
        "chat_template": str(template.contents()),
        "quantization": quantization,
        "source": {"file": gguf_path.name, "sha256": digest},
    }
