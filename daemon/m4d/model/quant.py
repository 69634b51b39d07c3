"""Weight-only quantized linear layers and the GGUF block codecs (model-loading stage).

Two roles:

* Codecs between GGUF's raw quant blocks and the lossless tensors stored in our
  firmware image (used by the image builder's importer and by the loader):

  - Q4_1: 32 weights per block, fp16 scale ``d`` and fp16 min ``m``; ``w = q * d + m`` with
    ``q`` in 0..15. In a GGUF block ``qs[j]`` holds element ``j`` in its low nibble and
    element ``j + 16`` in its high nibble. We store ``qweight`` uint8 [N, K/2] in *sequential*
    order instead: byte ``i`` of a row holds element ``2i`` in its low nibble and element
    ``2i + 1`` in its high nibble (``gguf_blocks.NIBBLE_ORDER``), plus ``scales``/``mins`` fp16 [N, K/32].
  - Q8_0: 32 weights per block, fp16 scale; ``w = q * d``, ``q`` int8. Stored as ``qweight``
    int8 [N, K] and ``scales`` fp16 [N, K/32].

* ``nn.Module`` linears backed by torch's CPU weight-only kernels:

  - ``Int4WeightOnlyLinear``: ``aten._weight_int4pack_mm_for_cpu`` with group size 32. Torch
    dequantizes ``(q - 8) * scale + zero``, so Q4_1 maps exactly with ``scale = d`` and
    ``zero = m + 8 d``; only scale/zero are rounded to the activation dtype (bf16 in practice:
    8 significant bits instead of fp16's 11; relative error <= 2^-9 per group constant).
  - ``Int8WeightOnlyLinear``: ``aten._weight_int8pack_mm``, per-output-channel symmetric.

  Both are fast only with bf16 activations (12-27x slower with fp32 on this CPU), and both
  cost in proportion to the rows of ``x``: they do not reuse a weight across rows, so a decode
  batch of 16 sequences costs about 6x one sequence.

* ``Int8DynamicLinear`` (weight format ``w8a8``): int8 weights per output channel and
  activations quantized per row at run time into two int8 digits, one integer GEMM with
  exact int32 sums (oneDNN's packed VNNI kernel on x86). It reuses each weight across the
  batch, and it is batch invariant by construction (see the class). Where the CPU's int8
  GEMM is not exact (oneDNN without VNNI) it refuses to load (``int8_gemm_path``).

* ``BlockLinear`` (weight format ``w4a8``): the checkpoint's blocks exactly as stored (GGUF
  Q4_0, Q4_1, Q4_K, Q5_0, Q5_K, Q6_K, Q8_0; ``q4_1_linear``, ``q8_0_linear``,
  ``q8_1_linear`` pack them), times activations quantized per row and per 32 values to two
  int8 digits, in m4's own kernels (``m4d.model.kernels``: one variant per instruction set,
  the same numbers on each): each weight tile is reused across the batch, sums are exact in
  int32, and rows never share a reduction.
"""

import functools
import logging
import platform
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from torch import nn

from m4d.model import kernels

Q4_1_GROUP = 32
Q4_1_BLOCK_BYTES = 20  # fp16 d, fp16 m, 16 bytes of nibbles
Q8_0_GROUP = 32
Q8_0_BLOCK_BYTES = 34  # fp16 d, 32 int8
INT4_INNER_K_TILES = 2
LO_RADIX = 254.0  # w8a8: the second activation digit's weight (see Int8DynamicLinear)

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- Q4_1 codec


def split_q4_1_blocks(raw: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """GGUF Q4_1 bytes uint8 [N, K/32*20] -> (qweight uint8 [N, K/2], scales fp16, mins fp16)."""
    if raw.dtype != np.uint8 or raw.ndim != 2 or raw.shape[1] % Q4_1_BLOCK_BYTES:
        raise ValueError(f"not a Q4_1 byte matrix: dtype {raw.dtype}, shape {raw.shape}")
    n = raw.shape[0]
    blocks = raw.reshape(n, -1, Q4_1_BLOCK_BYTES)  # [N, G, 20]
    scales = blocks[:, :, 0:2].copy().view(np.float16).reshape(n, -1)  # [N, G]
    mins = blocks[:, :, 2:4].copy().view(np.float16).reshape(n, -1)  # [N, G]
    qs = blocks[:, :, 4:]  # [N, G, 16]
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=2)  # [N, G, 32] in element order
    return pack_int4(q.reshape(n, -1)), scales, mins


def pack_int4(q: np.ndarray) -> np.ndarray:
    """Values 0..15 [N, K] -> uint8 [N, K/2] in ``NIBBLE_ORDER``."""
    q = q.astype(np.uint8)
    packed: np.ndarray = (q[:, 0::2] | (q[:, 1::2] << 4)).astype(np.uint8)
    return packed


def unpack_int4(qweight: torch.Tensor) -> torch.Tensor:
    """uint8 [N, K/2] in ``NIBBLE_ORDER`` -> int32 [N, K] with values 0..15.

    Done in numpy: small element-wise torch ops go through the intra-op thread pool, which on a
    busy 2-core machine made loading several times slower.
    """
    packed = qweight.contiguous().numpy()
    q = np.empty((packed.shape[0], packed.shape[1] * 2), dtype=np.int32)
    q[:, 0::2] = packed & 0x0F
    q[:, 1::2] = packed >> 4
    return torch.from_numpy(q)


def dequantize_q4_1(qweight: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor) -> torch.Tensor:
    """Stored Q4_1 tensors -> float32 [N, K] (exact: fp16 * small int + fp16 in fp32)."""
    q = unpack_int4(qweight).numpy().astype(np.float32)  # [N, K]
    n, k = q.shape
    g = q.reshape(n, k // Q4_1_GROUP, Q4_1_GROUP)
    g *= scales.numpy().astype(np.float32)[:, :, None]
    g += mins.numpy().astype(np.float32)[:, :, None]
    return torch.from_numpy(g.reshape(n, k))


# --------------------------------------------------------------------------- Q8_0 codec


def split_q8_0_blocks(raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """GGUF Q8_0 bytes uint8 [N, K/32*34] -> (qweight int8 [N, K], scales fp16 [N, K/32])."""
    if raw.dtype != np.uint8 or raw.ndim != 2 or raw.shape[1] % Q8_0_BLOCK_BYTES:
        raise ValueError(f"not a Q8_0 byte matrix: dtype {raw.dtype}, shape {raw.shape}")
    n = raw.shape[0]
    blocks = raw.reshape(n, -1, Q8_0_BLOCK_BYTES)  # [N, G, 34]
    scales = blocks[:, :, 0:2].copy().view(np.float16).reshape(n, -1)
    qweight = blocks[:, :, 2:].copy().view(np.int8).reshape(n, -1)
    return qweight, scales


def dequantize_q8_0(qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Stored Q8_0 tensors (a scale per 32 values, or per 16 as from Q6_K) -> float32 [N, K]."""
    n, k = qweight.shape
    group = k // scales.shape[1]
    g = qweight.contiguous().numpy().astype(np.float32).reshape(n, k // group, group)
    g *= scales.numpy().astype(np.float32)[:, :, None]
    return torch.from_numpy(g.reshape(n, k))


# --------------------------------------------------------------------------- linears


def _with_last_dim(x: torch.Tensor, last: int) -> list[int]:
    """x's shape with the last dim replaced (written for TorchScript: no starred lists)."""
    shape = list(x.shape[:-1])
    shape.append(last)
    return shape


def _check_2d_in(x: torch.Tensor, in_features: int) -> torch.Tensor:
    if x.shape[-1] != in_features:
        raise ValueError(f"expected last dim {in_features}, got shape {list(x.shape)}")
    return x.reshape(-1, in_features).contiguous()


class Int4WeightOnlyLinear(nn.Module):
    """y = x @ W^T with W in torch's packed int4 layout, group-wise asymmetric (no bias)."""

    weight_packed: torch.Tensor  # opaque uint8, from _convert_weight_to_int4pack_for_cpu
    scales_and_zeros: torch.Tensor  # [K/G, N, 2] in the activation dtype

    def __init__(
        self, q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, *,
        group_size: int = Q4_1_GROUP, dtype: torch.dtype = torch.bfloat16,
    ) -> None:
        """q: int values 0..15 [N, K]; scales, zeros: [N, K/G] (torch: (q - 8) * s + z)."""
        super().__init__()
        n, k = q.shape
        if k % group_size or scales.shape != (n, k // group_size) or zeros.shape != scales.shape:
            raise ValueError(
                f"int4 shapes do not fit: q {tuple(q.shape)}, scales {tuple(scales.shape)}, "
                f"zeros {tuple(zeros.shape)}, group {group_size}"
            )
        self.in_features, self.out_features, self.group_size = k, n, group_size
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(
            q.to(torch.int32).contiguous(), INT4_INNER_K_TILES
        )
        sz = torch.stack([scales.t(), zeros.t()], dim=-1).to(dtype).contiguous()  # [K/G, N, 2]
        self.register_buffer("weight_packed", packed)
        self.register_buffer("scales_and_zeros", sz)

    @classmethod
    def from_q4_1(
        cls, qweight: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor, *,
        dtype: torch.dtype = torch.bfloat16,
    ) -> "Int4WeightOnlyLinear":
        """Exact mapping of stored Q4_1 (``NIBBLE_ORDER``) onto torch's layout."""
        d = scales.numpy().astype(np.float32)  # [N, K/32]
        zeros = mins.numpy().astype(np.float32) + 8.0 * d  # torch: (q - 8) * d + zero
        return cls(unpack_int4(qweight), torch.from_numpy(d), torch.from_numpy(zeros),
                   group_size=Q4_1_GROUP, dtype=dtype)

    @classmethod
    def from_float(
        cls, weight: torch.Tensor, *, group_size: int = Q4_1_GROUP,
        dtype: torch.dtype = torch.bfloat16,
    ) -> "Int4WeightOnlyLinear":
        """Quantize a dense [N, K] weight: per-group min/max, 16 levels (a lossy step)."""
        n, k = weight.shape
        w = weight.to(torch.float32).reshape(n, k // group_size, group_size)
        lo = w.amin(dim=-1)
        hi = w.amax(dim=-1)
        scale = ((hi - lo) / 15.0).clamp(min=1e-8)  # [N, K/G]
        q = torch.round((w - lo[..., None]) / scale[..., None]).clamp(0, 15)
        return cls(q.reshape(n, k), scale, lo + 8.0 * scale, group_size=group_size, dtype=dtype)

    def dequantized(self) -> torch.Tensor:
        """The dense float32 [N, K] weight this module multiplies by (for tests)."""
        eye = torch.eye(self.in_features, dtype=self.scales_and_zeros.dtype)
        return self.forward(eye).to(torch.float32).t().contiguous()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [..., K] -> [..., N]
        x2 = _check_2d_in(x, self.in_features).to(self.scales_and_zeros.dtype)
        y: torch.Tensor = torch.ops.aten._weight_int4pack_mm_for_cpu(
            x2, self.weight_packed, self.group_size, self.scales_and_zeros
        )
        return y.view(_with_last_dim(x, self.out_features))


class Int8WeightOnlyLinear(nn.Module):
    """y = (x @ Wq^T) * scale[n]: int8 weights, one symmetric scale per output channel."""

    weight: torch.Tensor  # int8 [N, K]
    scales: torch.Tensor  # [N] in the activation dtype

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor, *,
                 dtype: torch.dtype = torch.bfloat16) -> None:
        super().__init__()
        if qweight.dtype != torch.int8 or scales.shape != (qweight.shape[0],):
            raise ValueError(
                f"int8 linear needs int8 [N, K] and [N] scales, got {qweight.dtype} "
                f"{tuple(qweight.shape)} and {tuple(scales.shape)}"
            )
        self.out_features, self.in_features = qweight.shape
        self.register_buffer("weight", qweight.contiguous())
        self.register_buffer("scales", scales.to(dtype).contiguous())

    @classmethod
    def from_float(cls, weight: torch.Tensor, *, dtype: torch.dtype = torch.bfloat16) -> "Int8WeightOnlyLinear":
        q, scale = quantize_rows_int8(weight.to(torch.float32))
        return cls(q, scale, dtype=dtype)

    def dequantized(self) -> torch.Tensor:
        """The dense float32 [N, K] weight this module multiplies by (for tests)."""
        return self.weight.to(torch.float32) * self.scales.to(torch.float32)[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [..., K] -> [..., N]
        x2 = _check_2d_in(x, self.in_features).to(self.scales.dtype)
        y: torch.Tensor = torch.ops.aten._weight_int8pack_mm(x2, self.weight, self.scales)
        return y.view(_with_last_dim(x, self.out_features))


class Int8GemmError(RuntimeError):
    """The w8a8 integer GEMM gives wrong sums on this CPU (see int8_gemm_path)."""


def int8_gemm_path(packed: bool | None = None) -> bool:
    """The w8a8 GEMM to run: oneDNN's packed int8 linear (True) or ``torch._int_mm`` (False).

    A path is used only if it gives exact integer sums here, checked once per process
    (``int8_gemm_error``). ``packed`` None prefers the packed path where there is one and
    falls back, with a warning, to the other when only that one is exact. Raises
    Int8GemmError when the path asked for, or every path, is wrong.

    Both paths are oneDNN on x86, and on a CPU without VNNI (AVX2, or AVX-512 without VNNI;
    ``ONEDNN_MAX_CPU_ISA=AVX2`` makes any x86 CPU one) oneDNN multiplies u8 by s8 with
    ``vpmaddubsw``, which saturates the sum of each pair of products to int16: our digits go
    in as u8 up to 255 (digit + 128), so 255 * 127 * 2 = 64770 overflows 32767. The
    torch 2.13 outputs equal that saturating arithmetic bit for bit (relative errors
    0.13-0.32 on the test layers); with VNNI (``vpdpbusd``, no 16-bit step) they are exact.
    """
    if packed is None:
        return _auto_int8_gemm_path()
    error = int8_gemm_error(packed)
    if error > INT8_GEMM_TOLERANCE:
        raise Int8GemmError(_int8_gemm_message({packed: error}))
    return packed


INT8_GEMM_TOLERANCE = 2.0 ** -24  # the check's sums are below 2**24: exact even in float32


@functools.cache
def _auto_int8_gemm_path() -> bool:
    paths = [True, False] if onednn_int8_available() else [False]
    errors = {p: int8_gemm_error(p) for p in paths}
    for p in paths:
        if errors[p] <= INT8_GEMM_TOLERANCE:
            if p != paths[0]:
                log.warning("w8a8: oneDNN's packed int8 GEMM gives wrong sums on this CPU "
                            "(relative error %.2g); using torch._int_mm, which is exact here",
                            errors[paths[0]])
            return p
    raise Int8GemmError(_int8_gemm_message(errors))


def _int8_gemm_message(errors: dict[bool, float]) -> str:
    paths = ", ".join(f"{'oneDNN packed' if p else 'torch._int_mm'} {e:.2g}"
                      for p, e in errors.items())
    return (f"the w8a8 int8 GEMM gives wrong sums (relative error: {paths}; torch CPU "
            f"capability {torch.backends.cpu.get_cpu_capability()}; oneDNN without VNNI "
            "saturates pairs of u8*s8 products to int16): use weight_format \"w4a8\" (m4's "
            "kernels, exact on every CPU) instead")


@functools.cache
def int8_gemm_error(packed: bool) -> float:
    """The w8a8 GEMM path's largest error on fixed digit and weight matrices, relative to
    the largest exact sum (0.0 where it is exact). Full-range digits and weights, rows of
    +-127 among them, at a decode shape (2 digit rows) and a batch shape: every pair of
    products that can overflow 16 bits does somewhere."""
    g = torch.Generator().manual_seed(8)
    worst = 0.0
    for m, k, n in ((2, 64, 32), (34, 96, 48)):
        q = torch.randint(-127, 128, (m, k), generator=g).to(torch.float32)  # digits
        w = torch.randint(-127, 128, (n, k), generator=g).to(torch.int8)
        q[0], q[-1], w[0], w[1] = 127, -127, 127, -127
        exact = q.double() @ w.double().t()  # [M, N], before _int8_gemm overwrites q
        weight = (torch.ops.onednn.qlinear_prepack(w, None) if packed
                  else w.t())  # as Int8DynamicLinear holds it
        got = _int8_gemm(q, weight, torch.ones(n), torch.zeros(n, dtype=torch.int64), packed)
        worst = max(worst, float((got.double() - exact).abs().max() / exact.abs().max()))
    return worst


def _int8_gemm(q: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor,
               zero_points: torch.Tensor, packed: bool) -> torch.Tensor:
    """Integer digits held in float32 [M, K] (|q| <= 127; q is overwritten) times the int8
    weight (oneDNN-packed, or a [K, N] view) -> float32 [M, N]: each int32 sum times
    scales[n]."""
    if packed:
        y: torch.Tensor = torch.ops.onednn.qlinear_pointwise(
            q.add_(128).to(torch.uint8), 1.0, 128, weight, scales,
            zero_points, None, 1.0, 0, torch.float32, "none", [], "")
    else:
        y = torch._int_mm(q.to(torch.int8), weight).to(torch.float32) * scales
    return y


class Int8DynamicLinear(nn.Module):
    """The ``w8a8`` linear: int8 weights per output channel, activations quantized per row at
    run time, integer GEMM with exact int32 sums.

    Each activation row is written as two int8 digits, ``x = s * (hi + lo / LO_RADIX)`` with
    ``s = absmax / 127``: one digit alone (plain per-token int8) costs SmolLM2-135M a mean KL
    of 0.050 against its float32 reference, ten times the int8 weights' own 0.005; with two
    it is 0.005. Both digit rows go through one GEMM, so the weight is read once per call.

    Against int4 (bench/README.md): prefill ~1.5x faster and 16-32 concurrent streams
    1.1-1.3x faster, one stream 0.67x.

    Batch invariance holds by construction: a row's scale and digits depend on that row only,
    integer sums are exact in any order and the float scaling is per element, so a sequence
    gets bit-identical logits alone or beside any others (the weight-only kernels above are
    invariant too, but cost in proportion to the rows).

    On x86 the weight is packed once for oneDNN's int8 GEMM (``onednn::qlinear_prepack``; the
    digits go in as uint8 with zero point 128, and oneDNN scales the exact int32 sums by
    ``s_w`` in float32). ``torch._int_mm`` gives the same numbers (tested) but reorders the
    weight on every call, 1.3-1.6x slower over the model's 120 linears; it is the path
    elsewhere. Neither is exact on every CPU: the first layer built checks its path once
    (``int8_gemm_path``) and a wrong one raises Int8GemmError instead of serving numbers.
    """

    weight: torch.Tensor  # int8 [N, K], or oneDNN's packed layout of it
    scales: torch.Tensor  # float32 [N]
    zero_points: torch.Tensor  # int64 [N] zeros (oneDNN's weight zero points)

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor, *,
                 dtype: torch.dtype = torch.bfloat16, packed: bool | None = None) -> None:
        super().__init__()
        if qweight.dtype != torch.int8 or qweight.dim() != 2 or scales.shape != (qweight.shape[0],):
            raise ValueError(
                f"w8a8 linear needs int8 [N, K] and [N] scales, got {qweight.dtype} "
                f"{tuple(qweight.shape)} and {tuple(scales.shape)}"
            )
        self.out_features, self.in_features = qweight.shape
        self.dtype = dtype
        self.lo_radix = LO_RADIX  # an attribute: TorchScript does not read float globals
        self.packed = int8_gemm_path(packed)  # Int8GemmError where the sums are wrong
        if self.packed:  # the packed copy replaces the plain weight (no second copy kept)
            weight = torch.ops.onednn.qlinear_prepack(qweight.contiguous(), None)
        else:
            weight = qweight.contiguous().t()  # [K, N] view: _int_mm's right operand
        self.register_buffer("weight", weight)
        self.register_buffer("scales", scales.to(torch.float32).contiguous())
        self.register_buffer("zero_points", torch.zeros(self.out_features, dtype=torch.int64),
                             persistent=False)

    @classmethod
    def from_float(cls, weight: torch.Tensor, *, dtype: torch.dtype = torch.bfloat16,
                   packed: bool | None = None) -> "Int8DynamicLinear":
        q, scale = quantize_rows_int8(weight.to(torch.float32))
        return cls(q, scale, dtype=dtype, packed=packed)

    def int8_weight(self) -> torch.Tensor:
        """The int8 [N, K] weight, read back through the GEMM when it is packed: row j of the
        identity quantizes to 127 at j, so each output is 127 * w[n, j] exactly, scaled."""
        if not self.packed:
            return self.weight.t().contiguous()
        eye = torch.eye(self.in_features, dtype=torch.float32)
        y = self._matmul(eye).to(torch.float64)  # [K, N] = w[n, j] * scales[n] (rounded)
        return torch.round(y / self.scales.double()).t().to(torch.int8).contiguous()

    def dequantized(self) -> torch.Tensor:
        """The dense float32 [N, K] weight (activations are quantized on top of it)."""
        return self.int8_weight().to(torch.float32) * self.scales[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [..., K] -> [..., N]
        y = self._matmul(_check_2d_in(x, self.in_features).to(torch.float32))
        return y.to(self.dtype).view(_with_last_dim(x, self.out_features))

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        """float32 [M, K] -> float32 [M, N]."""
        m = x.shape[0]
        # Two int8 digits per activation, as rows of one GEMM (the weight is read once):
        # x = s * (hi + lo / LO_RADIX), hi = round(x / s) in [-127, 127], |lo| <= 127.
        scale = x.abs().amax(dim=1, keepdim=True).clamp_(min=1e-30).div_(127.0)  # [M, 1]
        xs = x / scale
        hi = torch.round(xs)
        lo = torch.round(xs.sub_(hi).mul_(self.lo_radix))
        q = torch.cat([hi, lo])  # [2M, K], integers held in float32
        y = _int8_gemm(q, self.weight, self.scales, self.zero_points, self.packed)  # [2M, N]
        out: torch.Tensor = y[m:].div_(self.lo_radix).add_(y[:m]).mul_(scale)
        return out


class BlockLinear(nn.Module):
    """A linear over weights kept in GGUF-style blocks, times activations quantized at run
    time per row and per 32 values to two int8 digits: ``torch.ops.m4.block_linear`` (m4's
    kernels, ``m4d/model/kernels``; the variant for this CPU is picked at load).

    Each weight tile is unpacked once and reused across the batch's rows, block sums are exact
    in int32 and rows never share a reduction: batch invariant by construction, and the same
    bits on every kernel variant. ``kind`` says how the blocks are stored (WEIGHT_KINDS; the
    layouts are in kernels/csrc/variant.h): 4-bit with a scale and a min per 32 (GGUF Q4_0,
    Q4_1, Q4_K), signed 8-bit with a scale per 32 or 16 (Q8_0, Q5_0, Q6_K), unsigned bytes
    with a scale and a min per 32 (Q5_K).
    """

    weight: torch.Tensor  # uint8, the kernel's tile layout
    sc: torch.Tensor  # per tile and block: scales (then mins), float16 or float32

    def __init__(self, kind: str, weight: torch.Tensor, sc: torch.Tensor, out_features: int,
                 in_features: int, *, out_dtype: torch.dtype | None = None) -> None:
        super().__init__()
        if kind not in kernels.WEIGHT_KINDS:
            raise ValueError(f"unknown weight kind {kind!r}")
        self.kind, self.kind_code = kind, kernels.WEIGHT_KINDS[kind]
        self.in_features, self.out_features = in_features, out_features
        self.out_dtype: torch.dtype | None = out_dtype
        self.register_buffer("weight", weight)
        self.register_buffer("sc", sc)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [..., K] -> [..., N] in out_dtype (default: x's)
        x2 = _check_2d_in(x, self.in_features)
        out_dtype = self.out_dtype
        if out_dtype is None:
            out_dtype = x.dtype
        y: torch.Tensor = torch.ops.m4.block_linear(
            x2, self.weight, self.sc, self.kind_code, self.out_features, self.in_features,
            out_dtype)
        return y.view(_with_last_dim(x, self.out_features))


def q4_1_linear(qweight: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor, *,
                out_dtype: torch.dtype | None = None) -> BlockLinear:
    """4-bit weights with a scale and a min per 32 (``w = d * q + m``, q 0..15): GGUF's Q4_1
    and Q4_0 with float16 scales, Q4_K with float32 ones. The ``w4a8`` format's linears.
    qweight uint8 [N, K/2] in ``NIBBLE_ORDER``; scales, mins [N, K/32], fp16 or fp32."""
    n, k = qweight.shape[0], qweight.shape[1] * 2
    _check_tiles(n, k, "w4a8")
    if scales.shape != (n, k // Q4_1_GROUP) or mins.shape != scales.shape:
        raise ValueError(f"Q4_1 scales/mins must be [{n}, {k // Q4_1_GROUP}], got "
                         f"{tuple(scales.shape)}, {tuple(mins.shape)}")
    f32 = scales.dtype == torch.float32
    w, sc = pack_q4_1_tiles(qweight, scales, mins, np.float32 if f32 else np.float16)
    return BlockLinear("q4_f32" if f32 else "q4_f16", w, sc, n, k, out_dtype=out_dtype)


def q4_1_from_float(weight: torch.Tensor) -> BlockLinear:
    """Quantize a dense [N, K] weight to Q4_1 (per 32: min/max, 16 levels; lossy)."""
    n, k = weight.shape
    w = weight.to(torch.float32).reshape(n, k // Q4_1_GROUP, Q4_1_GROUP)
    lo, hi = w.amin(dim=-1), w.amax(dim=-1)
    d = ((hi - lo) / 15.0).to(torch.float16)  # the stored values are what we divide by
    df = d.to(torch.float32).clamp(min=1e-8)
    m = lo.to(torch.float16)
    q = torch.round((w - m.to(torch.float32)[..., None]) / df[..., None]).clamp(0, 15)
    packed = pack_int4(q.reshape(n, k).to(torch.uint8).numpy())
    return q4_1_linear(torch.from_numpy(packed), d, m)


def q8_0_linear(qweight: torch.Tensor, scales: torch.Tensor, *,
                out_dtype: torch.dtype | None = None) -> BlockLinear:
    """Signed 8-bit weights with a scale per 32 values (GGUF's Q8_0, Q5_0; float16 scales) or
    per 16 or 32 with float32 scales (Q6_K). The ``w4a8`` format's LM head (the checkpoint's
    tied embedding is Q8_0). qweight int8 [N, K] in [-127, 127]; scales [N, K/32] fp16 or
    fp32, or [N, K/16] fp32."""
    n, k = qweight.shape
    _check_tiles(n, k, "Q8_0")
    group = k // scales.shape[1] if scales.dim() == 2 and scales.shape[1] else 0
    f32 = scales.dtype == torch.float32
    if (qweight.dtype != torch.int8 or scales.shape[0] != n or group not in (16, 32)
            or k % group or (group == 16 and not f32)):
        raise ValueError(f"Q8_0 needs int8 [N, K] and fp16 [N, K/32] or fp32 [N, K/32 or "
                         f"K/16] scales, got {qweight.dtype} {tuple(qweight.shape)} and "
                         f"{scales.dtype} {tuple(scales.shape)}")
    w, sc = pack_q8_0_tiles(qweight, scales)
    kind = "q8_f32_g16" if group == 16 else "q8_f32" if f32 else "q8_f16"
    return BlockLinear(kind, w, sc, n, k, out_dtype=out_dtype)


def q8_0_from_float(weight: torch.Tensor, *, out_dtype: torch.dtype | None = None) -> BlockLinear:
    """Quantize a dense [N, K] weight to Q8_0 (per 32: absmax / 127; lossy)."""
    n, k = weight.shape
    w = weight.to(torch.float32).reshape(n, k // Q8_0_GROUP, Q8_0_GROUP)
    d = (w.abs().amax(dim=-1) / 127.0).to(torch.float16)
    inv = torch.where(d > 0, 1.0 / d.to(torch.float32), torch.zeros_like(d, dtype=torch.float32))
    q = torch.round(w * inv[..., None]).clamp(-127, 127).to(torch.int8)
    return q8_0_linear(q.reshape(n, k), d, out_dtype=out_dtype)


def q8_1_linear(qweight: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor, *,
                out_dtype: torch.dtype | None = None) -> BlockLinear:
    """Unsigned byte weights (0..127) with a float32 scale and min per 32 (GGUF's Q5_K) or per
    16 (any mix of Q4_K, Q5_K and Q6_K, see to_q8_1_g16)."""
    n, k = qweight.shape
    _check_tiles(n, k, "Q8_1")
    group = k // scales.shape[1] if scales.dim() == 2 and scales.shape[1] else 0
    if (qweight.dtype != torch.uint8 or group not in (16, 32) or scales.shape != (n, k // group)
            or mins.shape != scales.shape):
        raise ValueError(f"Q8_1 needs uint8 [N, K] and [N, K/32] or [N, K/16] scales and mins, "
                         f"got {qweight.dtype} {tuple(qweight.shape)}, {tuple(scales.shape)}")
    w, sc = pack_q8_1_tiles(qweight, scales, mins)
    return BlockLinear("q8u_f32" if group == 32 else "q8u_f32_g16", w, sc, n, k, out_dtype=out_dtype)


def to_q8_1_g16(tensors: tuple[torch.Tensor, ...], kind: str) -> tuple[torch.Tensor, ...] | None:
    """Stored blocks of any kind as unsigned bytes with a float32 scale and min per 16 values,
    exactly (None where that cannot be exact): 4-bit and unsigned kinds repeat their scale
    and min per half block; signed bytes q (Q5_0, Q6_K) become q + o with min -o*scale, o a
    power of two (so the product is exact) with q + o within 0..127."""
    def halves(a: torch.Tensor) -> torch.Tensor:
        a = a.to(torch.float32)
        return a if a.shape[1] * 16 == k else a.repeat_interleave(2, dim=1)
    if kind == "q4_1":
        q = unpack_int4(tensors[0]).to(torch.uint8)
    elif kind == "q8_1":
        q = tensors[0]
    else:
        q = None
    k = tensors[0].shape[1] * (2 if kind == "q4_1" else 1)
    if q is not None:
        return q, halves(tensors[1]), halves(tensors[2])
    qs, scales = tensors[0].to(torch.int16), halves(tensors[1])
    low = int(qs.min().item())
    offset = 1 << max(0, -low - 1).bit_length() if low < 0 else 0
    if int(qs.max().item()) + offset > 127:
        return None
    return (qs + offset).to(torch.uint8), scales, scales * -float(offset)


KERNEL_TILE = 16  # output channels per weight tile in the kernels (csrc/variant.h: kTile)


def _check_tiles(n: int, k: int, what: str) -> None:
    if n % KERNEL_TILE or k % Q4_1_GROUP:
        raise ValueError(f"{what} needs out features % {KERNEL_TILE} == 0 and in features % "
                         f"{Q4_1_GROUP} == 0, got [{n}, {k}]")


def _tile_scales(a: torch.Tensor, dtype: type, group: int = Q4_1_GROUP) -> np.ndarray:
    """[N, K/group] -> [tile, block, group split, 16] in `dtype` (a block is 32 values)."""
    v: np.ndarray = a.numpy().astype(dtype)
    n, g = v.shape
    per = Q4_1_GROUP // group
    return v.reshape(n // KERNEL_TILE, KERNEL_TILE, g // per, per).transpose(0, 2, 3, 1)


def pack_q4_1_tiles(qweight: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor,
                    dtype: type = np.float16) -> tuple[torch.Tensor, torch.Tensor]:
    """Stored Q4_1 -> the kernel's layout: per tile of 16 channels and block of 32 values, 4
    chunks of 64 bytes where chunk c, lane j, byte t holds q[j][8c + t] in its low nibble and
    q[j][8c + 4 + t] in its high nibble; and per tile and block 16 d then 16 m (`dtype`)."""
    q = unpack_int4(qweight).numpy().astype(np.uint8)  # [N, K]
    n, k = q.shape
    t, kb = n // KERNEL_TILE, k // Q4_1_GROUP
    q6 = q.reshape(t, KERNEL_TILE, kb, 4, 2, 4)  # [tile, j, block, c, nibble, t]
    packed = (q6[:, :, :, :, 0, :] | (q6[:, :, :, :, 1, :] << 4)).transpose(0, 2, 3, 1, 4)
    dm = np.concatenate([_tile_scales(scales, dtype), _tile_scales(mins, dtype)], axis=2)
    return (torch.from_numpy(np.ascontiguousarray(packed).reshape(-1)),
            torch.from_numpy(np.ascontiguousarray(dm).reshape(-1)))


def _pack_bytes(q: np.ndarray) -> np.ndarray:
    """[N, K] bytes -> per tile and block 8 chunks of 64: chunk g, lane j, byte t = q[j][4g + t]."""
    n, k = q.shape
    t, kb = n // KERNEL_TILE, k // Q8_0_GROUP
    return np.ascontiguousarray(q.reshape(t, KERNEL_TILE, kb, 8, 4).transpose(0, 2, 3, 1, 4)).reshape(-1)


def pack_q8_0_tiles(qweight: torch.Tensor, scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Stored Q8_0 -> the kernel's layout: bytes q + 128 (uint8: VNNI multiplies unsigned by
    signed bytes, and the activations are the signed side) in 64-byte chunks as _pack_bytes;
    per tile and block 16 scales (fp16, or fp32), or 2 x 16 for a scale per 16 values."""
    q = qweight.contiguous().numpy()
    if q.min(initial=0) < -127:
        raise ValueError("Q8_0 values must lie in [-127, 127]")
    k = q.shape[1]
    group = k // scales.shape[1]
    dtype = np.float32 if scales.dtype == torch.float32 else np.float16
    packed = _pack_bytes((q.astype(np.int16) + 128).astype(np.uint8))
    return (torch.from_numpy(packed),
            torch.from_numpy(np.ascontiguousarray(_tile_scales(scales, dtype, group)).reshape(-1)))


def pack_q8_1_tiles(qweight: torch.Tensor, scales: torch.Tensor,
                    mins: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Stored unsigned bytes (0..127) with a scale and min per 32 or 16 -> the kernel's layout:
    bytes as _pack_bytes; per tile and block the scales (16, or 2 x 16 per half block), then
    the mins alike (fp32). Bytes stay below 128 so every variant's byte products fit its int16
    pairs."""
    q = qweight.contiguous().numpy()
    if q.max(initial=0) > 127:
        raise ValueError("Q8_1 values must lie in [0, 127]")
    group = q.shape[1] // scales.shape[1]
    dm = np.concatenate([_tile_scales(scales, np.float32, group),
                         _tile_scales(mins, np.float32, group)], axis=2)
    return (torch.from_numpy(_pack_bytes(q)),
            torch.from_numpy(np.ascontiguousarray(dm).reshape(-1)))


def onednn_int8_available() -> bool:
    """oneDNN's packed int8 linear: x86 builds of torch with mkldnn."""
    return (bool(torch._C._has_mkldnn)
            and platform.machine().lower() in ("x86_64", "amd64")
            and hasattr(torch.ops.onednn, "qlinear_pointwise"))


def quantize_rows_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric absmax int8 per row of a float32 [M, K]: (q int8 [M, K], scale float32 [M])."""
    scale = (x.abs().amax(dim=1) / 127.0).clamp(min=1e-12)
    q = torch.round(x / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


# --------------------------------------------------------------------------- weight file


class WeightFile:
    """An mmap'd safetensors file in the image layout; tensors by HF-style base name.

    A base name ``X`` is stored as ``X`` (dense), ``X.qweight/.scales/.mins`` (Q4_1) or
    ``X.qweight/.scales`` (Q8_0).
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"weights file not found: {self.path}")
        handle: Any = safe_open(str(self.path), framework="pt", device="cpu")
        self._f = handle
        self._keys: set[str] = set(handle.keys())

    def __enter__(self) -> "WeightFile":
        return self

    def __exit__(self, *exc: object) -> None:
        self._f = None

    def kind(self, name: str) -> str:
        """"dense", "q4_1" (4-bit, scale and min per 32), "q8_0" (int8, scale per 32 or 16)
        or "q8_1" (unsigned bytes, scale and min per 32): told apart by the stored shapes."""
        if name in self._keys:
            return "dense"
        if f"{name}.qweight" in self._keys and f"{name}.mins" in self._keys:
            q, s = self.shape(f"{name}.qweight"), self.shape(f"{name}.scales")
            return "q8_1" if q[1] == Q4_1_GROUP * s[1] else "q4_1"
        if f"{name}.qweight" in self._keys and f"{name}.scales" in self._keys:
            return "q8_0"
        raise KeyError(f"tensor {name!r} not found in {self.path}")

    def shape(self, key: str) -> list[int]:
        """A stored tensor's shape, read from the header (no data is loaded)."""
        shape: list[int] = self._f.get_slice(key).get_shape()
        return shape

    def get(self, key: str) -> torch.Tensor:
        t: torch.Tensor = self._f.get_tensor(key)
        return t

    def q4_1(self, name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.get(f"{name}.qweight"), self.get(f"{name}.scales"), self.get(f"{name}.mins")

    def q8_0(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        return self.get(f"{name}.qweight"), self.get(f"{name}.scales")

    def blocks(self, name: str) -> tuple[torch.Tensor, ...]:
        """The stored tensors of a quantized weight: qweight, scales (and mins)."""
        keys = [f"{name}.qweight", f"{name}.scales", f"{name}.mins"]
        return tuple(self.get(k) for k in keys if k in self._keys)

    def dense(self, name: str) -> torch.Tensor:
        """The tensor dequantized to float32."""
        kind = self.kind(name)
        if kind == "dense":
            return self.get(name).to(torch.float32)
        if kind == "q4_1":
            return dequantize_q4_1(*self.q4_1(name))
        if kind == "q8_1":
            q, sc, mn = self.blocks(name)
            return dequantize_q8_0(q.to(torch.int16), sc) + mn.float().repeat_interleave(Q4_1_GROUP, dim=1)
        return dequantize_q8_0(*self.q8_0(name))


def _tiles_fit(wf: WeightFile, name: str) -> bool:
    kind = wf.kind(name)
    shape = wf.shape(f"{name}.qweight" if kind != "dense" else name)
    k = shape[1] * 2 if kind == "q4_1" else shape[1]
    return shape[0] % KERNEL_TILE == 0 and k % Q4_1_GROUP == 0


class ConcatLinear(nn.Module):
    """Linears whose outputs are concatenated: a fused q/k/v or gate/up whose parts are stored
    in different block kinds (a Q4_K_M file keeps some in Q6_K), each kept as it is stored."""

    def __init__(self, parts: list[nn.Module]) -> None:
        super().__init__()
        self.parts = nn.ModuleList(parts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([part(x) for part in self.parts], dim=-1)


def _block_linear(tensors: tuple[torch.Tensor, ...], kind: str) -> BlockLinear:
    if kind == "q4_1":
        return q4_1_linear(*tensors)
    if kind == "q8_1":
        return q8_1_linear(*tensors)
    return q8_0_linear(*tensors)


def _stored_blocks(wf: WeightFile, names: list[str]) -> nn.Module:
    """The named weights as stored, through m4's kernels: one BlockLinear where they are stored
    alike (concatenated rows), else one per name."""
    kinds = [wf.kind(n) for n in names]
    parts = [wf.blocks(n) for n in names]
    if not (len(set(kinds)) == 1 and len({tuple(t.dtype for t in p) for p in parts}) == 1
            and len({p[1].shape[1] for p in parts}) == 1):  # stored unlike (Q4_K_M: q, k Q4_K, v Q6_K)
        common = [to_q8_1_g16(p, k) for p, k in zip(parts, kinds, strict=True)]
        if any(c is None for c in common):
            return ConcatLinear([_block_linear(p, k) for p, k in zip(parts, kinds, strict=True)])
        parts, kinds = [c for c in common if c is not None], ["q8_1"] * len(parts)
    joined = tuple(torch.from_numpy(np.concatenate([p[i].numpy() for p in parts]))
                   for i in range(len(parts[0])))  # numpy: see unpack_int4
    return _block_linear(joined, kinds[0])


def build_linear(wf: WeightFile, names: list[str], weight_format: str,
                 dtype: torch.dtype) -> nn.Module:
    """One linear whose output rows are the named weights concatenated (fused q/k/v, gate/up)."""
    if weight_format == "w4a8" and not all(_tiles_fit(wf, n) for n in names):
        weight_format = "int4"  # torch's kernels take any shape
    if weight_format == "w4a8" and all(wf.kind(n) != "dense" for n in names):
        return _stored_blocks(wf, names)
    if weight_format == "int4" and all(wf.kind(n) == "q4_1" for n in names) \
            and all(wf.get(f"{n}.scales").dtype == torch.float16 for n in names):
        parts = [wf.q4_1(n) for n in names]
        qw, sc, mn = (torch.from_numpy(np.concatenate([p[i].numpy() for p in parts]))
                      for i in range(3))  # numpy: see unpack_int4
        return Int4WeightOnlyLinear.from_q4_1(qw, sc, mn, dtype=dtype)
    w = torch.cat([wf.dense(n) for n in names])  # [sum N, K] float32
    if weight_format == "w4a8":
        return q4_1_from_float(w)
    if weight_format == "int4":
        return Int4WeightOnlyLinear.from_float(w, dtype=dtype)
    if weight_format == "int8":
        return Int8WeightOnlyLinear.from_float(w, dtype=dtype)
    if weight_format == "w8a8":
        return Int8DynamicLinear.from_float(w, dtype=dtype)
    if weight_format in ("bfloat16", "float32"):
        lin = nn.Linear(w.shape[1], w.shape[0], bias=False, device="meta")
        lin.weight = nn.Parameter(w.to(dtype), requires_grad=False)
        return lin
    raise ValueError(f"unknown weight format {weight_format!r}")
