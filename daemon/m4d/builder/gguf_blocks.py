"""GGUF quant blocks -> the lossless stored tensors of a firmware image (image-build stage).

The importer (``m4d.builder.importers.gguf_llama``) calls ``split_blocks`` on each quantized
GGUF tensor; ``stored_kind`` and ``dequantize`` give the kind and the float32 weights of stored
tensors for checks and tests (the loader reads them in ``m4d.model.qtensors``). Nothing is
requantized: each GGUF block type maps onto one of three
stored *kinds* that our CPU kernels multiply directly. A quantized tensor ``X`` is stored as
``X.qweight``, ``X.scales`` and, for two kinds, ``X.mins``:

* ``q4_1``: ``qweight`` uint8 [N, K/2] in ``NIBBLE_ORDER`` (byte i = element 2i in the low
  nibble | element 2i+1 in the high nibble), ``scales``/``mins`` [N, K/32] float16 or float32;
  ``w = q * scale + min``, q in 0..15.
  Q4_1: fp16 d, m. Q4_0 (``w = d (q - 8)``): fp16 d, -8 d (float32 if -8 d overflows fp16).
  Q4_K: float32 ``d * sc_j`` and ``-(dmin * m_j)`` per sub-block of 32.
* ``q8_0``: ``qweight`` int8 [N, K], ``scales`` [N, K/32] or [N, K/16]; ``w = q * scale``.
  Q8_0: fp16 d per 32. Q5_0: q - 16 with fp16 d per 32. Q6_K: q - 32 with float32
  ``d * sc`` per 16.
* ``q8_1``: ``qweight`` uint8 [N, K] with values 0..31, ``scales``/``mins`` float32 [N, K/32];
  ``w = q * scale + min``. Q5_K: float32 ``d * sc_j`` and ``-(dmin * m_j)``.

Every stored scale and min is the exact float32 product GGUF's own decoder forms (an fp16's
11 significant bits times an integer below 2^8), ``q * scale`` is exact as well (at most 23
bits), so the only rounding is the final ``+ min``, the same single rounding as llama.cpp's
``d * q - dm``: ``dequantize`` reproduces ``gguf.quants.dequantize`` bit for bit. The kind is recoverable from the stored tensors alone
(``stored_kind``). All codecs are vectorised over whole tensors; raw input is the GGUF
tensor's bytes, uint8 [N, bytes per row].
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

U8 = npt.NDArray[np.uint8]
F32 = npt.NDArray[np.float32]

NIBBLE_ORDER = "sequential: byte i = element 2i (low nibble) | element 2i+1 (high nibble)"
QK_K = 256  # weights per k-quant super-block

# ggml_type numbers (GGUF's GGMLQuantizationType), so the daemon needs no gguf import.
Q4_0, Q4_1, Q5_0, Q8_0, Q4_K, Q5_K, Q6_K = 2, 3, 6, 8, 12, 13, 14
GGML_TYPE_NAMES = {Q4_0: "Q4_0", Q4_1: "Q4_1", Q5_0: "Q5_0", Q8_0: "Q8_0",
                   Q4_K: "Q4_K", Q5_K: "Q5_K", Q6_K: "Q6_K"}
KINDS = ("q4_1", "q8_0", "q8_1")


@dataclass(frozen=True)
class StoredQuant:
    """One quantized tensor as stored in the image (see the module docstring)."""

    kind: str
    qweight: npt.NDArray[Any]
    scales: npt.NDArray[Any]
    mins: npt.NDArray[Any] | None

    def __post_init__(self) -> None:
        kind = stored_kind(self.qweight.dtype, self.qweight.shape, self.scales.shape,
                           self.mins is not None)
        if kind != self.kind:
            raise ValueError(f"tensors of kind {kind!r} labelled {self.kind!r}")
        if self.mins is not None and self.mins.shape != self.scales.shape:
            raise ValueError(f"mins {self.mins.shape} and scales {self.scales.shape} differ")

    @property
    def in_features(self) -> int:
        k = self.qweight.shape[1]
        return int(2 * k if self.kind == "q4_1" else k)

    @property
    def group(self) -> int:
        """Weights per scale: 32, or 16 for Q6_K's ``q8_0``."""
        return self.in_features // int(self.scales.shape[1])

    def tensors(self, name: str) -> dict[str, npt.NDArray[Any]]:
        """The safetensors entries for tensor ``name`` (``name.qweight`` ...)."""
        out = {f"{name}.qweight": self.qweight, f"{name}.scales": self.scales}
        if self.mins is not None:
            out[f"{name}.mins"] = self.mins
        return out


def stored_kind(qweight_dtype: object, qweight_shape: tuple[int, ...] | list[int],
                scales_shape: tuple[int, ...] | list[int], has_mins: bool) -> str:
    """The kind of stored tensors from their metadata alone (numpy or torch dtypes).

    uint8 with ``2 K' == 32 G`` and mins -> ``q4_1``; uint8 with ``K == 32 G`` and mins ->
    ``q8_1``; int8 without mins and ``K / G`` in (16, 32) -> ``q8_0``. Anything else is
    ValueError.
    """
    dtype = _dtype_name(qweight_dtype)
    what = f"qweight {dtype} {list(qweight_shape)}, scales {list(scales_shape)}, mins {has_mins}"
    if len(qweight_shape) != 2 or len(scales_shape) != 2 or qweight_shape[0] != scales_shape[0]:
        raise ValueError(f"not a stored quantized matrix: {what}")
    k, g = int(qweight_shape[1]), int(scales_shape[1])
    if g <= 0:
        raise ValueError(f"no scales: {what}")
    if dtype == "uint8" and has_mins:
        if 2 * k == 32 * g:
            return "q4_1"
        if k == 32 * g:
            return "q8_1"
    if dtype == "int8" and not has_mins and k % g == 0 and k // g in (16, 32):
        return "q8_0"
    raise ValueError(f"unknown stored quantization: {what}")


# --------------------------------------------------------------------------- helpers


def _dtype_name(dtype: object) -> str:
    """``torch.int8``, ``np.int8``, ``np.dtype("int8")`` or ``"int8"`` -> ``"int8"``."""
    text = str(dtype)
    if text.startswith("torch."):
        return text.removeprefix("torch.")
    try:
        return np.dtype(dtype).name  # type: ignore[call-overload,no-any-return]
    except TypeError:
        return text


def _blocks(raw: npt.NDArray[Any], block_bytes: int, what: str) -> U8:
    """uint8 [N, G * block_bytes] -> [N, G, block_bytes] (a view)."""
    if raw.dtype != np.uint8 or raw.ndim != 2 or raw.shape[1] % block_bytes:
        raise ValueError(f"not a {what} byte matrix: dtype {raw.dtype}, shape {raw.shape}")
    out: U8 = raw.reshape(raw.shape[0], -1, block_bytes)
    return out


def _f16(b: U8) -> npt.NDArray[np.float16]:
    """[..., 2] little-endian fp16 bytes -> float16 [...]."""
    out: npt.NDArray[np.float16] = np.ascontiguousarray(b).view("<f2")[..., 0].astype(np.float16)
    return out


def _rows(a: npt.NDArray[Any]) -> npt.NDArray[Any]:
    """[N, G, ...] -> contiguous [N, G * ...]."""
    return np.ascontiguousarray(a.reshape(a.shape[0], -1))


def _split_nibbles(qs: U8) -> U8:
    """[..., 16] bytes of a 32-weight block (element j low, j + 16 high) -> [..., 32]."""
    out: U8 = np.concatenate([qs & 0x0F, qs >> 4], axis=-1)
    return out


def _k_nibbles(qs: U8) -> U8:
    """k-quant [N, S, 128] bytes -> [N, S, 256]: sub-block 2i is the low nibbles of bytes
    32i..32i+31, sub-block 2i+1 their high nibbles."""
    q = qs.reshape(*qs.shape[:-1], 4, 1, 32)
    out: U8 = np.concatenate([q & 0x0F, q >> 4], axis=-2).reshape(*qs.shape[:-1], QK_K)
    return out


def pack_nibbles(q: U8) -> U8:
    """Values 0..15 [N, K] -> uint8 [N, K/2] in ``NIBBLE_ORDER``."""
    out: U8 = (q[:, 0::2] & np.uint8(0x0F)) | (q[:, 1::2] << np.uint8(4))
    return out


def unpack_nibbles(qweight: U8) -> U8:
    """uint8 [N, K/2] in ``NIBBLE_ORDER`` -> values 0..15 [N, K]."""
    q: U8 = np.empty((qweight.shape[0], qweight.shape[1] * 2), dtype=np.uint8)
    q[:, 0::2] = qweight & 0x0F
    q[:, 1::2] = qweight >> 4
    return q


def _scale_min_k4(packed: U8) -> tuple[U8, U8]:
    """Q4_K/Q5_K's 12 bytes of 6-bit scales and mins [..., 12] -> (sc, m) [..., 8].

    Bytes 0-3 hold sc_0..3 in their low 6 bits, bytes 4-7 m_0..3; bytes 8-11 hold the low
    nibbles of sc_4..7 and (high nibble) of m_4..7, whose top 2 bits are the top 2 bits of
    bytes 0-3 (sc) and 4-7 (m): llama.cpp's ``get_scale_min_k4``.
    """
    lo_sc, lo_m, hi = packed[..., 0:4], packed[..., 4:8], packed[..., 8:12]
    sc: U8 = np.concatenate([lo_sc & 0x3F, (hi & 0x0F) | ((lo_sc >> 6) << 4)], axis=-1)
    m: U8 = np.concatenate([lo_m & 0x3F, (hi >> 4) | ((lo_m >> 6) << 4)], axis=-1)
    return sc, m


def _k_scales(b: U8) -> tuple[F32, F32]:
    """Q4_K/Q5_K super-blocks [N, S, ...] -> float32 scales d*sc_j, mins -(dmin*m_j) [N, K/32]."""
    d = _f16(b[..., 0:2]).astype(np.float32)[..., None]
    dmin = _f16(b[..., 2:4]).astype(np.float32)[..., None]
    sc, m = _scale_min_k4(b[..., 4:16])
    scales: F32 = _rows(d * sc.astype(np.float32))
    mins: F32 = _rows(-(dmin * m.astype(np.float32)))
    return scales, mins


# --------------------------------------------------------------------------- codecs


def split_q4_0(raw: U8) -> StoredQuant:
    """Q4_0 (fp16 d, 16 bytes; w = d (q - 8)) -> ``q4_1`` with scale d, min -8 d."""
    b = _blocks(raw, 18, "Q4_0")
    d = _f16(b[..., 0:2])
    q = _rows(_split_nibbles(b[..., 2:18]))
    d32 = d.astype(np.float32)
    mins32 = -8.0 * d32
    with np.errstate(over="ignore"):
        mins16 = mins32.astype(np.float16)
    if np.array_equal(mins16.astype(np.float32), mins32):
        return StoredQuant("q4_1", pack_nibbles(q), d, mins16)
    return StoredQuant("q4_1", pack_nibbles(q), d32, mins32)  # |d| > 8188: -8 d overflows fp16


def split_q4_1(raw: U8) -> StoredQuant:
    """Q4_1 (fp16 d, fp16 m, 16 bytes; w = d q + m) -> ``q4_1`` as is."""
    b = _blocks(raw, 20, "Q4_1")
    q = _rows(_split_nibbles(b[..., 4:20]))
    return StoredQuant("q4_1", pack_nibbles(q), _f16(b[..., 0:2]), _f16(b[..., 2:4]))


def split_q5_0(raw: U8) -> StoredQuant:
    """Q5_0 (fp16 d, 4 bytes of high bits, 16 bytes of nibbles; w = d (q - 16)) -> ``q8_0``.

    Bit i of the little-endian 32-bit ``qh`` is element i's fifth bit.
    """
    b = _blocks(raw, 22, "Q5_0")
    high = np.unpackbits(b[..., 2:6], axis=-1, bitorder="little")  # [N, G, 32]
    q = _split_nibbles(b[..., 6:22]) | (high << 4)
    qweight = _rows(q.view(np.int8) - np.int8(16))
    return StoredQuant("q8_0", qweight, _f16(b[..., 0:2]), None)


def split_q8_0(raw: U8) -> StoredQuant:
    """Q8_0 (fp16 d, 32 int8; w = d q) -> ``q8_0`` as is."""
    b = _blocks(raw, 34, "Q8_0")
    return StoredQuant("q8_0", _rows(b[..., 2:34].view(np.int8)), _f16(b[..., 0:2]), None)


def split_q4_k(raw: U8) -> StoredQuant:
    """Q4_K (fp16 d, fp16 dmin, 12 bytes of 6-bit sc/m, 128 bytes of nibbles per 256)
    -> ``q4_1`` with float32 scale d*sc_j and min -(dmin*m_j) per sub-block of 32."""
    b = _blocks(raw, 144, "Q4_K")
    scales, mins = _k_scales(b)
    return StoredQuant("q4_1", pack_nibbles(_rows(_k_nibbles(b[..., 16:144]))), scales, mins)


def split_q5_k(raw: U8) -> StoredQuant:
    """Q5_K (as Q4_K plus 32 bytes of high bits before the nibbles) -> ``q8_1``.

    Element l of sub-block j takes its fifth bit from bit j of ``qh[l]``.
    """
    b = _blocks(raw, 176, "Q5_K")
    scales, mins = _k_scales(b)
    qh = b[..., 16:48][..., None, :] >> np.arange(8, dtype=np.uint8)[:, None]  # [N, S, 8, 32]
    high = (qh & 1).reshape(*b.shape[:-1], QK_K)
    q = _rows(_k_nibbles(b[..., 48:176]) | (high << 4))
    return StoredQuant("q8_1", q, scales, mins)


def split_q6_k(raw: U8) -> StoredQuant:
    """Q6_K (128 bytes ql, 64 bytes qh, 16 int8 scales, fp16 d per 256; w = d sc (q - 32))
    -> ``q8_0`` with int8 q - 32 and float32 d*sc per 16.

    Each half of 128 weights uses 64 bytes of ``ql`` and 32 of ``qh``: element
    ``64 s + p`` takes nibble s of ``ql[p]`` and element ``32 t + p`` bits 2t..2t+1 of ``qh[p]``.
    """
    b = _blocks(raw, 210, "Q6_K")
    lead = b.shape[:-1]
    ql = b[..., 0:128].reshape(*lead, 2, 1, 64)
    low = np.concatenate([ql & 0x0F, ql >> 4], axis=-2).reshape(*lead, QK_K)
    qh = b[..., 128:192].reshape(*lead, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8)[:, None]
    high = (qh & 3).reshape(*lead, QK_K)
    qweight = _rows((low | (high << 4)).view(np.int8) - np.int8(32))
    d = _f16(b[..., 208:210]).astype(np.float32)[..., None]
    scales: F32 = _rows(d * b[..., 192:208].view(np.int8).astype(np.float32))
    return StoredQuant("q8_0", qweight, scales, None)


SPLITTERS: dict[int, Callable[[U8], StoredQuant]] = {
    Q4_0: split_q4_0, Q4_1: split_q4_1, Q5_0: split_q5_0, Q8_0: split_q8_0,
    Q4_K: split_q4_k, Q5_K: split_q5_k, Q6_K: split_q6_k,
}


def split_blocks(ggml_type: int, raw: U8) -> StoredQuant:
    """GGUF tensor bytes uint8 [N, bytes per row] of ``ggml_type`` -> the stored tensors."""
    split = SPLITTERS.get(int(ggml_type))
    if split is None:
        raise ValueError(f"GGUF block type {getattr(ggml_type, 'name', ggml_type)} is not "
                         f"supported (supported: {', '.join(GGML_TYPE_NAMES.values())})")
    return split(np.asarray(raw))


def dequantize(stored: StoredQuant) -> F32:
    """Stored tensors -> float32 [N, K]: ``q * scale (+ min)`` in float32, in that order."""
    q = unpack_nibbles(stored.qweight) if stored.kind == "q4_1" else stored.qweight
    n, groups = stored.scales.shape
    w: F32 = q.astype(np.float32).reshape(n, groups, -1)
    w *= stored.scales.astype(np.float32)[:, :, None]
    if stored.mins is not None:
        w += stored.mins.astype(np.float32)[:, :, None]
    return w.reshape(n, -1)
