"""A GGUF block encoder for tests (not production code, no llama.cpp needed): float32 weights
[N, K] -> raw GGUF blocks, uint8 [N, bytes per row], as ``GGUFWriter.add_tensor(...,
raw_dtype=type)`` takes them and ``gguf.quants.dequantize`` / ``m4d.builder.gguf_blocks`` decode
them.

The k-quants (Q4_K, Q5_K, Q6_K) are packed here, the inverse of the layouts in
``m4d.builder.gguf_blocks`` and llama.cpp's ``ggml-quants.c``; Q4_0, Q5_0 and Q8_0 use gguf-py's
own reference quantizers. The quantization itself is the plain one, not llama.cpp's searched
one: per sub-block min/max (or absmax), the sub-block scales rounded to 6 bits (Q4_K, Q5_K)
or 8 bits (Q6_K) of the super-block's fp16 ``d``, then every weight rounded and clipped to
its level with the scale it will be decoded with. Its error is a little above llama.cpp's
(relative RMS on gaussian weights: Q4_K 0.078, Q5_K 0.038, Q6_K 0.019). As in llama.cpp,
weights so small (below ~1e-5) that the super-block's fp16 ``d`` underflows are not kept.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
from gguf import GGMLQuantizationType as Q
from gguf.quants import quantize as gguf_quantize

U8 = npt.NDArray[np.uint8]
F32 = npt.NDArray[np.float32]
QK_K = 256

# GGUF type -> weights per block (a row's length must be a multiple of it)
BLOCK_SIZE = {Q.Q4_0: 32, Q.Q5_0: 32, Q.Q8_0: 32, Q.Q4_K: QK_K, Q.Q5_K: QK_K, Q.Q6_K: QK_K}


def _fp16_bytes(x: F32) -> U8:
    """float32 [...] -> its fp16, little-endian bytes [..., 2]."""
    out: U8 = np.ascontiguousarray(x.astype("<f2")).view(np.uint8).reshape(*x.shape, 2)
    return out


def _safe_div(a: F32, b: F32) -> F32:
    """a / b where b != 0, else 0."""
    out: F32 = np.divide(a, b, out=np.zeros_like(a), where=b != 0)
    return out


def _pack_scale_min_k4(sc: U8, m: U8) -> U8:
    """6-bit sc, m [..., 8] -> Q4_K/Q5_K's 12 bytes (inverse of ``_scale_min_k4``): bytes 0-3
    sc_0..3 | top bits of sc_4..7 << 6, bytes 4-7 m_0..3 | top bits of m_4..7 << 6, bytes 8-11
    low nibbles of sc_4..7 | low nibbles of m_4..7 << 4."""
    lo_sc = sc[..., :4] | ((sc[..., 4:] >> 4) << 6)
    lo_m = m[..., :4] | ((m[..., 4:] >> 4) << 6)
    hi = (sc[..., 4:] & 0x0F) | ((m[..., 4:] & 0x0F) << 4)
    out: U8 = np.concatenate([lo_sc, lo_m, hi], axis=-1).astype(np.uint8)
    return out


def _quantize_kx(w: F32, nmax: int) -> tuple[U8, U8, U8, U8]:
    """Q4_K (nmax 15) / Q5_K (31) levels of w [N, K]: (d and dmin fp16 bytes [N, S, 2] each,
    packed 6-bit scales [N, S, 12], q [N, S, 8, 32] in 0..nmax); w ~ d sc_j q - dmin m_j."""
    n, k = w.shape
    x = w.astype(np.float32).reshape(n, k // QK_K, 8, 32)
    lo = np.minimum(x.min(axis=-1), 0.0)  # llama.cpp keeps the min <= 0 (m_j >= 0)
    scale = (x.max(axis=-1) - lo) / nmax  # [N, S, 8]
    d = (scale.max(axis=-1) / 63).astype(np.float16).astype(np.float32)  # [N, S]
    dmin = (-lo.min(axis=-1) / 63).astype(np.float16).astype(np.float32)
    sc = np.clip(np.rint(_safe_div(scale, d[..., None])), 0, 63).astype(np.uint8)
    m = np.clip(np.rint(_safe_div(-lo, dmin[..., None])), 0, 63).astype(np.uint8)
    step = d[..., None] * sc  # the decoder's own products (exact in float32)
    low = dmin[..., None] * m
    q = np.clip(np.rint(_safe_div(x + low[..., None], step[..., None])), 0, nmax).astype(np.uint8)
    return _fp16_bytes(d), _fp16_bytes(dmin), _pack_scale_min_k4(sc, m), q


def encode_q4_k(w: F32) -> U8:
    """[N, K] -> Q4_K blocks of 144 bytes: d, dmin, 12 bytes of scales, 128 of nibbles (byte
    32i + l holds sub-block 2i's element l low, sub-block 2i+1's high)."""
    d, dmin, scales, q = _quantize_kx(w, 15)
    q4 = q.reshape(*q.shape[:2], 4, 2, 32)
    qs = q4[..., 0, :] | (q4[..., 1, :] << 4)  # [N, S, 4, 32]
    blocks = np.concatenate([d, dmin, scales, qs.reshape(*q.shape[:2], 128)], axis=-1)
    return np.ascontiguousarray(blocks.reshape(w.shape[0], -1))


def encode_q5_k(w: F32) -> U8:
    """[N, K] -> Q5_K blocks of 176 bytes: as Q4_K, with 32 bytes of fifth bits (bit j of byte
    l: sub-block j's element l) before the nibbles."""
    d, dmin, scales, q = _quantize_kx(w, 31)
    lead = q.shape[:2]
    q4 = (q & 0x0F).reshape(*lead, 4, 2, 32)
    qs = q4[..., 0, :] | (q4[..., 1, :] << 4)
    qh = ((q >> 4) << np.arange(8, dtype=np.uint8)[:, None]).sum(axis=-2, dtype=np.uint8)
    blocks = np.concatenate([d, dmin, scales, qh, qs.reshape(*lead, 128)], axis=-1)
    return np.ascontiguousarray(blocks.reshape(w.shape[0], -1))


def encode_q6_k(w: F32) -> U8:
    """[N, K] -> Q6_K blocks of 210 bytes: 128 bytes ql, 64 qh, 16 int8 scales, fp16 d;
    w ~ d sc_j (q - 32), a scale per 16 (llama.cpp's sign convention: the weight of largest
    magnitude maps to -32, the largest sub-block scale to -128)."""
    n, k = w.shape
    x = w.astype(np.float32).reshape(n, k // QK_K, 16, 16)
    big = np.take_along_axis(x, np.abs(x).argmax(axis=-1)[..., None], axis=-1)[..., 0]
    scale = big / -32  # [N, S, 16]
    smax = np.take_along_axis(scale, np.abs(scale).argmax(axis=-1)[..., None], axis=-1)[..., 0]
    d = (smax / -128).astype(np.float16).astype(np.float32)  # [N, S]
    sc = np.clip(np.rint(_safe_div(scale, d[..., None])), -128, 127).astype(np.int8)
    step = d[..., None] * sc
    q = np.clip(np.rint(_safe_div(x, step[..., None])), -32, 31).astype(np.int16) + 32
    q = q.astype(np.uint8).reshape(n, k // QK_K, 2, 128)  # two halves of 128
    ql = (q[..., :64] & 0x0F) | ((q[..., 64:] & 0x0F) << 4)  # [N, S, 2, 64]
    hi = (q >> 4).reshape(*q.shape[:3], 4, 32)
    qh = (hi << np.array([0, 2, 4, 6], np.uint8)[:, None]).sum(axis=-2, dtype=np.uint8)
    lead = q.shape[:2]
    blocks = np.concatenate([ql.reshape(*lead, 128), qh.reshape(*lead, 64),
                             sc.view(np.uint8), _fp16_bytes(d)], axis=-1)
    return np.ascontiguousarray(blocks.reshape(n, -1))


ENCODERS = {Q.Q4_K: encode_q4_k, Q.Q5_K: encode_q5_k, Q.Q6_K: encode_q6_k}


def encode(w: npt.NDArray[np.floating], qtype: Q) -> U8:
    """float [N, K] -> GGUF ``qtype`` blocks, uint8 [N, bytes per row]."""
    if qtype not in BLOCK_SIZE:
        raise ValueError(f"no encoder for {qtype.name}")
    w = np.asarray(w, dtype=np.float32)
    if w.ndim != 2 or w.shape[1] % BLOCK_SIZE[qtype]:
        raise ValueError(f"{qtype.name} needs rows of a multiple of {BLOCK_SIZE[qtype]}, "
                         f"got {w.shape}")
    if qtype in ENCODERS:
        return ENCODERS[qtype](w)
    out: U8 = gguf_quantize(w, qtype)
    return out
