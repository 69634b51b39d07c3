"""m4's own CPU kernels (m4d/model/kernels) against their formats written out in float64.

What they must do, on every variant this CPU runs (each test that computes runs once per
runnable variant, forced one by one): compute the documented format (GGUF-style weight
blocks, activations quantized per row and per 32 values to int8) to float32 rounding; give
every row the same bits whatever else is in the batch; attend each row over exactly its own
positions; refuse bad input with a message instead of reading out of bounds. Across variants
they must give the same bits (tests/model/test_kernel_variants.py).
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from m4d.model import kernels
from m4d.model.block_linear import q4_1_from_float, q4_1_linear, q8_0_from_float, q8_0_linear
from m4d.model.qtensors import dequantize_q4_1, dequantize_q8_0, pack_int4

# The kernels build for every x86-64 and AArch64 CPU (a scalar variant at least): they must
# load here, so a broken build fails instead of skipping.
assert kernels.load(), "the m4 kernels did not build or load: run 'python -m m4d.model.kernels build'"


@pytest.fixture(params=kernels.runnable_variants())
def variant(request: pytest.FixtureRequest) -> Iterator[str]:
    """Runs a test once per kernel variant this CPU can execute, forced one by one."""
    before = kernels.variant()
    assert kernels.select(request.param) == request.param
    yield request.param
    kernels.select(before)


def _quantize_activations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The kernels' activation format, in float32 as they compute it: per row and block of 32,
    xd = absmax / 127, s = x * (1 / xd) and two int8 digits hi = round(s), lo = round((s - hi)
    * 254), rounding half to even; returns (hi + lo / 254, xd, the block's float sum)."""
    m, k = x.shape
    xb = x.float().reshape(m, k // 32, 32)
    xd = xb.abs().amax(-1) / 127.0
    inv = torch.where(xd > 0, 1.0 / xd, torch.zeros_like(xd))
    s = xb * inv[..., None]
    hi = torch.round(s)
    lo = torch.round((s - hi) * 254.0)
    assert hi.abs().max() <= 127 and lo.abs().max() <= 127
    return hi.double() + lo.double() / 254.0, xd.double(), xb.double().sum(-1)


def _q4_1_reference(x: torch.Tensor, q: np.ndarray, d: np.ndarray, mn: np.ndarray) -> torch.Tensor:
    """sum over blocks of d * xd * sum(q * xq) + m * sum(x), in float64."""
    xq, xd, xs = _quantize_activations(x)
    n, k = q.shape
    wq = torch.from_numpy(q.astype(np.float64)).reshape(n, k // 32, 32)
    isum = torch.einsum("mbk,nbk->mnb", xq, wq)  # exact integers
    dd, mm = (torch.from_numpy(a.astype(np.float64)) for a in (d, mn))
    return (isum * dd[None] * xd[:, None, :] + mm[None] * xs[:, None, :]).sum(-1)


def _random_q4_1(n: int, k: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    q = rng.integers(0, 16, (n, k)).astype(np.uint8)
    d = (rng.random((n, k // 32)) * 0.02 + 1e-3).astype(np.float16)
    mn = (-rng.random((n, k // 32)) * 0.15).astype(np.float16)
    return q, d, mn


@pytest.mark.parametrize("n,k", [(16, 32), (96, 128), (48, 576)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_q4_1_linear_computes_its_format(n: int, k: int, dtype: torch.dtype, variant: str) -> None:
    q, d, mn = _random_q4_1(n, k, seed=n + k)
    lin = q4_1_linear(torch.from_numpy(pack_int4(q)), torch.from_numpy(d), torch.from_numpy(mn))
    x = torch.randn(70, k, generator=torch.Generator().manual_seed(1)).to(dtype)  # > one row chunk
    x[3] = 0.0  # an all-zero row quantizes to zeros with scale 0
    x[5, :32] = 0.0  # and so does an all-zero block
    ref = _q4_1_reference(x, q, d, mn)
    y32 = torch.ops.m4.block_linear(x, lin.weight, lin.sc, lin.kind_code, n, k, torch.float32)
    torch.testing.assert_close(y32.double(), ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
    got = lin(x)  # in x's dtype: the float32 result rounded once, to nearest even
    assert got.dtype == dtype and got.shape == (70, n)
    assert torch.equal(got, y32.to(dtype))


def test_q4_1_linear_multiplies_by_the_stored_weights(variant: str) -> None:
    """Packing keeps every weight: with activations that quantize exactly (integers up to 127
    in each block, one of them 127), the result is x @ dequantize_q4_1(...)^T."""
    q, d, mn = _random_q4_1(64, 256, seed=3)
    qweight = torch.from_numpy(pack_int4(q))
    lin = q4_1_linear(qweight, torch.from_numpy(d), torch.from_numpy(mn))
    g = torch.Generator().manual_seed(4)
    x = torch.randint(-127, 128, (9, 256), generator=g).float()
    x.view(9, 8, 32)[:, :, 0] = 127.0
    w = dequantize_q4_1(qweight, torch.from_numpy(d), torch.from_numpy(mn)).double()
    torch.testing.assert_close(lin(x).double(), x.double() @ w.t(), rtol=1e-6, atol=1e-3)


def test_q8_0_linear_computes_its_format(variant: str) -> None:
    rng = np.random.default_rng(7)
    n, k = 80, 192
    q = rng.integers(-127, 128, (n, k)).astype(np.int8)
    d = (rng.random((n, k // 32)) * 0.01 + 1e-4).astype(np.float16)
    head = q8_0_linear(torch.from_numpy(q), torch.from_numpy(d), out_dtype=torch.float32)
    x = torch.randn(21, k, generator=torch.Generator().manual_seed(8)).to(torch.bfloat16)
    xq, xd, _ = _quantize_activations(x)
    wq = torch.from_numpy(q.astype(np.float64)).reshape(n, k // 32, 32)
    ref = (torch.einsum("mbk,nbk->mnb", xq, wq) * torch.from_numpy(d.astype(np.float64))[None]
           * xd[:, None, :]).sum(-1)
    got = head(x)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
    # the stored weights, exactly: integer activations with a 127 in every block
    xi = torch.randint(-127, 128, (5, k), generator=torch.Generator().manual_seed(9)).float()
    xi.view(5, k // 32, 32)[:, :, 3] = -127.0
    w = dequantize_q8_0(torch.from_numpy(q), torch.from_numpy(d)).double()
    torch.testing.assert_close(head(xi).double(), xi.double() @ w.t(), rtol=1e-6, atol=1e-3)


def test_q8_0_from_float_rounds_to_its_grid(variant: str) -> None:
    w = torch.randn(32, 64, generator=torch.Generator().manual_seed(2))
    head = q8_0_from_float(w)
    eye = torch.eye(64) * 127.0  # quantizes exactly: row j reads back column j, times 127
    back = head(eye).t() / 127.0
    assert (back - w).abs().max().item() <= w.abs().max().item() / 127.0 / 2 + 1e-6


@pytest.mark.parametrize("make", ["q4_1", "q8_0"])
def test_linears_are_batch_invariant(make: str, variant: str) -> None:
    """A row's bits never depend on the batch: alone, in any batch size, in any position."""
    k = 576
    if make == "q4_1":
        q, d, mn = _random_q4_1(48, k, seed=11)
        lin: torch.nn.Module = q4_1_linear(torch.from_numpy(pack_int4(q)), torch.from_numpy(d),
                                          torch.from_numpy(mn))
    else:
        lin = q8_0_from_float(torch.randn(48, k, generator=torch.Generator().manual_seed(11)))
    x = torch.randn(75, k, generator=torch.Generator().manual_seed(12)).to(torch.bfloat16)
    full = lin(x)
    alone = torch.cat([lin(x[i:i + 1]) for i in range(75)])
    assert torch.equal(full, alone)
    for size in (2, 7, 8, 9, 15, 16, 17, 64, 65):
        assert torch.equal(lin(x[:size]), full[:size]), size
    perm = torch.randperm(75, generator=torch.Generator().manual_seed(13))
    assert torch.equal(lin(x[perm]), full[perm])


def test_linears_refuse_bad_shapes(variant: str) -> None:
    q, d, mn = _random_q4_1(24, 64, seed=1)  # 24 output channels: not whole tiles of 16
    with pytest.raises(ValueError, match="out features % 16"):
        q4_1_linear(torch.from_numpy(pack_int4(q)), torch.from_numpy(d), torch.from_numpy(mn))
    q, d, mn = _random_q4_1(32, 64, seed=1)
    lin = q4_1_linear(torch.from_numpy(pack_int4(q)), torch.from_numpy(d), torch.from_numpy(mn))
    with pytest.raises(ValueError, match="expected last dim 64"):
        lin(torch.randn(3, 65))
    call = torch.ops.m4.block_linear
    with pytest.raises(RuntimeError, match="x must be float32 or bfloat16"):
        call(torch.randn(3, 64).half(), lin.weight, lin.sc, lin.kind_code, 32, 64, torch.float32)
    with pytest.raises(RuntimeError, match="contiguous uint8 with 1024 bytes"):
        call(torch.randn(3, 64), lin.weight[:-1], lin.sc, lin.kind_code, 32, 64, torch.float32)
    with pytest.raises(RuntimeError, match="scales must be contiguous Float with 128 values"):
        call(torch.randn(3, 64), lin.weight, lin.sc, kernels.WEIGHT_KINDS["q4_f32"], 32, 64, torch.float32)
    with pytest.raises(RuntimeError, match="unknown weight kind 9"):
        call(torch.randn(3, 64), lin.weight, lin.sc, 9, 32, 64, torch.float32)
    with pytest.raises(ValueError, match="Q8_0 needs int8"):
        q8_0_linear(torch.zeros(32, 64, dtype=torch.int16), torch.zeros(32, 2, dtype=torch.float16))
    assert lin(torch.randn(0, 64)).shape == (0, 32)


# --------------------------------------------------------------------------- attention


def _attention_reference(q, kc, vc, rows, pos, scale) -> torch.Tensor:
    b, h, dh = q.shape
    g = h // kc.shape[1]
    out = torch.empty(b, h, dh, dtype=torch.float64)
    for i in range(b):
        k = kc[rows[i], :, :pos[i] + 1].double().repeat_interleave(g, 0)  # [H, L, Dh]
        v = vc[rows[i], :, :pos[i] + 1].double().repeat_interleave(g, 0)
        s = torch.einsum("hd,hld->hl", q[i].double(), k) * scale
        out[i] = torch.einsum("hl,hld->hd", s.softmax(-1), v)
    return out


@pytest.mark.parametrize("dh,h,hkv", [(64, 9, 3), (32, 4, 4), (128, 8, 2)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_attention_attends_each_row_over_its_own_positions(dh, h, hkv, dtype, variant: str) -> None:
    g = torch.Generator().manual_seed(dh + h)
    slots, t_max = 6, 50  # t_max not a multiple of 16: the tail block must not read past it
    kc = torch.randn(slots, hkv, t_max, dh, generator=g).to(dtype)
    vc = torch.randn(slots, hkv, t_max, dh, generator=g).to(dtype)
    q = (torch.randn(7, h, dh, generator=g) * 2).to(dtype)
    rows = torch.tensor([5, 0, 3, 1, 2, 4, 5])
    pos = torch.tensor([0, 15, 16, 17, 49, 31, 33])  # lengths around the 16-position blocks
    scale = dh**-0.5
    got = torch.ops.m4.decode_attention(q, kc, vc, rows, pos, scale)
    ref = _attention_reference(q, kc, vc, rows, pos, scale)
    assert got.dtype == dtype and got.shape == q.shape
    tol = 1e-5 if dtype == torch.float32 else 1e-2  # bf16: the output is rounded once
    torch.testing.assert_close(got.double(), ref, rtol=tol, atol=tol)
    # positions past a row's own are never read: poisoning them changes nothing
    kp, vp = kc.clone(), vc.clone()
    for r, p in zip(rows.tolist(), pos.tolist(), strict=True):
        if r != 5:  # slot 5 serves two rows with different lengths
            kp[r, :, p + 1:] = float("nan")
            vp[r, :, p + 1:] = float("inf")
    assert torch.equal(torch.ops.m4.decode_attention(q, kp, vp, rows, pos, scale), got)
    # and each row's bits do not depend on the others in the batch
    alone = torch.cat([torch.ops.m4.decode_attention(q[i:i + 1], kc, vc, rows[i:i + 1],
                                                     pos[i:i + 1], scale) for i in range(7)])
    assert torch.equal(alone, got)


def test_decode_attention_refuses_bad_input(variant: str) -> None:
    kc = torch.zeros(2, 1, 8, 64, dtype=torch.bfloat16)
    q = torch.zeros(1, 2, 64, dtype=torch.bfloat16)
    one = torch.tensor([0])
    call = torch.ops.m4.decode_attention
    with pytest.raises(RuntimeError, match="position 8 out of range"):
        call(q, kc, kc, one, torch.tensor([8]), 0.125)
    with pytest.raises(RuntimeError, match="cache row 2 out of range"):
        call(q, kc, kc, torch.tensor([2]), one, 0.125)
    with pytest.raises(RuntimeError, match="one entry per query"):
        call(q, kc, kc, torch.tensor([0, 1]), one, 0.125)
    with pytest.raises(RuntimeError, match="head dim"):
        call(torch.zeros(1, 2, 48), torch.zeros(2, 1, 8, 48), torch.zeros(2, 1, 8, 48), one, one, 0.1)
    with pytest.raises(RuntimeError, match="must be contiguous"):
        call(q, kc.transpose(2, 3).contiguous().transpose(2, 3), kc, one, one, 0.125)


# --------------------------------------------------------------------------- the build


def test_decode_layers_refuses_bad_input(variant: str) -> None:
    d, h, hkv, dh, ffn, slots, t = 64, 2, 1, 32, 64, 2, 8
    lin = [q4_1_from_float(torch.randn(n, k)) for n, k in
           [((h + 2 * hkv) * dh, d), (d, h * dh), (2 * ffn, d), (d, ffn)]]
    cache = [torch.zeros(slots, hkv, t, dh, dtype=torch.bfloat16) for _ in range(2)]
    layer = [torch.ones(d), lin[0].weight, lin[0].sc, lin[1].weight, lin[1].sc, torch.ones(d),
             lin[2].weight, lin[2].sc, lin[3].weight, lin[3].sc, *cache]
    kinds = [m.kind_code for m in lin]
    x, rows, pos = torch.randn(2, d), torch.tensor([0, 1]), torch.tensor([3, 7])
    cos, sin = torch.ones(2, dh), torch.zeros(2, dh)

    def call(**change: object) -> torch.Tensor:
        args = dict(x=x, layers=layer, kinds=kinds, rows=rows, pos=pos, cos=cos, sin=sin)
        args.update(change)
        return torch.ops.m4.decode_layers(args["x"], args["layers"], args["kinds"], args["rows"], args["pos"],
                                          args["cos"], args["sin"], h, hkv, 1e-5, dh**-0.5, [], None)

    assert call().shape == (2, d)
    assert cache[0][1, 0, 7].abs().sum() > 0  # row 1 wrote its key at position 7
    with pytest.raises(RuntimeError, match="12 tensors per layer"):
        call(layers=layer[:11])
    with pytest.raises(RuntimeError, match="kinds must hold 4 per layer"):
        call(kinds=kinds[:3])
    with pytest.raises(RuntimeError, match="the packed weight must be contiguous uint8"):
        call(kinds=[kinds[0], kernels.WEIGHT_KINDS["q8_f16"], *kinds[2:]])
    with pytest.raises(RuntimeError, match="cache row 2 out of range"):
        call(rows=torch.tensor([0, 2]))
    with pytest.raises(RuntimeError, match="position 8 out of range"):
        call(pos=torch.tensor([0, 8]))
    with pytest.raises(RuntimeError, match="x must be float32"):
        call(x=x.bfloat16())
    with pytest.raises(RuntimeError, match="cos and sin"):
        call(cos=torch.ones(3, dh))
    with pytest.raises(RuntimeError, match="norms must be"):
        call(layers=[torch.ones(d + 1), *layer[1:]])


def test_build_is_atomic_and_a_failed_compile_leaves_nothing(tmp_path: Path) -> None:
    env = dict(os.environ, CXX="false")  # a "compiler" that always fails
    code = ("import sys; from pathlib import Path; from m4d.model import kernels\n"
            "try:\n    kernels.build(Path(sys.argv[1]))\nexcept RuntimeError as e:\n"
            "    print('refused:', str(e).splitlines()[0])\n")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], env=env,
                         capture_output=True, text=True, check=True).stdout
    assert out.startswith("refused: compiling ") and " failed" in out
    assert list(tmp_path.iterdir()) == []  # no partial library, no temporary file


def test_the_built_library_can_be_loaded_by_another_user() -> None:
    # the installed daemon runs as its own user (systemd/m4d.service), not as the builder
    path = kernels.find_library()
    assert path is not None
    assert path.stat().st_mode & 0o555 == 0o555, oct(path.stat().st_mode)


def test_library_name_follows_the_source(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    name = kernels.library_name()
    changed = tmp_path / "csrc"
    changed.mkdir()
    for src in kernels.sources():
        (changed / src.name).write_bytes(src.read_bytes())
    with open(changed / "kernels_impl.h", "ab") as f:
        f.write(b"\n// changed\n")
    monkeypatch.setattr(kernels, "SOURCE_DIR", changed)
    assert kernels.library_name() != name  # a stale build is never found for new source
    assert kernels.find_library() is None or kernels.find_library().name != name


# --------------------------------------------------------------------------- threads


def test_kernel_threads_give_the_same_bits(variant: str) -> None:
    """The pool splits loops over output tiles and attention rows, never inside a sum, so the
    numbers do not depend on the thread count; concurrent callers each get whole results."""
    q, d, mn = _random_q4_1(256, 576, seed=21)
    lin = q4_1_linear(torch.from_numpy(pack_int4(q)), torch.from_numpy(d), torch.from_numpy(mn))
    x = torch.randn(33, 576, generator=torch.Generator().manual_seed(22)).to(torch.bfloat16)
    kc = torch.randn(4, 3, 40, 64, generator=torch.Generator().manual_seed(23)).to(torch.bfloat16)
    qa = torch.randn(9, 9, 64, generator=torch.Generator().manual_seed(24)).to(torch.bfloat16)
    rows, pos = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3, 0]), torch.tensor([39, 1, 17, 5, 0, 33, 16, 15, 9])
    before = kernels.set_threads(1)
    try:
        assert before == 1 and torch.ops.m4.get_threads() == 1
        one = (lin(x), torch.ops.m4.decode_attention(qa, kc, kc, rows, pos, 0.125))
        assert kernels.set_threads(3) == 3
        for _ in range(3):
            three = (lin(x), torch.ops.m4.decode_attention(qa, kc, kc, rows, pos, 0.125))
            assert all(torch.equal(a, b) for a, b in zip(one, three, strict=True))
        results: list[torch.Tensor] = []

        def call() -> None:
            for _ in range(20):
                results.append(lin(x))

        workers = [threading.Thread(target=call) for _ in range(3)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        assert len(results) == 60 and all(torch.equal(r, one[0]) for r in results)
        with pytest.raises(RuntimeError, match="kernel threads must be in"):
            torch.ops.m4.set_threads(0)
    finally:
        kernels.set_threads(0)


def test_a_forked_child_runs_the_kernels_alone_and_exits_cleanly() -> None:
    """Helper threads do not survive fork: the child must compute without them (not wait for
    them) and exit normally, and the parent's pool must keep working."""
    code = """if True:
        import os, sys, torch
        from m4d.model import kernels
        from m4d.model.block_linear import q4_1_from_float
        assert kernels.set_threads(2) == 2
        lin = q4_1_from_float(torch.randn(256, 576))
        x = torch.randn(16, 576)
        ref = lin(x)
        pid = os.fork()
        if pid == 0:
            ok = torch.equal(lin(x), ref) and kernels.set_threads(2) == 2 and torch.equal(lin(x), ref)
            sys.exit(0 if ok else 3)
        _, status = os.waitpid(pid, 0)
        print(os.waitstatus_to_exitcode(status), torch.equal(lin(x), ref))
    """
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["0", "True"]
