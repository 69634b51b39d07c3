"""Linears over the checkpoint's quantized blocks, in m4's own kernels (model stage).

``BlockLinear`` (weight format ``w4a8``): the checkpoint's blocks exactly as stored (GGUF
Q4_0, Q4_1, Q4_K, Q5_0, Q5_K, Q6_K, Q8_0; ``q4_1_linear``, ``q8_0_linear``, ``q8_1_linear``
pack them into the kernels' tile layout), times activations quantized per row and per 32
values to two int8 digits, in ``m4d.model.kernels`` (one variant per instruction set, the same
numbers on each): each weight tile is reused across the batch, sums are exact in int32, and
rows never share a reduction. ``stored_linear`` makes one linear of several stored matrices
(a fused q/k/v or gate/up), converting unlike kinds exactly or keeping them apart
(``ConcatLinear``).
"""

import numpy as np
import torch
from torch import nn

from m4d.model import kernels
from m4d.model.qtensors import (
    Q4_1_GROUP,
    Q8_0_GROUP,
    check_2d_in,
    dequantize,
    pack_int4,
    to_q8_1_g16,
    unpack_int4,
    with_last_dim,
)

KERNEL_TILE = 16  # output channels per weight tile in the kernels (csrc/variant.h: kTile)


class BlockLinear(nn.Module):
    """A linear over weights kept in GGUF-style blocks, times activations quantized at run
    time per row and per 32 values to two int8 digits: ``torch.ops.m4.block_linear`` (m4's
    kernels, ``m4d/model/kernels``; the variant for this CPU is picked at load).

    Each weight tile is unpacked once and reused across the batch's rows, block sums are exact
    in int32 and rows never share a reduction: batch invariant by construction, and the same
    bits on every kernel variant. ``kind`` says how the blocks are stored (WEIGHT_KINDS; the
    layouts are in kernels/csrc/variant.h): 4-bit with a scale and a min per 32 (GGUF Q4_0,
    Q4_1, Q4_K), signed 8-bit with a scale per 32 or 16 (Q8_0, Q6_K), signed 5-bit with a
    scale per 32 (Q5_0), unsigned bytes with a scale and a min per 32 (Q5_K).
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
        x2 = check_2d_in(x, self.in_features)
        out_dtype = self.out_dtype
        if out_dtype is None:
            out_dtype = x.dtype
        y: torch.Tensor = torch.ops.m4.block_linear(
            x2, self.weight, self.sc, self.kind_code, self.out_features, self.in_features,
            out_dtype)
        return y.view(with_last_dim(x, self.out_features))


class BlockEmbedding(nn.Module):
    """A token embedding table kept in its stored blocks (Q8_0, Q4_1, Q8_1): a lookup
    dequantizes only the rows it gathers, to the bits the whole table would have, in
    ``dtype``. SmolLM2's table is 28 MB stored and 113 MB as float32."""

    def __init__(self, kind: str, blocks: tuple[torch.Tensor, ...], dtype: torch.dtype) -> None:
        super().__init__()
        self.kind, self.dtype = kind, dtype
        self.num_embeddings = blocks[0].shape[0]
        self.embedding_dim = blocks[0].shape[1] * (2 if kind == "q4_1" else 1)
        self.blocks = list(blocks)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        # ids: [...] -> [..., D]
        flat = ids.reshape(-1).cpu()
        rows = dequantize(self.kind, tuple(t[flat] for t in self.blocks))
        return rows.to(device=ids.device, dtype=self.dtype).view(*ids.shape, self.embedding_dim)


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
                out_dtype: torch.dtype | None = None, compact: bool = True) -> BlockLinear:
    """Signed 8-bit weights with a scale per 32 values (GGUF's Q8_0, Q5_0; float16 scales) or
    per 16 or 32 with float32 scales (Q6_K). The ``w4a8`` format's LM head (the checkpoint's
    tied embedding is Q8_0). qweight int8 [N, K] in [-127, 127]; scales [N, K/32] fp16 or
    fp32, or [N, K/16] fp32.

    Values that fit 5 bits ([-16, 15] with fp16 scales per 32: a Q5_0 file's) are kept in 5
    bits unless ``compact`` is off (kind ``q5_f16``): 5/8 of the bytes, the same numbers."""
    n, k = qweight.shape
    _check_tiles(n, k, "Q8_0")
    group = k // scales.shape[1] if scales.dim() == 2 and scales.shape[1] else 0
    f32 = scales.dtype == torch.float32
    if (qweight.dtype != torch.int8 or scales.shape[0] != n or group not in (16, 32)
            or k % group or (group == 16 and not f32)):
        raise ValueError(f"Q8_0 needs int8 [N, K] and fp16 [N, K/32] or fp32 [N, K/32 or "
                         f"K/16] scales, got {qweight.dtype} {tuple(qweight.shape)} and "
                         f"{scales.dtype} {tuple(scales.shape)}")
    if compact and not f32 and group == 32 and fits_q5(qweight):
        w, sc = pack_q5_tiles(qweight, scales)
        return BlockLinear("q5_f16", w, sc, n, k, out_dtype=out_dtype)
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


def fits_q5(qweight: torch.Tensor) -> bool:
    """Whether signed 8-bit weights all lie in Q5_0's range, [-16, 15]."""
    q = qweight.contiguous().numpy()
    return q.size > 0 and int(q.min()) >= -16 and int(q.max()) <= 15


def pack_q5_tiles(qweight: torch.Tensor, scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Signed weights in [-16, 15] with fp16 scales per 32 -> the kernel's Q5_F16 layout
    (csrc/variant.h): per tile and block, u = q + 16's low nibbles as pack_q4_1_tiles lays
    them out (256 bytes), then u's 5th bits (64 bytes: byte 4j + t holds in bit g the bit of
    channel j's value 4g + t); per tile and block 16 scales."""
    u = (qweight.contiguous().numpy().astype(np.int16) + 16).astype(np.uint8)  # [N, K], 0..31
    n, k = u.shape
    t, kb = n // KERNEL_TILE, k // Q8_0_GROUP
    q6 = (u & 0x0F).reshape(t, KERNEL_TILE, kb, 4, 2, 4)  # [tile, j, block, c, nibble, t]
    nibbles = (q6[:, :, :, :, 0, :] | (q6[:, :, :, :, 1, :] << 4)).transpose(0, 2, 3, 1, 4)
    fifth = (u >> 4).reshape(t, KERNEL_TILE, kb, 8, 4)  # [tile, j, block, g, t]
    weights = (1 << np.arange(8, dtype=np.uint8))[:, None]  # bit g
    planes = (fifth * weights).sum(axis=3, dtype=np.uint8).transpose(0, 2, 1, 3)  # [tile, block, j, t]
    packed = np.concatenate([nibbles.reshape(t, kb, 256), planes.reshape(t, kb, 64)], axis=2)
    return (torch.from_numpy(np.ascontiguousarray(packed).reshape(-1)),
            torch.from_numpy(np.ascontiguousarray(_tile_scales(scales, np.float16)).reshape(-1)))


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


def stored_linear(parts: list[tuple[torch.Tensor, ...]], kinds: list[str]) -> nn.Module:
    """Stored matrices (each its qweight, scales and mins, of the given kind) as one linear
    whose output rows are theirs concatenated, through m4's kernels: one BlockLinear where
    they are stored alike (concatenated rows), else one per matrix."""
    if not (len(set(kinds)) == 1 and len({tuple(t.dtype for t in p) for p in parts}) == 1
            and len({p[1].shape[1] for p in parts}) == 1):  # stored unlike (Q4_K_M: q, k Q4_K, v Q6_K)
        common = [to_q8_1_g16(p, k) for p, k in zip(parts, kinds, strict=True)]
        if any(c is None for c in common):
            return ConcatLinear([_block_linear(p, k) for p, k in zip(parts, kinds, strict=True)])
        parts, kinds = [c for c in common if c is not None], ["q8_1"] * len(parts)
    joined = tuple(torch.from_numpy(np.concatenate([p[i].numpy() for p in parts]))
                   for i in range(len(parts[0])))  # numpy: see unpack_int4
    return _block_linear(joined, kinds[0])
