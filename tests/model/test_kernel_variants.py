"""m4's kernel variants against each other and against the CPU they run on.

* The dispatcher runs every variant this CPU's flags allow (read independently from
  /proc/cpuinfo here), and nothing it cannot run.
* Every runnable variant gives the scalar reference's bits: each weight kind's GEMM, decode
  attention and the fused decode step, through torch (here) and through the standalone
  kernel_test program (native, and cross-compiled for AArch64 under qemu-user, which proves
  the NEON variant and the dispatcher's fallback on an ARM CPU without dotprod).
* The weight kinds GGUF's other block types map onto compute their format.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from m4d.model import kernels
from m4d.model.block_linear import q4_1_linear, q8_0_linear, q8_1_linear
from m4d.model.qtensors import pack_int4

assert kernels.load(), "the m4 kernels did not build or load: run 'python -m m4d.model.kernels build'"

# what each x86 variant needs, in /proc/cpuinfo's names
X86_NEEDS = {"avx512vnni": ("avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni", "fma", "f16c"),
             "avxvnni": ("avx_vnni", "avx2", "fma", "f16c"),
             "avx2": ("avx2", "fma", "f16c"),
             "scalar": ()}


def _cpuinfo_flags() -> set[str]:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith(("flags", "Features")):
            return set(line.split(":", 1)[1].split())
    return set()


@pytest.mark.skipif(kernels.arch() != "x86_64", reason="the x86 variants' flags")
def test_the_dispatcher_runs_every_variant_the_cpu_allows() -> None:
    flags = _cpuinfo_flags()
    expected = [v for v, needs in X86_NEEDS.items() if all(f in flags for f in needs)]
    assert kernels.runnable_variants() == expected  # best first, scalar last
    assert kernels.select("auto") == expected[0]
    assert set(torch.ops.m4.compiled_variants()) == set(X86_NEEDS)
    for name in set(X86_NEEDS) - set(expected):  # a variant the CPU lacks is refused by name
        with pytest.raises(ValueError, match=f"kernel variant '{name}' cannot run on this CPU"):
            kernels.select(name)
    assert kernels.variant() == expected[0]


def _kind_inputs(kind: str, n: int, k: int, seed: int):
    """A linear of `kind` on random blocks, and its dequantized float64 weight."""
    rng = np.random.default_rng(seed)
    if kind in ("q4_f16", "q4_f32"):
        dt = np.float16 if kind == "q4_f16" else np.float32
        q = rng.integers(0, 16, (n, k)).astype(np.uint8)
        d = (rng.random((n, k // 32)) * 0.02 + 1e-3).astype(dt)
        m = (-rng.random((n, k // 32)) * 0.1).astype(dt)
        lin = q4_1_linear(torch.from_numpy(pack_int4(q)), torch.from_numpy(d), torch.from_numpy(m))
        w = q.astype(np.float64) * np.repeat(d.astype(np.float64), 32, 1) + np.repeat(m.astype(np.float64), 32, 1)
    elif kind in ("q8u_f32", "q8u_f32_g16"):
        group = 16 if kind == "q8u_f32_g16" else 32
        q = rng.integers(0, 128, (n, k)).astype(np.uint8)
        d = (rng.random((n, k // group)) * 0.01 + 1e-3).astype(np.float32)
        m = (-rng.random((n, k // group)) * 0.1).astype(np.float32)
        lin = q8_1_linear(torch.from_numpy(q), torch.from_numpy(d), torch.from_numpy(m))
        w = (q.astype(np.float64) * np.repeat(d.astype(np.float64), group, 1)
             + np.repeat(m.astype(np.float64), group, 1))
    else:
        group = 16 if kind == "q8_f32_g16" else 32
        dt = np.float16 if kind in ("q8_f16", "q5_f16") else np.float32
        q = rng.integers(-16, 16, (n, k)) if kind == "q5_f16" else rng.integers(-127, 128, (n, k))
        q = q.astype(np.int8)
        d = (rng.random((n, k // group)) * 0.01 + 1e-4).astype(dt)
        lin = q8_0_linear(torch.from_numpy(q), torch.from_numpy(d))
        w = q.astype(np.float64) * np.repeat(d.astype(np.float64), group, 1)
    assert lin.kind == kind
    return lin, torch.from_numpy(w)


@pytest.mark.parametrize("kind", sorted(kernels.WEIGHT_KINDS))
def test_every_weight_kind_computes_its_format_on_every_variant(kind: str) -> None:
    """Integer activations (every block holds a +-127, so they quantize exactly) times the
    stored blocks equal x @ W^T; random activations agree across variants bit for bit, for
    every row count up to 9 (each variant's row groups and every remainder) and past a chunk."""
    n, k = 48, 192
    lin, w = _kind_inputs(kind, n, k, seed=len(kind))
    g = torch.Generator().manual_seed(3)
    xi = torch.randint(-127, 128, (7, k), generator=g).float()
    xi.view(7, k // 32, 32)[:, :, 5] = 127.0
    x = torch.randn(70, k, generator=g)
    before = kernels.variant()
    results = {}
    try:
        for v in kernels.runnable_variants():
            kernels.select(v)
            exact = lin(xi).double()
            torch.testing.assert_close(exact, xi.double() @ w.t(), rtol=1e-6, atol=1e-4 * w.abs().max().item())
            results[v] = (lin(x), lin(x.bfloat16()), exact, *(lin(x[:m]) for m in range(1, 10)))
    finally:
        kernels.select(before)
    ref = results["scalar"]
    for v, got in results.items():
        assert all(torch.equal(a, b) for a, b in zip(got, ref, strict=True)), f"{v} differs from scalar"


def test_q5_weights_take_5_bits_and_give_the_8_bit_numbers() -> None:
    """Signed weights within [-16, 15] (a Q5_0 file's) are packed in 5 bits, 5/8 of the 8-bit
    layout's bytes, and every variant gives exactly what the 8-bit layout gives."""
    n, k = 64, 256
    rng = np.random.default_rng(7)
    q = torch.from_numpy(rng.integers(-16, 16, (n, k)).astype(np.int8))
    q[0, :32] = torch.arange(-16, 16, dtype=torch.int8)  # every value, and both extremes
    d = torch.from_numpy((rng.random((n, k // 32)) * 0.01 + 1e-4).astype(np.float16))
    small, wide = q8_0_linear(q, d), q8_0_linear(q, d, compact=False)
    assert (small.kind, wide.kind) == ("q5_f16", "q8_f16")
    assert small.weight.numel() * 8 == wide.weight.numel() * 5
    x = torch.randn(11, k, generator=torch.Generator().manual_seed(5))
    before = kernels.variant()
    try:
        for v in kernels.runnable_variants():
            kernels.select(v)
            assert torch.equal(small(x), wide(x)), f"{v}: 5-bit and 8-bit layouts differ"
    finally:
        kernels.select(before)


def test_linears_stored_in_mixed_kinds_become_one_exact_linear(tmp_path: Path) -> None:
    """A fused q/k/v whose parts are stored as Q4_K, Q6_K and Q5_0 (as a Q4_K_M file has
    them) loads as one unsigned-byte linear with a scale and min per 16 that holds exactly
    the stored weights: the same products as the parts on exactly quantized activations."""
    from m4d.model.weights import WeightFile, build_linear
    from safetensors.torch import save_file

    rng = np.random.default_rng(5)
    k = 128
    q4 = torch.from_numpy(pack_int4(rng.integers(0, 16, (32, k)).astype(np.uint8)))
    q6 = torch.from_numpy(rng.integers(-32, 32, (16, k)).astype(np.int8))
    q5 = torch.from_numpy(rng.integers(-16, 16, (16, k)).astype(np.int8))
    f32 = lambda *s: torch.from_numpy((rng.random(s) * 0.01 + 1e-3).astype(np.float32))  # noqa: E731
    tensors = {"q.qweight": q4, "q.scales": f32(32, k // 32), "q.mins": -f32(32, k // 32),
               "k.qweight": q6, "k.scales": f32(16, k // 16),
               "v.qweight": q5, "v.scales": f32(16, k // 32).half()}
    save_file(tensors, str(tmp_path / "w.safetensors"))
    with WeightFile(tmp_path / "w.safetensors") as wf:
        lin = build_linear(wf, ["q", "k", "v"], "w4a8", torch.float32)
        dense = torch.cat([wf.dense(n) for n in ("q", "k", "v")]).double()
    assert lin.kind == "q8u_f32_g16" and lin.out_features == 64
    xi = torch.randint(-127, 128, (5, k), generator=torch.Generator().manual_seed(6)).float()
    xi.view(5, k // 32, 32)[:, :, 0] = -127.0
    torch.testing.assert_close(lin(xi).double(), xi.double() @ dense.t(), rtol=1e-6, atol=1e-4)


def test_attention_and_decode_step_agree_bit_for_bit_across_variants() -> None:
    g = torch.Generator().manual_seed(9)
    kc = torch.randn(4, 2, 70, 64, generator=g).bfloat16()
    vc = torch.randn(4, 2, 70, 64, generator=g).bfloat16()
    q = torch.randn(5, 6, 64, generator=g)
    rows, pos = torch.tensor([3, 0, 1, 2, 3]), torch.tensor([69, 0, 15, 16, 40])
    d, h, hkv, dh, ffn = 128, 4, 2, 32, 96
    lins = [_kind_inputs(kind, n, kk, seed=i)[0] for i, (kind, n, kk) in enumerate(
        [("q4_f16", (h + 2 * hkv) * dh, d), ("q8_f32_g16", d, h * dh), ("q4_f32", 2 * ffn, d),
         ("q8u_f32", d, ffn)])]
    x = torch.randn(3, d, generator=g)
    cos, sin = torch.randn(3, dh, generator=g), torch.randn(3, dh, generator=g)
    before = kernels.variant()
    out = {}
    try:
        for v in kernels.runnable_variants():
            kernels.select(v)
            caches = [torch.zeros(3, hkv, 16, dh) for _ in range(2)]
            layer = [torch.ones(d), lins[0].weight, lins[0].sc, lins[1].weight, lins[1].sc,
                     torch.full((d,), 0.5), lins[2].weight, lins[2].sc, lins[3].weight, lins[3].sc, *caches]
            step = torch.ops.m4.decode_layers(x, layer * 2, [m.kind_code for m in lins] * 2,
                                              torch.tensor([2, 0, 1]), torch.tensor([5, 0, 15]), cos, sin,
                                              h, hkv, 1e-5, dh**-0.5, [], None)
            out[v] = (torch.ops.m4.decode_attention(q, kc, vc, rows, pos, 0.125),
                      torch.ops.m4.decode_attention(q.bfloat16(), kc.float(), vc.float(), rows, pos, 0.125),
                      step, *caches)
    finally:
        kernels.select(before)
    for v, got in out.items():
        assert all(torch.equal(a, b) for a, b in zip(got, out["scalar"], strict=True)), f"{v} differs"


def _run_kernel_test(program: Path, *prefix: str) -> str:
    proc = subprocess.run([*prefix, str(program)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    last = proc.stdout.strip().splitlines()[-1]
    assert last.endswith(" passed, 0 failed") and int(last.split()[0]) > 0, last
    return proc.stdout


def test_native_kernel_test_program(tmp_path: Path) -> None:
    """The torch-free program built for this machine: every runnable variant vs scalar."""
    cxx = shutil.which("c++") or shutil.which("g++")
    assert cxx, "no C++ compiler: make setup installs g++"
    out = _run_kernel_test(kernels.build_test_program(kernels.arch(), cxx, tmp_path / "kernel_test"))
    for v in kernels.runnable_variants():
        assert f"variant: {v}\n" in out


@pytest.fixture(scope="module")
def arm_program(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cxx = shutil.which("aarch64-linux-gnu-g++")
    assert cxx and shutil.which("qemu-aarch64"), (
        "the ARM kernel tests need g++-aarch64-linux-gnu and qemu-user (make setup installs them)")
    return kernels.build_test_program("aarch64", cxx, tmp_path_factory.mktemp("arm") / "kernel_test",
                                      ["-static"])


def test_arm_neon_variants_under_qemu(arm_program: Path) -> None:
    """An ARMv8.6 CPU with dotprod and i8mm (qemu's "max"): both NEON variants run and give
    the scalar reference's bits for every kind, attention and the decode step (with and without
    per-row LoRA adapters)."""
    out = _run_kernel_test(arm_program, "qemu-aarch64", "-cpu", "max")
    for v in ("neon_i8mm", "neon_dotprod", "scalar"):
        assert f"variant: {v}\n" in out
    assert out.count("ok   neon_i8mm") >= 100 and out.count("ok   neon_dotprod") >= 100


@pytest.mark.parametrize("cpu,runs,not_runnable", [
    ("cortex-a76", ["neon_dotprod", "scalar"], ["neon_i8mm"]),  # ARMv8.2 with dotprod, no i8mm
    ("cortex-a53", ["scalar"], ["neon_i8mm", "neon_dotprod"]),  # ARMv8.0: neither
])
def test_arm_dispatch_follows_the_cpu(arm_program: Path, cpu: str, runs: list[str],
                                      not_runnable: list[str]) -> None:
    """The dispatcher never picks a NEON variant the CPU lacks the instructions for."""
    out = _run_kernel_test(arm_program, "qemu-aarch64", "-cpu", cpu)
    for v in runs:
        assert f"variant: {v}\n" in out
    for v in not_runnable:
        assert f"not runnable here: {v}\n" in out
