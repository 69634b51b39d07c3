"""A Q4_K_M Llama GGUF is served as it is: imported losslessly, multiplied in its stored
blocks by m4's kernels (w4a8, the fused decode step), close to its own float32 dequantization,
batch invariant, and it still knows the capital of France.

The files are SmolLM2 re-encoded by the test-side encoder as llama.cpp's Q4_K_M recipe does
(``tests.model.q4_k_m_gguf``; no llama.cpp here): at SmolLM2's own width 576, where only
ffn_down takes k-quants (Q5_0 and Q8_0 elsewhere, as llama.cpp falls back), and widened to
768 (the same function), where every linear does: q/k in Q4_K beside v in Q6_K, a Q6_K head.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf import GGUFReader
from gguf.quants import dequantize as gguf_dequantize
from m4d.builder.gguf_blocks import StoredQuant, dequantize, stored_kind
from m4d.builder.importers.gguf_llama import hf_tensor_name, unpermute_rows
from m4d.model.block_linear import BlockLinear
from m4d.model.llama import Llama, greedy_generate
from safetensors import safe_open

from tests.model.conftest import Q4KMLlama
from tests.model.q4_k_m_gguf import use_more_bits

N_LAYERS = 30
MORE_BITS = [use_more_bits(i, N_LAYERS) for i in range(N_LAYERS)]  # 14 of 30 layers
TYPE_COUNTS = {  # hand-counted from llama.cpp's rules (see tests.model.q4_k_m_gguf)
    None: {"F32": 61, "Q5_0": 150 + 16, "Q8_0": 14 + 1, "Q4_K": 16, "Q6_K": 14},
    768: {"F32": 61, "Q4_K": 150 + 16 + 16, "Q6_K": 14 + 14 + 1},
}
# GGUF type -> (stored kind, qweight dtype, scales dtype, weights per scale)
STORED = {Q.Q4_K: ("q4_1", "uint8", "float32", 32), Q.Q6_K: ("q8_0", "int8", "float32", 16),
          Q.Q5_0: ("q8_0", "int8", "float16", 32), Q.Q8_0: ("q8_0", "int8", "float16", 32)}
CHAT_CHECK = "What is the capital of France?"
MAX_MEAN_KL = 0.01
NEAR_TIE = 0.1  # nats below float32's top choice


def expected_kinds(width: int | None, layer: int) -> dict[str, str]:
    """The BlockLinear kind of each fused linear of a layer: a mixed q/k/v (Q4_K beside Q6_K)
    is one unsigned-byte linear with a scale and min per 16."""
    more = MORE_BITS[layer]
    w2 = "q8_f32_g16" if more else "q4_f32"
    if width is None:  # Q5_0 in 5 bits; beside Q8_0 (v in the layers with more bits) in bytes
        return {"wqkv": "q8_f16" if more else "q5_f16", "wo": "q5_f16", "w13": "q5_f16", "w2": w2}
    return {"wqkv": "q8u_f32_g16" if more else "q4_f32", "wo": "q4_f32", "w13": "q4_f32",
            "w2": w2}


@pytest.fixture(scope="module")
def served(q4_k_m: Q4KMLlama) -> Llama:
    """The model as m4d serves it: w4a8, float32 activations, a bfloat16 KV cache."""
    model = q4_k_m.imported.load("w4a8", torch.float32)
    model.setup_caches(4, 128, torch.bfloat16)
    return model


@pytest.fixture(scope="module")
def reference(q4_k_m: Q4KMLlama) -> Llama:
    """The same file dequantized to float32."""
    return q4_k_m.imported.load("float32", torch.float32)


def test_file_follows_the_q4_k_m_recipe(q4_k_m: Q4KMLlama, gguf_path) -> None:
    print(f"wrote {q4_k_m.gguf.name} ({q4_k_m.gguf.stat().st_size / 1e6:.1f} MB) in "
          f"{q4_k_m.seconds:.1f} s")
    assert q4_k_m.seconds < 60
    reader, source = GGUFReader(str(q4_k_m.gguf)), GGUFReader(str(gguf_path))
    assert Counter(t.tensor_type.name for t in reader.tensors) == TYPE_COUNTS[q4_k_m.width]
    assert {t.name: t.tensor_type for t in reader.tensors} == q4_k_m.types
    for i in range(N_LAYERS):
        v, down = q4_k_m.types[f"blk.{i}.attn_v.weight"], q4_k_m.types[f"blk.{i}.ffn_down.weight"]
        assert down == (Q.Q6_K if MORE_BITS[i] else Q.Q4_K)
        assert v == (Q.Q6_K if MORE_BITS[i] else Q.Q4_K) if q4_k_m.width else (
            Q.Q8_0 if MORE_BITS[i] else Q.Q5_0)
    changed = {"general.file_type": 15}
    if q4_k_m.width:
        changed.update({"llama.embedding_length": 768, "llama.attention.head_count": 12,
                        "llama.attention.layer_norm_rms_epsilon": np.float32(1e-5 * 576 / 768),
                        "general.name": "Smollm2 135M 8k Lc100K Mix1 Ep2 widened to 768"})
    assert set(reader.fields) == set(source.fields)
    for name, field in source.fields.items():  # tokenizer, chat template, hyper-parameters
        new = reader.fields[name]
        if name in changed:
            assert new.contents() == changed[name] and new.types == field.types, name
        elif not name.startswith("GGUF."):
            assert [p.tobytes() for p in new.parts] == [p.tobytes() for p in field.parts], name
    cfg = q4_k_m.imported.config
    assert (cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim) == (
        (768, 12, 3, 64) if q4_k_m.width else (576, 9, 3, 64))
    assert q4_k_m.imported.component["quantization"] == "mixed"


def test_import_keeps_each_block_type_exactly(q4_k_m: Q4KMLlama) -> None:
    """Q4_K -> 4-bit with float32 scale and min per 32, Q6_K -> int8 with a float32 scale per
    16, Q5_0 / Q8_0 -> int8 with an fp16 scale per 32: each decodes to gguf's dequantization
    (q/k rows unpermuted), bit for bit. Every tensor of five layers (both recipes' kinds of
    layer) and the embedding."""
    cfg = q4_k_m.imported.config
    layers = {f"blk.{i}." for i in (0, 3, 4, 5, 29)}
    seen: Counter[str] = Counter()
    with safe_open(str(q4_k_m.imported.weights), framework="np") as f:
        keys = set(f.keys())
        for t in GGUFReader(str(q4_k_m.gguf)).tensors:
            if not (t.name == "token_embd.weight" or t.name[:6] in layers or t.name[:7] in layers):
                continue
            name = hf_tensor_name(t.name)
            ref = gguf_dequantize(np.asarray(t.data), t.tensor_type)
            if t.tensor_type == Q.F32:
                assert np.array_equal(f.get_tensor(name), ref)
                continue
            kind, qdtype, sdtype, group = STORED[t.tensor_type]
            mins = f.get_tensor(f"{name}.mins") if f"{name}.mins" in keys else None
            stored = StoredQuant(kind, f.get_tensor(f"{name}.qweight"),
                                 f.get_tensor(f"{name}.scales"), mins)
            assert stored_kind(stored.qweight.dtype, stored.qweight.shape, stored.scales.shape,
                               mins is not None) == kind
            assert (str(stored.qweight.dtype), str(stored.scales.dtype), stored.group) == (
                qdtype, sdtype, group), t.name
            heads = (cfg.n_heads if "attn_q." in t.name
                     else cfg.n_kv_heads if "attn_k." in t.name else 0)
            assert np.array_equal(dequantize(stored), unpermute_rows(ref, heads) if heads else ref)
            seen[t.tensor_type.name] += 1
    assert set(seen) == {q.name for q in q4_k_m.types.values()} - {"F32"}


def test_every_linear_runs_its_stored_blocks(q4_k_m: Q4KMLlama, served: Llama) -> None:
    """No ConcatLinear and no requantizing: each fused linear is one BlockLinear over the
    stored blocks, the tied head too, and the decode step is one m4.decode_layers call."""
    for i, block in enumerate(served.blocks):
        linears = {"wqkv": block.attention.wqkv, "wo": block.attention.wo,
                   "w13": block.feed_forward.w13, "w2": block.feed_forward.w2}
        assert all(isinstance(lin, BlockLinear) for lin in linears.values()), (i, linears)
        assert {k: lin.kind for k, lin in linears.items()} == expected_kinds(q4_k_m.width, i), i
    assert isinstance(served.output, BlockLinear)
    assert served.output.kind == ("q8_f32_g16" if q4_k_m.width else "q8_f16")  # Q6_K, Q8_0
    assert served.fused


def test_answers_as_its_float32_dequantization_does(
        q4_k_m: Q4KMLlama, served: Llama, reference: Llama) -> None:
    """Greedy chat answer through the served path (prefill, then the fused decode step): each
    token is the float32 model's choice (or within NEAR_TIE of it), and the KL of the next-token
    distributions from the float32 model's is small at every position.

    "Paris" only from the widened file: at width 576 the Q5_0 fallback re-quantizes SmolLM2's
    Q4_1 weights a second time, which moves the model itself (its float32 dequantization gives
    the same wrong answer; mean KL from the Q4_1 source 0.06, against 0.03 widened)."""
    im = q4_k_m.imported
    prompt = im.tokenizer.encode(im.chat.render([{"role": "user", "content": CHAT_CHECK}]))
    n = len(prompt)
    served.setup_caches(1, 128, torch.bfloat16)
    logits = [served(torch.tensor([prompt]), torch.arange(n)[None])[0]]  # [n, V]
    seq = list(prompt)
    nxt = int(logits[-1][-1].argmax())
    while nxt != im.config.eos_id and len(seq) < n + 24:
        seq.append(nxt)
        logits.append(served(torch.tensor([[nxt]]), torch.tensor([[len(seq) - 1]]))[0])  # [1, V]
        nxt = int(logits[-1][-1].argmax())
    ours = torch.cat(logits).log_softmax(-1)  # [L, V]
    ref = reference.forward_full(torch.tensor([seq]))[0].log_softmax(-1)  # [L, V]
    kl = (ref.exp() * (ref - ours)).sum(-1)  # [L]
    chosen = ref[n - 1:-1].gather(1, torch.tensor(seq[n:])[:, None])[:, 0]  # [L - n]
    gaps = ref[n - 1:-1].max(-1).values - chosen  # 0 where float32 agrees
    answer = im.tokenizer.decode(seq[n:])
    ref_answer = im.tokenizer.decode(greedy_generate(reference, prompt, 24, im.config.eos_id))
    print(f"{q4_k_m.gguf.name}: {answer!r} (float32: {ref_answer!r}); mean KL prefill "
          f"{kl[:n].mean():.6f}, decode {kl[n:].mean():.6f}, max {kl.max():.5f}; "
          f"{int((gaps > 0).sum())} of {len(gaps)} tokens not float32's first choice")
    assert kl[:n].mean().item() < MAX_MEAN_KL and kl[n:].mean().item() < MAX_MEAN_KL
    assert len(gaps) >= 4 and gaps.max().item() <= NEAR_TIE, gaps
    if q4_k_m.width:
        assert "Paris" in answer


def test_decode_batch_gives_each_sequence_the_logits_it_gets_alone(
        q4_k_m: Q4KMLlama, served: Llama) -> None:
    tok = q4_k_m.imported.tokenizer
    prompts = [tok.encode(t) for t in ["Paris is the capital of", "def fibonacci(n):\n    ",
                                       "The three primary colours are red, yellow and"]]
    rows = [3, 1, 2]
    served.setup_caches(4, 64, torch.bfloat16)
    assert served.fused

    def prefill(ids: list[int], row: int) -> torch.Tensor:  # -> [V], the last position's
        return served(torch.tensor([ids]), torch.arange(len(ids))[None], rows=torch.tensor([row]),
                      last_only=True)[0, -1]

    fed: list[list[int]] = [[int(prefill(p, r).argmax())] for p, r in zip(prompts, rows, strict=True)]
    batched = []  # per step [3, V]
    for step in range(6):
        logits = served(torch.tensor([[f[step]] for f in fed]),
                        torch.tensor([[len(p) + step] for p in prompts]), rows=torch.tensor(rows))
        batched.append(logits[:, 0])
        for f, row_logits in zip(fed, logits[:, 0], strict=True):
            f.append(int(row_logits.argmax()))
    for i, p in enumerate(prompts):
        prefill(p, 0)
        for step in range(6):
            alone = served(torch.tensor([[fed[i][step]]]), torch.tensor([[len(p) + step]]),
                           rows=torch.tensor([0]))[0, 0]
            assert torch.equal(alone, batched[step][i]), (
                f"prompt {i} step {step}: {(alone - batched[step][i]).abs().max().item()}")
