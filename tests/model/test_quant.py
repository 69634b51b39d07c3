"""Weight-only quantized linears and the GGUF block codecs against dense references."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from m4d.builder.gguf_blocks import split_q4_1, split_q8_0
from m4d.builder.importers.gguf_llama import unpermute_rows
from m4d.model.qtensors import dequantize_q4_1, dequantize_q8_0, pack_int4, unpack_int4
from m4d.model.quant import (
    LO_RADIX,
    Int4WeightOnlyLinear,
    Int8DynamicLinear,
    Int8GemmError,
    Int8WeightOnlyLinear,
    onednn_int8_available,
)
from m4d.model.weights import WeightFile


@pytest.fixture(scope="module")
def reader(gguf_path):
    return gguf.GGUFReader(str(gguf_path))


def _tensor(reader, name: str):
    return next(t for t in reader.tensors if t.name == name)


def _q4_1(raw: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """GGUF Q4_1 bytes -> the stored (qweight, scales, mins), as the image builder splits them."""
    stored = split_q4_1(raw)
    assert stored.kind == "q4_1" and stored.mins is not None
    return stored.qweight, stored.scales, stored.mins


def test_q4_1_block_decode_by_hand() -> None:
    d, m = np.float16(0.5), np.float16(-1.25)
    q = np.arange(32) % 16  # element j has value j % 16
    qs = (q[:16] | (q[16:] << 4)).astype(np.uint8)  # GGUF: low nibble j, high nibble j + 16
    block = np.concatenate([np.frombuffer(d.tobytes() + m.tobytes(), np.uint8), qs])[None]
    qweight, scales, mins = _q4_1(block)
    assert qweight.shape == (1, 16) and scales.shape == mins.shape == (1, 1)
    assert qweight[0, 0] == (0 | (1 << 4))  # our order: byte i = element 2i | element 2i+1 << 4
    assert unpack_int4(torch.from_numpy(qweight)).tolist() == [q.tolist()]
    w = dequantize_q4_1(*(torch.from_numpy(a) for a in (qweight, scales, mins)))
    assert w.tolist() == [(q * 0.5 - 1.25).tolist()]


def test_pack_unpack_roundtrip() -> None:
    q = np.random.default_rng(0).integers(0, 16, (7, 64))
    assert unpack_int4(torch.from_numpy(pack_int4(q))).numpy().tolist() == q.tolist()


@pytest.mark.parametrize("name", ["blk.0.attn_q.weight", "blk.3.ffn_down.weight", "blk.29.attn_v.weight"])
def test_q4_1_split_matches_gguf_dequantize(reader, name: str) -> None:
    t = _tensor(reader, name)
    ref = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type))
    parts = [torch.from_numpy(a) for a in _q4_1(np.asarray(t.data))]
    assert torch.equal(dequantize_q4_1(*parts), ref)


def test_q8_0_split_matches_gguf_dequantize(reader) -> None:
    t = _tensor(reader, "token_embd.weight")
    ref = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type))
    stored = split_q8_0(np.asarray(t.data))
    qw, sc = stored.qweight, stored.scales
    assert qw.dtype == np.int8 and sc.dtype == np.float16
    assert torch.equal(dequantize_q8_0(torch.from_numpy(qw), torch.from_numpy(sc)), ref)


def test_int4_linear_from_q4_1_matches_dense(reader) -> None:
    t = _tensor(reader, "blk.5.ffn_gate.weight")  # [1536, 576]
    qw, sc, mn = (torch.from_numpy(a) for a in _q4_1(np.asarray(t.data)))
    w = dequantize_q4_1(qw, sc, mn)  # [N, K] float32
    x = torch.randn(5, w.shape[1], generator=torch.Generator().manual_seed(0))
    ref = x @ w.t()
    # fp32 activations: scale/zero kept in fp32, so the kernel is exact up to summation order
    lin32 = Int4WeightOnlyLinear.from_q4_1(qw, sc, mn, dtype=torch.float32)
    assert (lin32(x) - ref).abs().max().item() <= 1e-4 * ref.abs().max().item()
    # bf16: the nibbles are exact; scale and zero round to bf16 (8 significant bits)
    lin = Int4WeightOnlyLinear.from_q4_1(qw, sc, mn, dtype=torch.bfloat16)
    wb = lin.dequantized()
    assert (wb - w).abs().max().item() <= 2 ** -8 * (sc.float().abs().max() * 8 + mn.float().abs().max()).item()
    xb = x.bfloat16()
    dense = xb.float() @ wb.t()
    y = lin(xb)
    assert y.dtype == torch.bfloat16 and y.shape == (5, w.shape[0])
    assert (y.float() - dense).abs().max().item() <= 1e-2 * dense.abs().max().item()
    # batched leading dims
    assert lin(xb.view(5, 1, -1)).shape == (5, 1, w.shape[0])


def test_int4_from_float_and_int8_match_their_dequantized_weights() -> None:
    g = torch.Generator().manual_seed(1)
    w = torch.randn(192, 576, generator=g) * 0.05
    x = torch.randn(3, 576, generator=g).bfloat16()
    for lin in (Int4WeightOnlyLinear.from_float(w), Int8WeightOnlyLinear.from_float(w)):
        dense = x.float() @ lin.dequantized().t()
        y = lin(x).float()
        assert (y - dense).abs().max().item() <= 1e-2 * dense.abs().max().item(), type(lin)
    i4 = Int4WeightOnlyLinear.from_float(w).dequantized()
    i8 = Int8WeightOnlyLinear.from_float(w).dequantized()
    assert (i4 - w).abs().max().item() <= 0.6 * (w.max() - w.min()).item() / 15
    assert (i8 - w).abs().max().item() <= 0.51 * w.abs().max().item() / 127 + 1e-3


def test_unpermute_inverts_llama_cpp_permute() -> None:
    n_head, head_dim, k = 3, 8, 5
    w = np.arange(n_head * head_dim * k, dtype=np.float32).reshape(n_head * head_dim, k)
    # llama.cpp convert_hf_to_gguf.py: reshape(n_head, 2, hd/2, ...).swapaxes(1, 2)
    permuted = w.reshape(n_head, 2, head_dim // 2, k).swapaxes(1, 2).reshape(w.shape)
    assert np.array_equal(unpermute_rows(permuted, n_head), w)


def test_weight_file_kinds(imported_llama) -> None:
    with WeightFile(imported_llama.weights) as wf:
        assert wf.kind("model.embed_tokens.weight") == "q8_0"
        assert wf.kind("model.layers.0.self_attn.q_proj.weight") == "q4_1"
        assert wf.kind("model.norm.weight") == "dense"
        qw, sc, mn = wf.q4_1("model.layers.0.mlp.down_proj.weight")
        assert (qw.dtype, sc.dtype, mn.dtype) == (torch.uint8, torch.float16, torch.float16)
        assert qw.shape == (576, 768) and sc.shape == mn.shape == (576, 48)
        with pytest.raises(KeyError, match="not found"):
            wf.kind("model.layers.99.mlp.down_proj.weight")


def _activations(m: int, k: int, seed: int) -> torch.Tensor:
    """Decoder-like rows: mostly small values, a few outlier channels, row scales spread 100x."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g)
    x[:, torch.randperm(k, generator=g)[:4]] *= 30.0
    return x * torch.logspace(-1, 1, m)[torch.randperm(m, generator=g)][:, None]


def _w8a8_reference(lin: Int8DynamicLinear, x: torch.Tensor) -> torch.Tensor:
    """The format written out: two int8 digits per activation (found in float32, as the
    layer does), their products with the int8 weight summed in float64 (exact integers)."""
    scale = x.abs().amax(dim=1, keepdim=True) / 127
    hi = torch.round(x / scale)
    lo = torch.round((x / scale - hi) * LO_RADIX)
    assert hi.abs().max() <= 127 and lo.abs().max() <= 127
    w = lin.int8_weight().double()
    acc = hi.double() @ w.t() + (lo.double() @ w.t()) / LO_RADIX
    return acc * scale.double() * lin.scales.double()


def _gemm_is_exact(packed: bool) -> bool:
    """Independently of m4d.model.quant: do this CPU's int8 GEMMs give exact sums on
    full-range operands (digits as uint8 + 128 for oneDNN's packed path, int8 for _int_mm)?"""
    g = torch.Generator().manual_seed(1)
    a = torch.randint(-127, 128, (6, 128), generator=g)
    b = torch.randint(-127, 128, (24, 128), generator=g).to(torch.int8)
    exact = a.double() @ b.double().t()
    if packed:
        got = torch.ops.onednn.qlinear_pointwise(
            (a + 128).to(torch.uint8), 1.0, 128, torch.ops.onednn.qlinear_prepack(b, None),
            torch.ones(24), torch.zeros(24, dtype=torch.int64), None, 1.0, 0, torch.float32,
            "none", [], "")
    else:
        got = torch._int_mm(a.to(torch.int8), b.t())
    return torch.equal(got.double(), exact)


def _w8a8(make: Callable[[], Int8DynamicLinear], packed: bool | None = None) -> Int8DynamicLinear:
    """The w8a8 layer `make` builds; where it is refused, the refusal must be right (this
    CPU's GEMM on that path, or on both for packed=None, is not exact) and say what to use
    instead; the test is then skipped, having checked that."""
    try:
        return make()
    except Int8GemmError as exc:
        paths = [packed] if packed is not None else [False, *([True] if onednn_int8_available() else [])]
        assert not any(_gemm_is_exact(p) for p in paths), f"refused, yet the GEMM is exact: {exc}"
        assert "wrong sums" in str(exc) and '"w4a8"' in str(exc), exc
        pytest.skip(f"w8a8 refused on this CPU, rightly: {exc}")


@pytest.mark.parametrize("k,n", [(576, 960), (1536, 576)])
def test_w8a8_linear_computes_its_format_and_is_batch_invariant(k: int, n: int) -> None:
    g = torch.Generator().manual_seed(k)
    w = torch.randn(n, k, generator=g) * 0.05
    x = _activations(40, k, seed=n)
    lin = _w8a8(lambda: Int8DynamicLinear.from_float(w, dtype=torch.float32))
    y = lin(x)
    ref = _w8a8_reference(lin, x)
    # only float32 rounding of the final scaling: the sums themselves are exact
    assert ((y.double() - ref).abs() / ref.abs().amax(dim=1, keepdim=True)).max().item() < 1e-6
    # two activation digits: each activation within absmax / (127 * 2 * LO_RADIX), so the
    # output is near the unquantized product even with outlier channels (one digit: ~1e-2)
    dense = x.double() @ lin.dequantized().double().t()
    assert ((y.double() - dense).abs().amax(dim=1) / dense.abs().amax(dim=1)).max().item() < 1e-3
    # a row's output is bit-identical whatever else is in the batch, and wherever it sits
    alone = torch.cat([lin(x[i:i + 1]) for i in range(40)])
    for m in (2, 3, 7, 16, 17, 32, 40):
        assert torch.equal(lin(x[:m]), alone[:m]), m
    perm = torch.randperm(40, generator=g)
    assert torch.equal(lin(x[perm]), alone[perm])
    assert lin(x.view(40, 1, k).bfloat16()).shape == (40, 1, n)


@pytest.mark.skipif(not onednn_int8_available(), reason="oneDNN int8 linear is x86-only")
def test_w8a8_packed_onednn_path_equals_int_mm_path() -> None:
    g = torch.Generator().manual_seed(3)
    w = torch.randn(384, 576, generator=g) * 0.05
    x = _activations(9, 576, seed=4)
    packed = _w8a8(lambda: Int8DynamicLinear.from_float(w, dtype=torch.float32, packed=True), True)
    plain = _w8a8(lambda: Int8DynamicLinear.from_float(w, dtype=torch.float32, packed=False), False)
    assert torch.equal(packed(x), plain(x))


def test_w8a8_rejects_wrong_shapes() -> None:
    with pytest.raises(ValueError, match="int8"):
        Int8DynamicLinear(torch.zeros(4, 8), torch.ones(4))
    with pytest.raises(ValueError, match="scales"):
        Int8DynamicLinear(torch.zeros(4, 8, dtype=torch.int8), torch.ones(3))
    lin = _w8a8(lambda: Int8DynamicLinear(torch.ones(4, 8, dtype=torch.int8), torch.ones(4)))
    with pytest.raises(ValueError, match="last dim 8"):
        lin(torch.ones(2, 7))
    # an all-zero row stays exactly zero (no division by a zero scale)
    assert torch.equal(lin(torch.zeros(2, 8)).float(), torch.zeros(2, 4))


# A process whose torch and oneDNN are held to AVX2 (both real switches, read at start): on
# such CPUs oneDNN's int8 GEMMs saturated pairs of products to int16 and w8a8 computed relative
# errors of 0.13-0.32 (FACTS.md; m4d.model.quant.int8_gemm_path).
AVX2_ENV = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
AVX2_SCRIPT = """
import json, torch
from m4d.config import ConfigError
from m4d.executor.cpu import check_weight_format
from m4d.model.quant import LO_RADIX, Int8DynamicLinear, Int8GemmError, quantize_rows_int8
out = {"capability": torch.backends.cpu.get_cpu_capability(), "paths": {}}
g = torch.Generator().manual_seed(0)
w = torch.randn(576, 1536, generator=g) * 0.05
x = torch.randn(17, 1536, generator=g) * torch.logspace(-1, 1, 17)[:, None]
q, s_w = quantize_rows_int8(w)  # what the layer holds, known here without its GEMM
s = x.abs().amax(dim=1, keepdim=True) / 127
hi = torch.round(x / s)
lo = torch.round((x / s - hi) * LO_RADIX)
ref = (hi.double() @ q.double().t() + lo.double() @ q.double().t() / LO_RADIX) * s.double() * s_w.double()
for packed in (None, True, False):
    try:
        y = Int8DynamicLinear(q, s_w, dtype=torch.float32, packed=packed)(x)
        err = ((y.double() - ref).abs() / ref.abs().amax(dim=1, keepdim=True)).max().item()
        out["paths"][str(packed)] = {"error": err}
    except Int8GemmError as exc:
        out["paths"][str(packed)] = {"refused": str(exc)}
try:
    check_weight_format("w8a8")
    out["config"] = "accepted"
except ConfigError as exc:
    out["config"] = str(exc)
print(json.dumps(out))
"""


def test_w8a8_on_an_avx2_cpu_computes_its_format_or_is_refused(tmp_path: Path) -> None:
    """Never wrong numbers: each path either matches the format's exact reference to float32
    rounding or refuses to build, and then m4d itself refuses weight_format w8a8 at start."""
    env = {**os.environ, **AVX2_ENV}
    run = subprocess.run([sys.executable, "-c", AVX2_SCRIPT], env=env, capture_output=True,
                         text=True, timeout=300, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout.splitlines()[-1])
    if out["capability"] != "AVX2":
        pytest.skip(f"ATEN_CPU_CAPABILITY=avx2 does not apply here (torch: {out['capability']})")
    for path, result in out["paths"].items():
        if "error" in result:
            assert result["error"] < 1e-6, f"packed={path} computed wrong numbers: {result}"
        else:
            assert "wrong sums" in result["refused"] and '"w4a8"' in result["refused"], result
    refused = out["paths"]["None"].get("refused")
    if refused is None:
        assert out["config"] == "accepted"
        return
    assert out["config"].startswith('weight_format = "w8a8" cannot run on this CPU (x86_64, '
                                    "torch AVX2, oneDNN AVX2"), out["config"]
    # the daemon refuses it at start, before it reads an image, with the same message
    m4d = subprocess.run(
        [sys.executable, "-m", "m4d", "--weight-format", "w8a8", "--self-test", "strict",
         "--image", str(tmp_path / "no-image"), "--runtime-dir", str(tmp_path / "run")],
        env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert m4d.returncode == 2, m4d.stderr[-3000:]
    assert "m4d: configuration error: weight_format = \"w8a8\" cannot run" in m4d.stderr
    assert "wrong sums" in m4d.stderr and '"w4a8"' in m4d.stderr
