"""Quantized weights as the image stores them, as torch tensors (model-loading stage).

``m4d.builder.gguf_blocks`` writes each quantized matrix ``X`` of an image as ``X.qweight``,
``X.scales`` and, for two kinds, ``X.mins``; the loader reads them back here:

* ``q4_1``: ``qweight`` uint8 [N, K/2] in *sequential* nibble order (byte ``i`` of a row holds
  element ``2i`` in its low nibble and ``2i + 1`` in its high nibble: ``gguf_blocks.NIBBLE_ORDER``),
  ``scales``/``mins`` [N, K/32]; ``w = q * scale + min`` with ``q`` in 0..15.
* ``q8_0``: ``qweight`` int8 [N, K], ``scales`` [N, K/32] (fp16, or fp32) or [N, K/16] (fp32);
  ``w = q * scale``.
* ``q8_1``: ``qweight`` uint8 [N, K], ``scales``/``mins`` float32 [N, K/32];
  ``w = q * scale + min``.

This module unpacks and dequantizes them exactly, converts any kind to unsigned bytes with a
scale and min per 16 values (``to_q8_1_g16``, so differently stored parts can share one kernel
linear), and holds the two row-shape helpers every quantized linear's ``forward`` uses.
"""

# no `from __future__ import annotations`: TorchScript compiles the row helpers below
import numpy as np
import torch

Q4_1_GROUP = 32  # weights per scale (and min) of a stored block
Q8_0_GROUP = 32


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


def dequantize_q8_0(qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Stored Q8_0 tensors (a scale per 32 values, or per 16 as from Q6_K) -> float32 [N, K]."""
    n, k = qweight.shape
    group = k // scales.shape[1]
    g = qweight.contiguous().numpy().astype(np.float32).reshape(n, k // group, group)
    g *= scales.numpy().astype(np.float32)[:, :, None]
    return torch.from_numpy(g.reshape(n, k))


def dequantize(kind: str, blocks: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """A weight's stored tensors (as ``WeightFile.blocks`` returns them) of ``kind`` ("q4_1",
    "q8_0", "q8_1") -> float32 [N, K]. Row-wise: a gather of rows dequantizes to the same
    bits as the whole matrix."""
    if kind == "q4_1":
        return dequantize_q4_1(blocks[0], blocks[1], blocks[2])
    if kind == "q8_1":
        return dequantize_q8_1(blocks[0], blocks[1], blocks[2])
    if kind == "q8_0":
        return dequantize_q8_0(blocks[0], blocks[1])
    raise ValueError(f"unknown stored kind {kind!r}")


def dequantize_q8_1(qweight: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor) -> torch.Tensor:
    """Stored Q8_1 tensors (unsigned bytes, a scale and a min per 32) -> float32 [N, K]."""
    return dequantize_q8_0(qweight.to(torch.int16), scales) + mins.float().repeat_interleave(Q4_1_GROUP, dim=1)


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


# ---- the row shapes of a quantized linear's forward (written for TorchScript)


def with_last_dim(x: torch.Tensor, last: int) -> list[int]:
    """x's shape with the last dim replaced (written for TorchScript: no starred lists)."""
    shape = list(x.shape[:-1])
    shape.append(last)
    return shape


def check_2d_in(x: torch.Tensor, in_features: int) -> torch.Tensor:
    """x [..., K] as a contiguous [M, K]; ValueError when K is not ``in_features``."""
    if x.shape[-1] != in_features:
        raise ValueError(f"expected last dim {in_features}, got shape {list(x.shape)}")
    return x.reshape(-1, in_features).contiguous()
