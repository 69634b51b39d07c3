"""KV-cache semantics of the M4 decoder: slot rows, per-row positions, chunked prefill.

Uses the real SmolLM2 weights in float32 (session fixture), plus one shape/masking test on a
tiny network with random weights (named as such; it is not a model).
"""

from __future__ import annotations

import pytest
import torch
from m4d.executor.cpu import has_bf16_arithmetic
from m4d.model import kernels
from m4d.model.llama import Llama, LlamaConfig, greedy_generate
from m4d.model.quant import (
    INT8_GEMM_TOLERANCE,
    Int8GemmError,
    int8_gemm_error,
    onednn_int8_available,
)

# float32 logits of magnitude up to ~30: GEMMs of different shapes (one shot, chunks, one row)
# sum in different orders, which moves them by a few float32 ulps (1e-4 was exceeded by 1e-6 on
# one CPU). 3e-4 is ~1e-5 relative: a real cache bug moves logits by whole units.
TOL = 3e-4


def _prompts(tok) -> list[list[int]]:
    texts = ["Paris is the capital of", "The three primary colours are red, yellow and",
             "def fibonacci(n):\n    "]
    return [tok.encode(t) for t in texts]


def _prefill(model: Llama, ids: list[int], row: int) -> torch.Tensor:
    logits = model(torch.tensor([ids]), torch.arange(len(ids))[None], rows=torch.tensor([row]),
                   last_only=True)
    return logits[0, -1]  # [V]


def test_batched_decode_in_scattered_rows_matches_single_runs(imported_llama, llama_fp32: Llama) -> None:
    model = llama_fp32
    prompts = _prompts(imported_llama.tokenizer)
    assert len({len(p) for p in prompts}) == 3  # different positions
    rows = [2, 0, 5]
    model.setup_caches(6, 64)
    # garbage in unrelated rows and beyond each prompt must not leak into attention
    model(torch.full((1, 40), 17), torch.arange(40)[None], rows=torch.tensor([1]))
    for row in rows:
        model(torch.full((1, 40), 99), torch.arange(40)[None], rows=torch.tensor([row]))
    seqs = [list(p) for p in prompts]
    nxt = []
    for p, r in zip(prompts, rows, strict=True):
        nxt.append(int(_prefill(model, p, r).argmax()))
    for _step in range(3):
        tokens = torch.tensor([[t] for t in nxt])
        pos = torch.tensor([[len(s)] for s in seqs])
        batched = model(tokens, pos, rows=torch.tensor(rows))  # [3, 1, V]
        for i, s in enumerate(seqs):
            s.append(nxt[i])
            alone = model.forward_full(torch.tensor([s]))[0, -1]
            assert (batched[i, 0] - alone).abs().max().item() <= TOL
        nxt = [int(batched[i, 0].argmax()) for i in range(3)]


def test_batched_decode_compact_rows_fast_path(imported_llama, llama_fp32: Llama) -> None:
    model = llama_fp32
    prompts = _prompts(imported_llama.tokenizer)
    model.setup_caches(4, 64)
    first = [int(_prefill(model, p, r).argmax()) for r, p in enumerate(prompts)]
    tokens = torch.tensor([[t] for t in first])
    pos = torch.tensor([[len(p)] for p in prompts])
    fast = model(tokens, pos)  # rows=None: cache rows 0..2 as a view
    for i, p in enumerate(prompts):
        alone = model.forward_full(torch.tensor([[*p, first[i]]]))[0, -1]
        assert (fast[i, 0] - alone).abs().max().item() <= TOL


def test_chunked_prefill_equals_one_shot(imported_llama, llama_fp32: Llama) -> None:
    model = llama_fp32
    ids = imported_llama.tokenizer.encode(imported_llama.chat.render(
        [{"role": "user", "content": "Name three rivers in Europe and their lengths."}]))
    n = len(ids)
    model.setup_caches(2, n + 8)
    one = model(torch.tensor([ids]), torch.arange(n)[None], rows=torch.tensor([0]))  # [1, n, V]
    chunks = []
    for start in range(0, n, 7):
        part = ids[start:start + 7]
        chunks.append(model(torch.tensor([part]), torch.arange(start, start + len(part))[None],
                            rows=torch.tensor([1])))
    chunked = torch.cat(chunks, dim=1)
    assert chunked.shape == one.shape == (1, n, imported_llama.config.vocab_size)
    assert (chunked - one).abs().max().item() <= TOL
    # and the caches they left behind continue identically
    tok = int(one[0, -1].argmax())
    a = model(torch.tensor([[tok]]), torch.tensor([[n]]), rows=torch.tensor([0]))
    b = model(torch.tensor([[tok]]), torch.tensor([[n]]), rows=torch.tensor([1]))
    assert (a - b).abs().max().item() <= TOL


def test_forward_full_equals_cached_forward(imported_llama, llama_fp32: Llama) -> None:
    ids = imported_llama.tokenizer.encode("Once upon a time, in a land far away, there lived")
    model = llama_fp32
    model.setup_caches(1, len(ids))
    cached = model(torch.tensor([ids]), torch.arange(len(ids))[None])
    full = model.forward_full(torch.tensor([ids]))
    last = model(torch.tensor([ids]), torch.arange(len(ids))[None], last_only=True)
    assert (cached - full).abs().max().item() <= TOL
    assert last.shape == (1, 1, imported_llama.config.vocab_size)
    assert (last[0, 0] - full[0, -1]).abs().max().item() <= TOL
    assert cached.dtype == torch.float32


def test_greedy_generate_matches_forward_full_argmax(imported_llama, llama_fp32: Llama) -> None:
    ids = imported_llama.tokenizer.encode("The largest planet in the solar system is")
    out = greedy_generate(llama_fp32, ids, 8, eos_id=None)
    seq = list(ids)
    for _ in range(8):
        seq.append(int(llama_fp32.forward_full(torch.tensor([seq]))[0, -1].argmax()))
    assert out == seq[len(ids):]


def _random_tiny_network() -> Llama:
    """Random weights, NOT a model: only for shapes, masking and error paths."""
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=48,
                      max_seq_len=32)
    net = Llama(cfg)
    for p in net.parameters():
        torch.nn.init.normal_(p, std=0.2)
    net.output.weight = net.tok_embeddings.weight
    net.init_rope()
    return net.eval()


def test_random_tiny_network_shapes_mask_and_errors() -> None:
    net = _random_tiny_network()
    assert net.config.head_dim == 8
    with pytest.raises(RuntimeError, match="setup_caches"):
        net(torch.zeros(1, 1, dtype=torch.long), torch.zeros(1, 1, dtype=torch.long))
    net.setup_caches(3, 16)
    assert net.layers[0].attention.kv_cache.k.shape == (3, 2, 16, 8)
    toks = torch.randint(0, 64, (1, 10))
    full = net.forward_full(toks)
    assert full.shape == (1, 10, 64) and full.dtype == torch.float32
    # a future token written first must not change earlier positions' outputs
    net(toks[:, 5:], torch.arange(5, 10)[None], rows=torch.tensor([2]))
    early = net(toks[:, :5], torch.arange(5)[None], rows=torch.tensor([2]))
    assert (early - full[:, :5]).abs().max().item() <= 1e-5
    with pytest.raises(ValueError, match="positions"):
        net(toks[:, :1], torch.tensor([[16]]))
    with pytest.raises(ValueError, match="exceeds"):
        net(torch.zeros(4, 1, dtype=torch.long), torch.zeros(4, 1, dtype=torch.long))
    cfg = LlamaConfig.from_dict(net.config.to_dict())
    assert cfg == net.config


def test_random_tiny_network_bf16_decode_path_matches_full_forward() -> None:
    """The bf16 single-query attention path (fp32 math) against SDPA in forward_full."""
    net = _random_tiny_network().to(torch.bfloat16)
    net.init_rope()
    net.setup_caches(3, 16)
    g = torch.Generator().manual_seed(5)
    seqs = [torch.randint(0, 64, (1, n), generator=g) for n in (6, 3, 9)]
    rows = [2, 0, 1]
    for s, r in zip(seqs, rows, strict=True):
        net(s[:, :-1], torch.arange(s.shape[1] - 1)[None], rows=torch.tensor([r]))
    tokens = torch.cat([s[:, -1:] for s in seqs])  # [3, 1]
    pos = torch.tensor([[s.shape[1] - 1] for s in seqs])
    step = net(tokens, pos, rows=torch.tensor(rows))  # [3, 1, V]
    for i, s in enumerate(seqs):
        full = net.forward_full(s)[0, -1]
        assert (step[i, 0] - full).abs().max().item() <= 0.05 * full.abs().max().item()


@pytest.mark.parametrize("weight_format,dtype,variant", [
    *(("w4a8", torch.float32, v) for v in kernels.runnable_variants()),  # every variant here
    ("w4a8", torch.bfloat16, ""), ("w8a8", torch.bfloat16, ""),
    # torch's int4 kernel is batch invariant only where the CPU multiplies bf16 itself; on
    # others (this may be one) it emulates bf16 and its blocking follows the batch size
    pytest.param("int4", torch.bfloat16, "", marks=pytest.mark.skipif(
        not has_bf16_arithmetic(), reason="torch's int4 kernel emulates bf16 on this CPU and is "
        "not batch invariant; m4d serves w4a8 here"))])
def test_decode_batch_gives_each_sequence_the_logits_it_gets_alone(imported_llama, weight_format: str,
                                                                   dtype: torch.dtype, variant: str) -> None:
    """Continuous batching's premise, bit for bit: in the serving formats a sequence's logits
    do not depend on how many other sequences share the step, or on their rows. (w4a8 in
    float32, as m4d serves it, decodes through the fused m4.decode_layers, on each kernel
    variant this CPU runs.)"""
    if weight_format == "w8a8" and not _int8_gemm_exact():
        # a CPU whose int8 GEMMs saturate (no VNNI): w8a8 is refused, never served wrong
        with pytest.raises(Int8GemmError, match="w8a8"):
            imported_llama.load(weight_format, dtype)
        return
    before = kernels.variant()
    kernels.select(variant or "auto")
    try:
        _check_batch_invariance(imported_llama, weight_format, dtype)
    finally:
        kernels.select(before)


def test_every_kernel_variant_serves_the_same_numbers(imported_llama) -> None:
    """The served path (w4a8 in float32: block GEMMs in prefill, the fused decode step) on
    each kernel variant this CPU runs: the self-test's greedy tokens and every logit of a
    batched decode are bit-identical to the scalar reference's."""
    model = imported_llama.load("w4a8", torch.float32)
    tok = imported_llama.tokenizer
    prompts = [tok.encode(t) for t in ["The capital of Japan is", "Water boils at", "1, 2, 3, 5, 8,"]]
    variants = kernels.runnable_variants()
    assert ("scalar" in variants and len(variants) >= 2) or kernels.arch() not in ("x86_64", "aarch64")
    before = kernels.variant()
    results = {}
    try:
        for v in variants:
            kernels.select(v)
            model.setup_caches(4, 64, torch.bfloat16)
            assert model.fused
            greedy = greedy_generate(model, prompts[0], 12, None)
            model.setup_caches(4, 64, torch.bfloat16)
            nxt = [int(_prefill(model, p, r).argmax()) for r, p in enumerate(prompts)]
            pos = [len(p) for p in prompts]
            steps = []
            for _ in range(4):
                logits = model(torch.tensor([[t] for t in nxt]), torch.tensor([[q] for q in pos]),
                               rows=torch.tensor([0, 1, 2]))[:, 0]
                steps.append(logits)
                nxt, pos = [int(t) for t in logits.argmax(-1)], [q + 1 for q in pos]
            results[v] = (greedy, steps)
    finally:
        kernels.select(before)
    ref_tokens, ref_steps = results["scalar"]
    for v, (tokens, steps) in results.items():
        assert tokens == ref_tokens, f"{v}: greedy tokens differ from the scalar reference's"
        for i, (a, b) in enumerate(zip(steps, ref_steps, strict=True)):
            assert torch.equal(a, b), f"{v} step {i}: {(a - b).abs().max().item()}"


def _int8_gemm_exact() -> bool:
    """Whether either w8a8 GEMM path sums exactly on this CPU (m4d.model.quant's own check)."""
    return any(int8_gemm_error(packed) <= INT8_GEMM_TOLERANCE
               for packed in ((True, False) if onednn_int8_available() else (False,)))


def _check_batch_invariance(imported_llama, weight_format: str, dtype: torch.dtype) -> None:
    model = imported_llama.load(weight_format, dtype)
    model.setup_caches(1, 64, torch.bfloat16)
    assert model.fused == (weight_format == "w4a8" and dtype == torch.float32)
    # one call per step either way: m4.decode_layers (fused), else the TorchScript'd stack
    assert model.scripted != model.fused, "the layers must run as one call"
    tok = imported_llama.tokenizer
    texts = ["Paris is the capital of", "The three primary colours are red, yellow and",
             "def fibonacci(n):\n    ", "Once upon a time, in a small village by the sea,",
             "Water boils at", "My favourite book is", "1, 2, 3, 5, 8,",
             "The best way to learn a language is", "In 1969, humans first"]
    prompts = [tok.encode(t) for t in texts]
    n = len(prompts)
    model.setup_caches(2 * n, 96, torch.bfloat16)

    def greedy_run(rows: list[int], steps: int = 6) -> list[list[torch.Tensor]]:
        """Prefill each prompt in its row, then decode all together; logits per step."""
        nxt, seqs = [], [list(p) for p in prompts]
        for p, r in zip(prompts, rows, strict=True):
            nxt.append(int(_prefill(model, p, r).argmax()))
        out: list[list[torch.Tensor]] = [[] for _ in prompts]
        for _ in range(steps):
            logits = model(torch.tensor([[t] for t in nxt]),
                           torch.tensor([[len(s)] for s in seqs]), rows=torch.tensor(rows))
            for i, s in enumerate(seqs):
                s.append(nxt[i])
                out[i].append(logits[i, 0])
            nxt = [int(logits[i, 0].argmax()) for i in range(n)]
        return out

    batched = greedy_run([2 * i + 1 for i in range(n)])  # scattered rows, all nine at once
    for i, p in enumerate(prompts):
        seq, alone = list(p), []
        logits = _prefill(model, p, 0)
        for _ in range(6):
            seq.append(int(logits.argmax()))
            logits = model(torch.tensor([[seq[-1]]]), torch.tensor([[len(seq) - 1]]),
                           rows=torch.tensor([0]))[0, 0]
            alone.append(logits)
        for step, (a, b) in enumerate(zip(alone, batched[i], strict=True)):
            assert torch.equal(a, b), f"{texts[i]!r} step {step}: {(a - b).abs().max().item()}"


def test_fused_decode_step_computes_what_the_layers_compute(imported_llama) -> None:
    """m4.decode_layers (one call for the whole w4a8 decode step) against the same model's
    layer-by-layer TorchScript step: same next tokens, logits within float32 reordering,
    and the KV rows it writes are read back by the following steps alike."""
    model = imported_llama.load("w4a8", torch.float32)
    tok = imported_llama.tokenizer
    prompts = [tok.encode(t) for t in ["Paris is the capital of", "Water boils at",
                                       "The three primary colours are red, yellow and"]]
    rows = [4, 1, 2]

    def run(fused: bool) -> list[torch.Tensor]:
        model.fuse_decode = fused
        model.setup_caches(5, 96, torch.bfloat16)
        assert model.fused == fused
        nxt = [int(_prefill(model, p, r).argmax()) for p, r in zip(prompts, rows, strict=True)]
        pos = [len(p) for p in prompts]
        steps = []
        for _ in range(8):
            logits = model(torch.tensor([[t] for t in nxt]), torch.tensor([[p] for p in pos]),
                           rows=torch.tensor(rows))[:, 0]
            steps.append(logits.log_softmax(-1))
            nxt = [int(t) for t in logits.argmax(-1)]
            pos = [p + 1 for p in pos]
        return steps

    fused, layered = run(True), run(False)
    for i, (f, g) in enumerate(zip(fused, layered, strict=True)):
        assert torch.equal(f.argmax(-1), g.argmax(-1)), f"step {i}: next tokens differ"
        kl = (g.exp() * (g - f)).sum(-1).max().item()
        assert kl < 1e-4, f"step {i}: KL {kl}"
