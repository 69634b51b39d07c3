"""Per-row LoRA adapters in m4's fused decode step (``m4.decode_layers``'s ``lora`` and
``adapters``), as Punica's BGMV: the base GEMMs shared by the batch, each row adding its own
adapter's ``(u @ A^T) @ B^T`` to every linear it touches.

What must hold, on every variant this CPU runs: rows without an adapter (and calls without
adapters) give exactly the bits of the op without them; every variant gives the scalar
reference's bits with adapters; the numbers are those of a float32 torch reference of the
layers with the delta added right after each base linear (before RoPE and the KV write,
before SiLU, before the residuals); bad adapter arguments raise instead of reading out of
bounds.

Adapters come in two dtypes and may carry their B^T's row spans: a bfloat16 pair gives exactly
the bits of the float32 pair holding its values widened (on every variant, beside float32
adapters in the same call), and spans (a fused linear's parts, zero outside their slice of the
output) skip only zeros: the bits of the same matrices without them.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import torch
from m4d.adapters.lora import Lora, LoraPair, decode_tensors, llama_sizes
from m4d.model import kernels
from m4d.model.block_linear import BlockLinear
from m4d.model.llama import apply_rope, rope_tables

from tests.model.test_kernel_variants import _kind_inputs

assert kernels.load(), "the m4 kernels did not build or load: run 'python -m m4d.model.kernels build'"

D, H, HKV, DH, FFN, SLOTS, T = 128, 4, 2, 32, 96, 10, 48
Q, KV = H * DH, HKV * DH
LINEARS = kernels.LORA_LINEARS  # the lora list's order within a layer: qkv, o, w13, w2
K_IN = {"qkv": D, "o": Q, "w13": D, "w2": FFN}
N_OUT = {"qkv": Q + 2 * KV, "o": D, "w13": 2 * FFN, "w2": D}
KINDS = {"qkv": "q4_f16", "o": "q8_f32_g16", "w13": "q4_f32", "w2": "q8u_f32"}
EPS, SCALE = 1e-5, DH**-0.5

# per layer: linear -> (A^T, B^T), or (A^T, B^T, B^T's int32 row spans)
Adapter = list[dict[str, tuple[torch.Tensor, ...]]]


@pytest.fixture(params=kernels.runnable_variants())
def variant(request: pytest.FixtureRequest) -> Iterator[str]:
    """Runs a test once per kernel variant this CPU can execute, forced one by one."""
    before = kernels.variant()
    assert kernels.select(request.param) == request.param
    yield request.param
    kernels.select(before)


@dataclass
class Layers:
    """Random layers of a small Llama: packed linears, norms and the caches before a step."""
    linears: list[dict[str, BlockLinear]]
    norms: list[tuple[torch.Tensor, torch.Tensor]]
    caches: list[tuple[torch.Tensor, torch.Tensor]]  # [SLOTS, HKV, T, DH] k, v per layer

    def args(self, caches: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[list[torch.Tensor], list[int]]:
        tensors: list[torch.Tensor] = []
        kinds: list[int] = []
        for lin, (n1, n2), (k, v) in zip(self.linears, self.norms, caches, strict=True):
            tensors += [n1, lin["qkv"].weight, lin["qkv"].sc, lin["o"].weight, lin["o"].sc, n2,
                        lin["w13"].weight, lin["w13"].sc, lin["w2"].weight, lin["w2"].sc, k, v]
            kinds += [lin[name].kind_code for name in LINEARS]
        return tensors, kinds


def _layers(n_layers: int = 2, kv_dtype: torch.dtype = torch.float32) -> Layers:
    g = torch.Generator().manual_seed(11)
    linears = [{name: _kind_inputs(KINDS[name], N_OUT[name], K_IN[name], seed=10 * layer + i)[0]
                for i, name in enumerate(LINEARS)} for layer in range(n_layers)]
    norms = [(0.5 + torch.rand(D, generator=g), 0.5 + torch.rand(D, generator=g)) for _ in range(n_layers)]
    caches = [(torch.randn(SLOTS, HKV, T, DH, generator=g).to(kv_dtype),
               torch.randn(SLOTS, HKV, T, DH, generator=g).to(kv_dtype)) for _ in range(n_layers)]
    return Layers(linears, norms, caches)


def _adapter(seed: int, ranks: dict[str, int], n_layers: int = 2) -> Adapter:
    """A^T ~ N(0, 1/k_in), B^T ~ N(0, 0.25/r): a delta about a third of a unit output."""
    g = torch.Generator().manual_seed(seed)
    return [{name: (torch.randn(K_IN[name], r, generator=g) / K_IN[name] ** 0.5,
                    torch.randn(r, N_OUT[name], generator=g) * 0.5 / r**0.5)
             for name, r in ranks.items()} for _ in range(n_layers)]


def _fused_adapter(seed: int, parts: dict[str, list[tuple[int, int, int]]], n_layers: int = 2) -> Adapter:
    """An adapter whose linears are made of parts (rank, first column, end column), as a
    fused linear's are: part p's rows of B^T are zero outside its columns, which its spans
    say (an all-zero row: an empty span)."""
    g = torch.Generator().manual_seed(seed)
    out: Adapter = []
    for _ in range(n_layers):
        layer: dict[str, tuple[torch.Tensor, ...]] = {}
        for name, ps in parts.items():
            r = sum(p[0] for p in ps)
            at = torch.randn(K_IN[name], r, generator=g) / K_IN[name] ** 0.5
            bt = torch.zeros(r, N_OUT[name])
            spans = torch.zeros(r, 2, dtype=torch.int32)
            j = 0
            for rank, c0, c1 in ps:
                bt[j:j + rank, c0:c1] = torch.randn(rank, c1 - c0, generator=g) * 0.5 / r**0.5
                spans[j:j + rank] = torch.tensor([c0, c1], dtype=torch.int32)
                j += rank
            layer[name] = (at, bt, spans)
        out.append(layer)
    return out


# q | k | v and gate | up as parts (FFN = 96: the gate/up boundary falls inside the kernels'
# passes of 64 or more columns), o with a row reaching columns [37, 101) only and a zero row,
# down whole
FUSED = _fused_adapter(4, {"qkv": [(4, 0, Q), (3, Q, Q + KV), (5, Q + KV, Q + 2 * KV)],
                           "o": [(2, 0, D), (1, 37, 101), (1, 9, 9)],
                           "w13": [(6, 0, FFN), (6, FFN, 2 * FFN)], "w2": [(5, 0, D)]})


def _lora_list(adapters: list[Adapter], spans: bool = False) -> list[torch.Tensor]:
    """adapter-major, then layer, then qkv, o, w13, w2's (A^T, B^T); empty where untouched;
    each pair followed by its spans (empty: the whole output) when `spans`"""
    empty, no_spans = torch.empty(0), torch.empty(0, dtype=torch.int32)
    out: list[torch.Tensor] = []
    for adapter in adapters:
        for layer in adapter:
            for name in LINEARS:
                at, bt, *rest = layer.get(name, (empty, empty))
                out += [at, bt, rest[0] if rest else no_spans] if spans else [at, bt]
    return out


def _as(lora: list[torch.Tensor], dtypes: list[torch.dtype]) -> list[torch.Tensor]:
    """Adapter i's matrices in dtypes[i] (rounded to nearest even for bfloat16), spans kept"""
    per = len(lora) // len(dtypes)
    return [t if not t.is_floating_point() else t.to(dtypes[i // per]).contiguous() for i, t in enumerate(lora)]


# two adapters of different ranks (adapter 1 touches only qkv and w2), one with the extreme
# ranks; ranks not a multiple of 16 take the kernels' tail path
ADAPTERS = [_adapter(1, {"qkv": 16, "o": 8, "w13": 24, "w2": 5}),
            _adapter(2, {"qkv": 7, "w2": 40}),
            _adapter(3, {"qkv": 1, "o": 256, "w13": 3, "w2": 17})]
# nine rows: adapter 0 on five (a group of four and one), rows without adapters between
ROW_ADAPTERS = [0, -1, 1, 0, 0, 2, -1, 0, 0]


@dataclass
class Step:
    x: torch.Tensor
    rows: torch.Tensor
    pos: torch.Tensor
    cos: torch.Tensor
    sin: torch.Tensor


def _step_inputs() -> Step:
    nb = len(ROW_ADAPTERS)
    g = torch.Generator().manual_seed(5)
    rows = torch.randperm(SLOTS, generator=g)[:nb]  # a slot per row: rows never share a cache
    pos = torch.randint(3, T, (nb,), generator=g)
    cos, sin = rope_tables(DH, T, 10000.0)
    return Step(torch.randn(nb, D, generator=g), rows, pos, cos[pos].contiguous(), sin[pos].contiguous())


def _first(s: Step, n: int) -> Step:
    return Step(s.x[:n], s.rows[:n], s.pos[:n], s.cos[:n], s.sin[:n])


def _run(layers: Layers, s: Step, lora: list[torch.Tensor], adapters: torch.Tensor | None
         ) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
    caches = [(k.clone(), v.clone()) for k, v in layers.caches]
    tensors, kinds = layers.args(caches)
    out = torch.ops.m4.decode_layers(s.x, tensors, kinds, s.rows, s.pos, s.cos, s.sin, H, HKV, EPS, SCALE,
                                     lora, adapters)
    return out, caches


def _flat(out: torch.Tensor, caches: list[tuple[torch.Tensor, torch.Tensor]]) -> list[torch.Tensor]:
    return [out, *(c.float() for kv in caches for c in kv)]


def test_rows_without_an_adapter_give_the_bits_of_the_op_without_lora(variant: str) -> None:
    layers, s = _layers(), _step_inputs()
    base, base_caches = _run(layers, s, [], None)
    lora = _lora_list(ADAPTERS)
    # adapters given but unused: the whole step is the op without them, bit for bit
    for unused in (None, torch.full((len(ROW_ADAPTERS),), -1, dtype=torch.int32)):
        got = _flat(*_run(layers, s, lora, unused))
        assert all(torch.equal(a, b) for a, b in zip(got, _flat(base, base_caches), strict=True))
    assert all(torch.equal(a, b) for a, b in
               zip(_flat(*_run(layers, s, [], torch.full((len(ROW_ADAPTERS),), -1))), _flat(base, base_caches), strict=True))
    out, caches = _run(layers, s, lora, torch.tensor(ROW_ADAPTERS))
    plain = [b for b, a in enumerate(ROW_ADAPTERS) if a < 0]
    assert torch.equal(out[plain], base[plain])
    for (k, v), (bk, bv) in zip(caches, base_caches, strict=True):
        slots = s.rows[plain]
        assert torch.equal(k[slots], bk[slots]) and torch.equal(v[slots], bv[slots])
    adapted = [b for b, a in enumerate(ROW_ADAPTERS) if a >= 0]
    assert (out[adapted] - base[adapted]).abs().amin(-1).gt(0).all()  # every adapted row moved


BF16, F32 = torch.bfloat16, torch.float32
# the adapters as the step takes them: float32, bfloat16, a mix, and a fused one with spans
FORMS = {"float32": lambda: _lora_list(ADAPTERS),
         "bfloat16": lambda: _as(_lora_list(ADAPTERS), [BF16] * 3),
         "mixed": lambda: _as(_lora_list(ADAPTERS), [BF16, F32, BF16]),
         "spans": lambda: _as(_lora_list([ADAPTERS[0], FUSED, ADAPTERS[2]], spans=True), [F32, BF16, F32])}


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("kv_dtype", [torch.float32, torch.bfloat16])
def test_every_variant_gives_the_scalar_bits_with_adapters(kv_dtype: torch.dtype, form: str) -> None:
    layers, s = _layers(kv_dtype=kv_dtype), _step_inputs()
    lora, adapters = FORMS[form](), torch.tensor(ROW_ADAPTERS)
    before = kernels.variant()
    results = {}
    try:
        for v in kernels.runnable_variants():
            kernels.select(v)
            results[v] = _flat(*_run(layers, s, lora, adapters))
            results[v + " alone"] = _flat(*_run(layers, _first(s, 1), lora, adapters[:1]))
    finally:
        kernels.select(before)
    for v, got in results.items():
        ref = results["scalar alone" if v.endswith(" alone") else "scalar"]
        assert all(torch.equal(a, b) for a, b in zip(got, ref, strict=True)), f"{v} differs from scalar"
    # a row's bits do not depend on the rows grouped with it (row 0 alone vs among nine)
    assert torch.equal(results["scalar alone"][0][0], results["scalar"][0][0])
    slot, p = s.rows[0].item(), s.pos[0].item()
    assert torch.equal(results["scalar alone"][1][slot, :, p], results["scalar"][1][slot, :, p])


def _linear(lin: BlockLinear, u: torch.Tensor, which: str, layer: int, row_adapters: list[Adapter | None]
            ) -> torch.Tensor:
    """The base linear on the kernels' packed weights, then each row's LoRA delta in torch."""
    y = torch.ops.m4.block_linear(u, lin.weight, lin.sc, lin.kind_code, lin.out_features, lin.in_features,
                                  torch.float32)
    for b, adapter in enumerate(row_adapters):
        if adapter is not None and which in adapter[layer]:
            at, bt = adapter[layer][which]
            y[b] += (u[b] @ at) @ bt
    return y


def _rms(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + EPS))


def _reference(layers: Layers, s: Step, row_adapters: list[Adapter | None]
               ) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
    """The layers in float32 torch: RMSNorm, q/k/v (+ delta), HF RoPE, the KV write, causal
    attention over the slot's positions [0, pos], o (+ delta), residual, RMSNorm, gate/up
    (+ delta), SiLU * up, down (+ delta), residual."""
    x = s.x.clone()
    nb = x.shape[0]
    caches = [(k.clone(), v.clone()) for k, v in layers.caches]
    for li, (lin, (n1, n2), (kc, vc)) in enumerate(zip(layers.linears, layers.norms, caches, strict=True)):
        y = _linear(lin["qkv"], _rms(x, n1), "qkv", li, row_adapters)
        q, k, v = y.split([Q, KV, KV], dim=-1)
        cos, sin = s.cos[:, None, None, :], s.sin[:, None, None, :]  # [B, S=1, 1, Dh]
        q = apply_rope(q.reshape(nb, 1, H, DH), cos, sin)[:, 0]
        k = apply_rope(k.reshape(nb, 1, HKV, DH), cos, sin)[:, 0]
        attn = torch.empty(nb, H, DH)
        for b, (slot, p) in enumerate(zip(s.rows.tolist(), s.pos.tolist(), strict=True)):
            kc[slot, :, p], vc[slot, :, p] = k[b], v[b].reshape(HKV, DH)
        for b, (slot, p) in enumerate(zip(s.rows.tolist(), s.pos.tolist(), strict=True)):
            keys = kc[slot, :, : p + 1].float().repeat_interleave(H // HKV, 0)  # [H, L, Dh]
            vals = vc[slot, :, : p + 1].float().repeat_interleave(H // HKV, 0)
            probs = torch.softmax((keys @ q[b][:, :, None])[..., 0] * SCALE, dim=-1)  # [H, L]
            attn[b] = (probs[:, None, :] @ vals)[:, 0]
        x = x + _linear(lin["o"], attn.reshape(nb, Q), "o", li, row_adapters)
        gate, up = _linear(lin["w13"], _rms(x, n2), "w13", li, row_adapters).split([FFN, FFN], dim=-1)
        x = x + _linear(lin["w2"], torch.nn.functional.silu(gate) * up, "w2", li, row_adapters)
    return x, caches


def test_adapter_rows_match_a_torch_reference(variant: str) -> None:
    """Within float32 noise of the reference: the second layer's activations quantize to
    int8 digits that may round apart where torch and the kernels compute the norm in another
    order, which moves rows by up to ~1e-4 of their scale with or without adapters. A delta in
    the wrong place (added after RoPE: ~100x the output's scale off) or of the wrong adapter or
    layer is far outside that."""
    layers, s = _layers(), _step_inputs()
    row_adapters = [ADAPTERS[a] if a >= 0 else None for a in ROW_ADAPTERS]
    out, caches = _run(layers, s, _lora_list(ADAPTERS), torch.tensor(ROW_ADAPTERS))
    ref, ref_caches = _reference(layers, s, row_adapters)
    rel = 5e-4
    tol = rel * ref.abs().max().item()
    assert (out - ref).abs().max().item() <= tol
    for slot, p in zip(s.rows.tolist(), s.pos.tolist(), strict=True):  # every row's KV writes
        for got, want in zip(caches, ref_caches, strict=True):
            for c, r in zip(got, want, strict=True):
                assert (c[slot, :, p] - r[slot, :, p]).abs().max().item() <= rel * r[slot, :, p].abs().max().item()
    # the reference tells adapters apart: without them it is far from the kernels' output
    plain, _ = _reference(layers, s, [None] * len(ROW_ADAPTERS))
    adapted = [b for b, a in enumerate(ROW_ADAPTERS) if a >= 0]
    assert ((out - plain)[adapted].abs().amax(-1) > 100 * tol).all()


def test_the_delta_reaches_the_kv_cache() -> None:
    """An adapter touching qkv changes the keys and values the row writes, in every layer,
    and the base rows' writes stay as they were."""
    layers, s = _layers(), _step_inputs()
    _, base = _run(layers, s, [], None)
    _, caches = _run(layers, s, _lora_list(ADAPTERS), torch.tensor(ROW_ADAPTERS))
    for b, (slot, p) in enumerate(zip(s.rows.tolist(), s.pos.tolist(), strict=True)):
        for (k, v), (bk, bv) in zip(caches, base, strict=True):
            if ROW_ADAPTERS[b] >= 0:
                assert (k[slot, :, p] != bk[slot, :, p]).all() and (v[slot, :, p] != bv[slot, :, p]).all()
            else:
                assert torch.equal(k[slot], bk[slot]) and torch.equal(v[slot], bv[slot])


def test_bad_adapter_arguments_raise() -> None:
    layers, s = _layers(), _step_inputs()
    lora, adapters = _lora_list(ADAPTERS), torch.tensor(ROW_ADAPTERS)
    at, bt = lora[0], lora[1]  # adapter 0, layer 0, qkv

    def call(lora: list[torch.Tensor] = lora, adapters: torch.Tensor | None = adapters) -> torch.Tensor:
        return _run(layers, s, lora, adapters)[0]

    def swap(i: int, t: torch.Tensor) -> list[torch.Tensor]:
        return [*lora[:i], t, *lora[i + 1:]]

    with pytest.raises(RuntimeError, match=r"adapter 0 layer 0 qkv: A\^T must be \[128, r\]"):
        call(swap(0, at[:-1].contiguous()))
    with pytest.raises(RuntimeError, match=r"adapter 0 layer 0 qkv: A\^T must be .* B\^T \[r, 256\]"):
        call(swap(1, bt[:-1].contiguous()))  # ranks disagree
    both = r"A\^T and B\^T must be contiguous CPU matrices, both float32 or both bfloat16"
    with pytest.raises(RuntimeError, match=r"adapter 0 layer 0 qkv: " + both + ", got Double"):
        call(swap(0, at.double()))
    with pytest.raises(RuntimeError, match=both):
        call(swap(1, bt.t().contiguous().t()))
    with pytest.raises(RuntimeError, match=r"adapter 1 layer 0 o: A\^T and B\^T must be"):  # one of a pair empty
        call(swap(8 * 2 + 2, torch.randn(Q, 4)))
    with pytest.raises(RuntimeError, match=r"1 <= r <= 256"):
        call(swap(0, torch.randn(D, 257)))
    with pytest.raises(RuntimeError, match="adapter 3 of row 2 out of range: -1 \\(none\\) or \\[0, 3\\)"):
        call(adapters=torch.tensor([0, -1, 3, 0, 0, 2, -1, 0, 0]))
    with pytest.raises(RuntimeError, match="adapter -2 of row 0 out of range"):
        call(adapters=torch.tensor([-2, -1, 1, 0, 0, 2, -1, 0, 0]))
    with pytest.raises(RuntimeError, match=r"adapter 0 of row 0 out of range: -1 \(none\) or \[0, 0\)"):
        call([], adapters)  # no adapters given
    with pytest.raises(RuntimeError, match=r"lora must hold 8 tensors per adapter and layer.*no B\^T"):
        call(lora[:-1])
    with pytest.raises(RuntimeError, match="lora must hold 8 tensors per adapter and layer"):
        call(lora[:8])  # one layer's worth for a two-layer step
    with pytest.raises(RuntimeError, match="adapters need one entry per row of x"):
        call(adapters=adapters[:-1])
    with pytest.raises(RuntimeError, match="adapters must be an integer CPU tensor"):
        call(adapters=adapters.float())
    # int32 indices are taken as they are
    assert torch.equal(call(adapters=adapters.int()), call())


def test_bad_adapter_dtypes_and_spans_raise() -> None:
    """A pair is float32 or bfloat16 throughout; spans are int32 [r, 2] within the output,
    and follow a pair."""
    layers, s = _layers(), _step_inputs()
    lora, adapters = _lora_list(ADAPTERS, spans=True), torch.tensor(ROW_ADAPTERS)
    at, bt = lora[0], lora[1]  # adapter 0, layer 0, qkv: [128, 16], [16, 256], then its spans
    spans = torch.tensor([[0, 256]] * 16, dtype=torch.int32)

    def call(lora: list[torch.Tensor]) -> torch.Tensor:
        return _run(layers, s, lora, adapters)[0]

    def swap(i: int, *t: torch.Tensor) -> list[torch.Tensor]:
        return [*lora[:i], *t, *lora[i + 1:]]

    both = r"adapter 0 layer 0 qkv: A\^T and B\^T must be contiguous CPU matrices, both float32 or both bfloat16"
    with pytest.raises(RuntimeError, match=both + ", got BFloat16 .* and Float"):
        call(swap(0, at.bfloat16()))
    with pytest.raises(RuntimeError, match=both + ", got Float .* and BFloat16"):
        call(swap(1, bt.bfloat16()))
    with pytest.raises(RuntimeError, match=both + ", got Half"):
        call([at.half(), bt.half(), *lora[2:]])
    with pytest.raises(RuntimeError, match=both):
        call([at.bfloat16(), bt.bfloat16().t().contiguous().t(), *lora[2:]])
    span_shape = r"adapter 0 layer 0 qkv: B\^T's row spans must be a contiguous int32 \[r, 2\] = \[16, 2\]"
    with pytest.raises(RuntimeError, match=span_shape + ".* got Long"):
        call(swap(2, spans.long()))
    with pytest.raises(RuntimeError, match=span_shape):
        call(swap(2, spans[:-1].contiguous()))
    with pytest.raises(RuntimeError, match=span_shape):
        call(swap(2, spans.t().contiguous().t()))
    for bad in ([0, 257], [5, 4], [-1, 3]):
        wrong = spans.clone()
        wrong[3] = torch.tensor(bad)
        with pytest.raises(RuntimeError, match=rf"qkv: row 3's span \[{bad[0]}, {bad[1]}\) is not within \[0, 256\)"):
            call(swap(2, wrong))
    # adapter 1 leaves o alone (its 4th and 5th tensors are empty): no spans for it
    with pytest.raises(RuntimeError, match="adapter 1 layer 0 o: row spans given for a linear the adapter leaves alone"):
        call(swap(24 + 5, torch.zeros(4, 2, dtype=torch.int32)))
    with pytest.raises(RuntimeError, match=r"lora must hold 8 tensors .*\(tensor 3 is integer but follows no pair\)"):
        call([*lora[:3], spans, *lora[3:]])
    with pytest.raises(RuntimeError, match="tensor 0 is integer but follows no pair"):
        call([spans, *lora])


def test_a_bfloat16_adapter_gives_the_bits_of_its_values_in_float32(variant: str) -> None:
    """bf16 -> f32 is exact, and the kernels do nothing else with it: a bf16 adapter's step is
    the step of the float32 adapter holding the same values, beside float32 adapters too."""
    layers, s = _layers(), _step_inputs()
    lora, adapters = _lora_list(ADAPTERS), torch.tensor(ROW_ADAPTERS)
    for dtypes in ([BF16, BF16, BF16], [BF16, F32, BF16], [F32, F32, BF16]):
        half = _as(lora, dtypes)
        widened = [t.float() for t in half]
        got, want = _flat(*_run(layers, s, half, adapters)), _flat(*_run(layers, s, widened, adapters))
        assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True)), dtypes
    # (the rounding to bf16 moved the adapters' rows, and only theirs)
    out, base = _run(layers, s, _as(lora, [BF16] * 3), adapters)[0], _run(layers, s, lora, adapters)[0]
    adapted = torch.tensor(ROW_ADAPTERS) >= 0
    assert not torch.equal(out[adapted], base[adapted]) and torch.equal(out[~adapted], base[~adapted])


def test_row_spans_skip_only_zeros(variant: str) -> None:
    """A fused adapter with its B^T's row spans gives the bits of the same matrices without
    them (each pair's spans optional), in float32 and bf16; and the spans are read: rows
    whose spans are empty add nothing."""
    layers, s = _layers(), _step_inputs()
    adapters = torch.tensor([0, -1, 1, 0, 0, 0, -1, 1, 0])
    spanned, plain = _lora_list([FUSED, ADAPTERS[1]], spans=True), _lora_list([FUSED, ADAPTERS[1]])
    for dtypes in ([F32, F32], [BF16, F32], [BF16, BF16]):
        want = _flat(*_run(layers, s, _as(plain, dtypes), adapters))
        every = _as(spanned, dtypes)
        some = [t for t in every if t.is_floating_point() or t.numel() > 0]  # only the non-empty spans
        assert len(plain) < len(some) < len(every)
        for lora in (every, some):
            got = _flat(*_run(layers, s, lora, adapters))
            assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True)), dtypes
    # adapter 0's q/k/v in layer 0 with every row's span empty: as if it left q/k/v alone
    nothing = [*spanned[:2], torch.zeros(12, 2, dtype=torch.int32), *spanned[3:]]
    untouched = [torch.empty(0), torch.empty(0), torch.empty(0, dtype=torch.int32), *spanned[3:]]
    got, want = _flat(*_run(layers, s, nothing, adapters)), _flat(*_run(layers, s, untouched, adapters))
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
    assert not torch.equal(got[0], _run(layers, s, spanned, adapters)[0])


def _peft_like(seed: int) -> Lora:
    """A PEFT-style adapter on the test's small Llama: q, k, v of rank 4, o and gate of rank
    2 (up left alone), down in layer 1 only."""
    g = torch.Generator().manual_seed(seed)
    lora = Lora("backbone", 4, 8.0)
    shapes = {"self_attn.q_proj": (Q, D, 4), "self_attn.k_proj": (KV, D, 4), "self_attn.v_proj": (KV, D, 4),
              "self_attn.o_proj": (D, Q, 2), "mlp.gate_proj": (FFN, D, 2), "mlp.down_proj": (D, FFN, 4)}
    for layer in range(2):
        for name, (n_out, n_in, r) in shapes.items():
            if name == "mlp.down_proj" and layer == 0:
                continue
            lora.pairs[f"model.layers.{layer}.{name}"] = LoraPair(
                torch.randn(r, n_in, generator=g) / n_in**0.5, torch.randn(n_out, r, generator=g), 8.0 / r)
    return lora


def test_decode_tensors_in_bfloat16_and_their_spans() -> None:
    """decode_tensors rounds the float32 tensors, scaling folded in, to bf16; each fused part's
    rows span its slice of the output (empty spans: the whole output, or no adapter); the
    step reads them as it reads float32 ones without spans, the same bits."""
    lora, sizes = _peft_like(8), llama_sizes(D, H, HKV, DH, FFN)
    f32 = decode_tensors(lora, 2, sizes, spans=True)
    b16 = decode_tensors(lora, 2, sizes, dtype=torch.bfloat16, spans=True)
    assert len(f32) == len(b16) == 2 * 4 * 3
    for a, b in zip(f32, b16, strict=True):
        if a.is_floating_point():
            assert a.dtype == torch.float32 and b.dtype == torch.bfloat16 and b.is_contiguous()
            assert torch.equal(b, a.to(torch.bfloat16))
        else:
            assert a.dtype == b.dtype == torch.int32 and torch.equal(a, b)
    qkv_spans = f32[2]  # layer 0: q's 4 rows, then k's, then v's
    assert qkv_spans.tolist() == [[0, Q]] * 4 + [[Q, Q + KV]] * 4 + [[Q + KV, Q + 2 * KV]] * 4
    assert f32[5].numel() == 0  # o: one part, the whole output
    assert f32[8].tolist() == [[0, FFN]] * 2  # gate only
    assert f32[9].numel() == f32[10].numel() == f32[11].numel() == 0  # layer 0's down: untouched
    assert (f32[1][:4, Q:] == 0).all() and (f32[1][4:8, :Q] == 0).all()  # the zeros they skip
    bare = decode_tensors(lora, 2, sizes)  # without spans
    assert len(bare) == 2 * 8
    assert all(torch.equal(a, b) for a, b in zip(bare, [t for t in f32 if t.is_floating_point()], strict=True))
    with pytest.raises(ValueError, match=r"float32 or bfloat16, not torch\.float16"):
        decode_tensors(lora, 2, sizes, dtype=torch.float16)
    layers, s = _layers(), _step_inputs()
    adapters = torch.tensor([0, -1, 1, 0, 0, 1, -1, 0, 0])
    other = decode_tensors(_peft_like(9), 2, sizes, dtype=torch.bfloat16, spans=True)
    got = _flat(*_run(layers, s, b16 + other, adapters))
    want = _flat(*_run(layers, s, [t.float() for t in b16 + other if t.is_floating_point()], adapters))
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
