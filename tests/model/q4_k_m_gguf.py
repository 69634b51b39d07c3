"""Q4_K_M GGUF files made from the real SmolLM2 GGUF, for tests (no llama.cpp needed).

``write_q4_k_m`` reads the SmolLM2 Q4_1 file, dequantizes every tensor and re-encodes it with
``tests.model.kquant_writer`` in the types llama.cpp's ``llama-quantize ... Q4_K_M`` picks
(``llama_tensor_get_type`` in llama.cpp's ``src/llama-quant.cpp``):

* attn_q, attn_k, attn_output, ffn_gate, ffn_up: Q4_K;
* attn_v and ffn_down: Q6_K in the layers ``use_more_bits`` picks (14 of 30), else Q4_K;
* the tied token embedding (also the output): Q6_K; norms F32;
* a k-quant needs rows of a multiple of 256 weights: elsewhere llama.cpp falls back to Q5_0
  for Q4_K and Q8_0 for Q6_K (the output to Q8_0).

SmolLM2-135M is 576 wide, so in its own Q4_K_M file only ffn_down (1536 in) gets k-quants:
q/k/o/gate/up are Q5_0, attn_v Q8_0 or Q5_0, the embedding Q8_0 (``width=None``).
``width=768`` first widens the network to a multiple of 256 without changing its function,
so that every linear is a k-quant as in larger Llamas (q/k in Q4_K beside v in Q6_K, a Q6_K
LM head): the residual stream gets zero dimensions (zero columns in every matrix that reads
it, zero rows in every one that writes it), each group of 3 query heads sharing a KV head
gets a fourth with zero q rows and zero attn_output columns (12 heads of 64), and RMSNorm,
which now averages over 768 instead of 576, gets ``eps * 576/768`` and weights times
``sqrt(576/768)``, which is the same function.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from gguf import GGMLQuantizationType as Q
from gguf import GGUFReader, GGUFValueType, GGUFWriter
from gguf.quants import dequantize

from tests.model.kquant_writer import BLOCK_SIZE, encode

F32 = npt.NDArray[np.float32]

FTYPE_Q4_K_M = 15  # llama_ftype LLAMA_FTYPE_MOSTLY_Q4_K_M (general.file_type)
FALLBACK = {Q.Q4_K: Q.Q5_0, Q.Q6_K: Q.Q8_0}


def use_more_bits(i_layer: int, n_layers: int) -> bool:
    """llama.cpp's choice of layers that get Q6_K attn_v and ffn_down in Q4_K_M."""
    return (i_layer < n_layers // 8 or i_layer >= 7 * n_layers // 8
            or (i_layer - n_layers // 8) % 3 == 2)


def q4_k_m_type(name: str, in_features: int, n_layers: int) -> Q:
    """The GGUF type llama.cpp's Q4_K_M gives tensor ``name`` (a 2-D Llama weight of a model
    with a tied output, ``in_features`` per row)."""
    kind = name.split(".")[-2]
    if name == "token_embd.weight":  # the tied output: Q6_K, Q8_0 where rows do not fit
        return Q.Q6_K if in_features % 256 == 0 else Q.Q8_0
    qtype = Q.Q4_K
    if kind in ("attn_v", "ffn_down") and use_more_bits(int(name.split(".")[1]), n_layers):
        qtype = Q.Q6_K
    return qtype if in_features % BLOCK_SIZE[qtype] == 0 else FALLBACK[qtype]


def _pad(a: F32, rows: int, cols: int) -> F32:
    out = np.zeros((rows, cols), np.float32)
    out[:a.shape[0], :a.shape[1]] = a
    return out


def _spread_heads(a: F32, n_groups: int, per_group: int, head_dim: int, axis: int) -> F32:
    """Insert a zero head after every ``per_group`` heads along ``axis`` (q rows in GGUF's
    permuted order stay right: llama.cpp permutes within each head)."""
    moved = np.moveaxis(a, axis, 0)
    heads = moved.reshape(n_groups, per_group, head_dim, *moved.shape[1:])
    zero = np.zeros((n_groups, 1, *heads.shape[2:]), np.float32)
    out = np.concatenate([heads, zero], axis=1).reshape(-1, *moved.shape[1:])
    return np.ascontiguousarray(np.moveaxis(out, 0, axis))


def widen(name: str, w: F32, dim: int, width: int, n_heads: int, n_kv_heads: int) -> F32:
    """One SmolLM2 tensor (GGUF layout, dense) in the network widened to ``width`` with a
    zero query head added to each KV group (see the module docstring)."""
    kind = name.split(".")[-2] if name.count(".") > 1 else name.split(".")[0]
    head_dim, per = dim // n_heads, n_heads // n_kv_heads
    if w.ndim == 1:  # RMSNorm weights
        out = np.zeros(width, np.float32)
        out[:dim] = w * np.float32(math.sqrt(dim / width))
        return out
    if kind == "attn_q":
        w = _spread_heads(w, n_kv_heads, per, head_dim, axis=0)
    if kind == "attn_output":
        w = _spread_heads(w, n_kv_heads, per, head_dim, axis=1)
    rows, cols = w.shape
    if kind in ("attn_q", "attn_k", "attn_v", "ffn_gate", "ffn_up", "token_embd"):
        cols = width  # reads the residual stream
    if kind in ("attn_output", "ffn_down"):
        rows = width  # writes it
    return _pad(w, rows, cols)


def write_q4_k_m(src: Path, dst: Path, *, width: int | None = None) -> dict[str, Q]:
    """Write ``src`` (a Llama GGUF with a tied output) re-encoded as Q4_K_M to ``dst``, widened
    to ``width`` if given; every metadata key is copied (file type and, when widened, the
    shape keys updated). Returns each tensor's new type."""
    reader = GGUFReader(str(src))

    def meta(key: str) -> Any:
        return reader.fields[key].contents()

    dim, n_layers = int(meta("llama.embedding_length")), int(meta("llama.block_count"))
    n_heads, n_kv = int(meta("llama.attention.head_count")), int(meta("llama.attention.head_count_kv"))
    if any(t.name == "output.weight" for t in reader.tensors):
        raise ValueError(f"{src} has its own output.weight: only tied outputs are handled")
    overrides: dict[str, tuple[object, GGUFValueType]] = {
        "general.file_type": (FTYPE_Q4_K_M, GGUFValueType.UINT32)}
    if width is not None:  # one more query head per KV group: n_heads + n_kv heads
        if width % 256 or n_heads % n_kv or width != (n_heads + n_kv) * (dim // n_heads):
            raise ValueError(f"cannot widen {dim} to {width} with {n_heads + n_kv} heads of "
                             f"{dim // n_heads} ({n_kv} KV heads)")
        eps = float(meta("llama.attention.layer_norm_rms_epsilon"))
        overrides.update({
            "llama.embedding_length": (width, GGUFValueType.UINT32),
            "llama.attention.head_count": (n_heads + n_kv, GGUFValueType.UINT32),
            "llama.attention.layer_norm_rms_epsilon": (eps * dim / width, GGUFValueType.FLOAT32),
            "general.name": (f"{meta('general.name')} widened to {width}", GGUFValueType.STRING),
        })

    writer = GGUFWriter(str(dst), arch=str(meta("general.architecture")))
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name == "general.architecture":
            continue
        if field.name in overrides:
            value, vtype = overrides[field.name]
            writer.add_key_value(field.name, value, vtype)
            continue
        sub_type = field.types[-1] if field.types[0] == GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), field.types[0], sub_type=sub_type)

    types: dict[str, Q] = {}
    for t in reader.tensors:
        w = dequantize(np.asarray(t.data), t.tensor_type).astype(np.float32)
        if width is not None:
            w = widen(t.name, w, dim, width, n_heads, n_kv)
        if w.ndim == 1:
            types[t.name] = Q.F32
            writer.add_tensor(t.name, w)
            continue
        qtype = q4_k_m_type(t.name, w.shape[1], n_layers)
        types[t.name] = qtype
        writer.add_tensor(t.name, encode(w, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return types
