"""Weight-only quantized linear layers and the GGUF block codecs (model-loading stage).

Two roles:

* Codecs between GGUF's raw quant blocks and the lossless tensors stored in our
  firmware image (used by the image builder's importer and by the loader):

  - Q4_1: 32 weights per block, fp16 scale ``d`` and fp16 min ``m``; ``w = q * d + m`` with
    ``q`` in 0..15. In a GGUF block ``qs[j]`` holds element ``j`` in its low nibble and
    element ``j + 16`` in its high nibble. We store ``qweight`` uint8 [N, K/2] in *sequential*
    order instead: byte ``i`` of a row holds element ``2i`` in its low nibble and element
    ``2i + 1`` in its high nibble (``NIBBLE_ORDER``), plus ``scales``/``mins`` fp16 [N, K/32].
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
  batch, and it is batch invariant by construction (see the class).

* ``Q4_1Linear`` and ``Q8_0Linear`` (weight format ``w4a8``): the checkpoint's Q4_1 blocks
  and Q8_0 head exactly as stored, times activations quantized per row and per 32 values to
  two int8 digits, in m4's own AVX-512 VNNI kernels (``m4d.model.kernels``): each weight tile
  is reused across the batch, sums are exact in int32, and rows never share a reduction.
"""

import platform
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from torch import nn

from m4d.model import kernels  # noqa: F401  (declares the torch.ops.m4 schemas)

Q4_1_GROUP = 32
Q4_1_BLOCK_BYTES = 20  # fp16 d, fp16 m, 16 bytes of nibbles
Q8_0_GROUP = 32
Q8_0_BLOCK_BYTES = 34  # fp16 d, 32 int8
NIBBLE_ORDER = "sequential: byte i = element 2i (low nibble) | element 2i+1 (high nibble)"
INT4_INNER_K_TILES = 2
LO_RADIX = 254.0  # w8a8: the second activation digit's weight (see Int8DynamicLinear)


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
    """Stored Q8_0 tensors -> float32 [N, K]."""
    n, k = qweight.shape
    g = qweight.contiguous().numpy().astype(np.float32).reshape(n, k // Q8_0_GROUP, Q8_0_GROUP)
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
    elsewhere.
    """

    weight: torch.Tensor  # int8 [N, K], or oneDNN's packed layout of it
    scales: torch.Tensor  # float32 [N]

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
        self.packed = onednn_int8_available() if packed is None else packed
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
        if self.packed:
            y = torch.ops.onednn.qlinear_pointwise(
                q.add_(128).to(torch.uint8), 1.0, 128, self.weight, self.scales,
                self.zero_points, None, 1.0, 0, torch.float32, "none", [], "")
        else:
            y = torch._int_mm(q.to(torch.int8), self.weight).to(torch.float32) * self.scales
        out: torch.Tensor = y[m:].div_(self.lo_radix).add_(y[:m]).mul_(scale)
        return out


class Q4_1Linear(nn.Module):
    """The ``w4a8`` linear: the checkpoint's Q4_1 weights as they are, activations quantized at
    run time per row and per 32 values to int8, as llama.cpp multiplies Q4_1 by Q8_1.

    Runs ``torch.ops.m4.q4_1_linear`` (``m4d/model/kernels/m4_kernels.cpp``, AVX-512 VNNI):
    exact int32 block sums, each unpacked weight tile reused by up to 8 rows, so a decode
    batch costs little more than one row in weight traffic. Batch invariant by construction.
    """

    weight: torch.Tensor  # uint8, the kernel's tile layout (pack_q4_1_tiles)
    dm: torch.Tensor  # float16, per tile and block: 16 scales d, 16 mins m

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor) -> None:
        """qweight uint8 [N, K/2] in ``NIBBLE_ORDER``; scales, mins fp16 [N, K/32]."""
        super().__init__()
        n, k = qweight.shape[0], qweight.shape[1] * 2
        _check_tiles(n, k, "w4a8")
        if scales.shape != (n, k // Q4_1_GROUP) or mins.shape != scales.shape:
            raise ValueError(f"Q4_1 scales/mins must be [{n}, {k // Q4_1_GROUP}], got "
                             f"{tuple(scales.shape)}, {tuple(mins.shape)}")
        self.in_features, self.out_features = k, n
        w, dm = pack_q4_1_tiles(qweight, scales, mins)
        self.register_buffer("weight", w)
        self.register_buffer("dm", dm)

    @classmethod
    def from_float(cls, weight: torch.Tensor) -> "Q4_1Linear":
        """Quantize a dense [N, K] weight to Q4_1 (per 32: min/max, 16 levels; lossy)."""
        n, k = weight.shape
        w = weight.to(torch.float32).reshape(n, k // Q4_1_GROUP, Q4_1_GROUP)
        lo, hi = w.amin(dim=-1), w.amax(dim=-1)
        d = ((hi - lo) / 15.0).to(torch.float16)  # the stored values are what we divide by
        df = d.to(torch.float32).clamp(min=1e-8)
        m = lo.to(torch.float16)
        q = torch.round((w - m.to(torch.float32)[..., None]) / df[..., None]).clamp(0, 15)
        packed = pack_int4(q.reshape(n, k).to(torch.uint8).numpy())
        return cls(torch.from_numpy(packed), d, m)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [..., K] -> [..., N] in x's dtype
        x2 = _check_2d_in(x, self.in_features)
        y: torch.Tensor = torch.ops.m4.q4_1_linear(x2, self.weight, self.dm, self.out_features,
                                                   self.in_features, x.dtype)
        return y.view(_with_last_dim(x, self.out_features))


class Q8_0Linear(nn.Module):
    """GGUF's Q8_0 weights (per 32: ``w = d * q``, q int8) times activations quantized per row
    and per 32 values to int8: ``torch.ops.m4.q8_0_linear``. The ``w4a8`` format's LM head
    (the checkpoint's tied embedding is Q8_0). Output in ``out_dtype`` (default: x's)."""

    weight: torch.Tensor  # uint8 q + 128, the kernel's tile layout (pack_q8_0_tiles)
    d: torch.Tensor  # float16 per tile and block: 16 scales

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor, *,
                 out_dtype: torch.dtype | None = None) -> None:
        """qweight int8 [N, K]; scales fp16 [N, K/32]."""
        super().__init__()
        n, k = qweight.shape
        _check_tiles(n, k, "Q8_0")
        if qweight.dtype != torch.int8 or scales.shape != (n, k // Q8_0_GROUP):
            raise ValueError(f"Q8_0 needs int8 [N, K] and fp16 [N, K/32], got {qweight.dtype} "
                             f"{tuple(qweight.shape)} and {tuple(scales.shape)}")
        self.in_features, self.out_features, self.out_dtype = k, n, out_dtype
        w, d = pack_q8_0_tiles(qweight, scales)
        self.register_buffer("weight", w)
        self.register_buffer("d", d)

    @classmethod
    def from_float(cls, weight: torch.Tensor, *, out_dtype: torch.dtype | None = None) -> "Q8_0Linear":
        """Quantize a dense [N, K] weight to Q8_0 (per 32: absmax / 127; lossy)."""
        n, k = weight.shape
        w = weight.to(torch.float32).reshape(n, k // Q8_0_GROUP, Q8_0_GROUP)
        d = (w.abs().amax(dim=-1) / 127.0).to(torch.float16)
        inv = torch.where(d > 0, 1.0 / d.to(torch.float32), torch.zeros_like(d, dtype=torch.float32))
        q = torch.round(w * inv[..., None]).clamp(-127, 127).to(torch.int8)
        return cls(q.reshape(n, k), d, out_dtype=out_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = _check_2d_in(x, self.in_features)
        y: torch.Tensor = torch.ops.m4.q8_0_linear(
            x2, self.weight, self.d, self.out_features, self.in_features,
            self.out_dtype or x.dtype)
        return y.view(_with_last_dim(x, self.out_features))


KERNEL_TILE = 16  # output channels per weight tile in m4_kernels.cpp


def _check_tiles(n: int, k: int, what: str) -> None:
    if n % KERNEL_TILE or k % Q4_1_GROUP:
        raise ValueError(f"{what} needs out features % {KERNEL_TILE} == 0 and in features % "
                         f"{Q4_1_GROUP} == 0, got [{n}, {k}]")


def pack_q4_1_tiles(qweight: torch.Tensor, scales: torch.Tensor,
                    mins: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Stored Q4_1 -> the kernel's layout: per tile of 16 channels and block of 32 values, 4
    chunks of 64 bytes where chunk c, lane j, byte t holds q[j][8c + t] in its low nibble and
    q[j][8c + 4 + t] in its high nibble; and per tile and block 16 d then 16 m (fp16)."""
    q = unpack_int4(qweight).numpy().astype(np.uint8)  # [N, K]
    n, k = q.shape
    t, kb = n // KERNEL_TILE, k // Q4_1_GROUP
    q6 = q.reshape(t, KERNEL_TILE, kb, 4, 2, 4)  # [tile, j, block, c, nibble, t]
    packed = (q6[:, :, :, :, 0, :] | (q6[:, :, :, :, 1, :] << 4)).transpose(0, 2, 3, 1, 4)
    d = scales.numpy().astype(np.float16).reshape(t, KERNEL_TILE, kb).transpose(0, 2, 1)
    m = mins.numpy().astype(np.float16).reshape(t, KERNEL_TILE, kb).transpose(0, 2, 1)
    dm = np.stack([d, m], axis=2)  # [tile, block, 2, 16]
    return (torch.from_numpy(np.ascontiguousarray(packed).reshape(-1)),
            torch.from_numpy(np.ascontiguousarray(dm).reshape(-1)))


def pack_q8_0_tiles(qweight: torch.Tensor, scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Stored Q8_0 -> the kernel's layout: per tile of 16 channels and block of 32 values, 8
    chunks of 64 bytes where chunk g, lane j, byte t holds q[j][4g + t] + 128 (uint8: VNNI
    multiplies unsigned by signed bytes, and the activations are the signed side); per tile
    and block 16 scales (fp16)."""
    q = qweight.contiguous().numpy()
    if q.min(initial=0) < -127:
        raise ValueError("Q8_0 values must lie in [-127, 127]")
    n, k = q.shape
    t, kb = n // KERNEL_TILE, k // Q8_0_GROUP
    packed = (q.astype(np.int16) + 128).astype(np.uint8).reshape(t, KERNEL_TILE, kb, 8, 4)
    d = scales.numpy().astype(np.float16).reshape(t, KERNEL_TILE, kb).transpose(0, 2, 1)
    return (torch.from_numpy(np.ascontiguousarray(packed.transpose(0, 2, 3, 1, 4)).reshape(-1)),
            torch.from_numpy(np.ascontiguousarray(d).reshape(-1)))


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
        """"dense", "q4_1" or "q8_0"."""
        if name in self._keys:
            return "dense"
        if f"{name}.qweight" in self._keys and f"{name}.mins" in self._keys:
            return "q4_1"
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

    def dense(self, name: str) -> torch.Tensor:
        """The tensor dequantized to float32."""
        kind = self.kind(name)
        if kind == "dense":
            return self.get(name).to(torch.float32)
        if kind == "q4_1":
            return dequantize_q4_1(*self.q4_1(name))
        return dequantize_q8_0(*self.q8_0(name))


def _tiles_fit(wf: WeightFile, name: str) -> bool:
    kind = wf.kind(name)
    shape = wf.shape(f"{name}.qweight" if kind != "dense" else name)
    k = shape[1] * 2 if kind == "q4_1" else shape[1]
    return shape[0] % KERNEL_TILE == 0 and k % Q4_1_GROUP == 0


def build_linear(wf: WeightFile, names: list[str], weight_format: str,
                 dtype: torch.dtype) -> nn.Module:
    """One linear whose output rows are the named weights concatenated (fused q/k/v, gate/up)."""
    if weight_format == "w4a8" and not all(_tiles_fit(wf, n) for n in names):
        weight_format = "int4"  # the same Q4_1 numbers through torch's kernel
    if weight_format in ("int4", "w4a8") and all(wf.kind(n) == "q4_1" for n in names):
        parts = [wf.q4_1(n) for n in names]
        qw, sc, mn = (torch.from_numpy(np.concatenate([p[i].numpy() for p in parts]))
                      for i in range(3))  # numpy: see unpack_int4
        if weight_format == "w4a8":
            return Q4_1Linear(qw, sc, mn)
        return Int4WeightOnlyLinear.from_q4_1(qw, sc, mn, dtype=dtype)
    w = torch.cat([wf.dense(n) for n in names])  # [sum N, K] float32
    if weight_format == "w4a8":
        return Q4_1Linear.from_float(w)
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
