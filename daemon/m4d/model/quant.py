"""Weight-only and w8a8 quantized linears on torch's own CPU kernels (model stage).

The dense int4/int8 paths of ``weight_format`` (``m4d.model.weights.build_linear`` picks one):

* ``Int4WeightOnlyLinear``: ``aten._weight_int4pack_mm_for_cpu`` with group size 32. Torch
  dequantizes ``(q - 8) * scale + zero``, so Q4_1 maps exactly with ``scale = d`` and
  ``zero = m + 8 d``; only scale/zero are rounded to the activation dtype (bf16 in practice:
  8 significant bits instead of fp16's 11; relative error <= 2^-9 per group constant).
* ``Int8WeightOnlyLinear``: ``aten._weight_int8pack_mm``, per-output-channel symmetric.

  Both are fast only with bf16 activations (12-27x slower with fp32 on this CPU), and both
  cost in proportion to the rows of ``x``: they do not reuse a weight across rows, so a decode
  batch of 16 sequences costs about 6x one sequence.

* ``Int8DynamicLinear`` (weight format ``w8a8``): int8 weights per output channel and
  activations quantized per row at run time into two int8 digits, one integer GEMM with
  exact int32 sums (oneDNN's packed VNNI kernel on x86). It reuses each weight across the
  batch, and it is batch invariant by construction (see the class). Where the CPU's int8
  GEMM is not exact (oneDNN without VNNI) it refuses to load (``int8_gemm_path``).

The ``w4a8`` format's linears over the stored GGUF blocks, in m4's own kernels, are
``m4d.model.block_linear``; the stored tensors themselves are ``m4d.model.qtensors``.
"""

import functools
import logging
import platform

import numpy as np
import torch
from torch import nn

from m4d.model.qtensors import Q4_1_GROUP, check_2d_in, unpack_int4, with_last_dim

INT4_INNER_K_TILES = 2
LO_RADIX = 254.0  # w8a8: the second activation digit's weight (see Int8DynamicLinear)

log = logging.getLogger(__name__)


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
        x2 = check_2d_in(x, self.in_features).to(self.scales_and_zeros.dtype)
        y: torch.Tensor = torch.ops.aten._weight_int4pack_mm_for_cpu(
            x2, self.weight_packed, self.group_size, self.scales_and_zeros
        )
        return y.view(with_last_dim(x, self.out_features))


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
        x2 = check_2d_in(x, self.in_features).to(self.scales.dtype)
        y: torch.Tensor = torch.ops.aten._weight_int8pack_mm(x2, self.weight, self.scales)
        return y.view(with_last_dim(x, self.out_features))


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
        y = self._matmul(check_2d_in(x, self.in_features).to(torch.float32))
        return y.to(self.dtype).view(with_last_dim(x, self.out_features))

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
