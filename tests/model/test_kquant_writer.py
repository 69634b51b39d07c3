"""The test-side GGUF block encoder (tests.model.kquant_writer): its blocks decode the same
through gguf-py and m4d.builder.gguf_blocks, bit for bit, and close to the weights encoded."""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from gguf.quants import dequantize as gguf_dequantize
from m4d.builder.gguf_blocks import _scale_min_k4, dequantize, split_blocks

from tests.model.kquant_writer import _pack_scale_min_k4, encode

# type: (bytes per block of its weights, relative RMS error bound on gaussian weights)
TYPES = {Q.Q4_0: (18, 0.10), Q.Q5_0: (22, 0.05), Q.Q8_0: (34, 0.01),
         Q.Q4_K: (144, 0.10), Q.Q5_K: (176, 0.05), Q.Q6_K: (210, 0.03)}


def weights(seed: int) -> np.ndarray:
    """Gaussian rows [64, 1024] and a few awkward ones: zeros, a zero super-block, all
    positive, all negative, large."""
    w = np.random.default_rng(seed).standard_normal((64, 1024)).astype(np.float32) * 0.02
    w[0] = 0
    w[1, 256:512] = 0
    w[2] = np.abs(w[2])
    w[3] = -np.abs(w[3])
    w[4] *= 5000
    return w


@pytest.mark.parametrize("qtype", list(TYPES), ids=lambda q: q.name)
def test_blocks_decode_alike_and_close_to_the_weights(qtype: Q) -> None:
    nbytes, bound = TYPES[qtype]
    block = 256 if qtype in (Q.Q4_K, Q.Q5_K, Q.Q6_K) else 32
    w = weights(int(qtype))
    raw = encode(w, qtype)
    assert raw.dtype == np.uint8 and raw.shape == (64, 1024 // block * nbytes)
    ref = gguf_dequantize(raw, qtype)
    assert np.array_equal(dequantize(split_blocks(qtype, raw)), ref)
    assert np.isfinite(ref).all() and not ref[0].any() and not ref[1, 256:512].any()
    errors = np.sqrt(((ref - w) ** 2).mean(axis=1) / np.maximum((w ** 2).mean(axis=1), 1e-30))
    print(f"{qtype.name}: relative RMS error {errors[5:].mean():.4f} "
          f"(worst row {errors[1:].max():.4f})")
    assert errors[5:].mean() < bound and errors[1:].max() < 1.5 * bound


def test_k_scale_packing_is_the_inverse_of_the_decoder() -> None:
    grid = np.arange(64, dtype=np.uint8)
    sc = np.stack(np.meshgrid(grid, grid[::-1]), axis=-1).reshape(-1, 8)  # every 6-bit value
    m = sc[::-1].copy()
    got_sc, got_m = _scale_min_k4(_pack_scale_min_k4(sc, m))
    assert np.array_equal(got_sc, sc) and np.array_equal(got_m, m)


def test_rows_must_fit_whole_blocks() -> None:
    with pytest.raises(ValueError, match="multiple of 256"):
        encode(np.zeros((4, 576), np.float32), Q.Q4_K)
    with pytest.raises(ValueError, match="no encoder"):
        encode(np.zeros((4, 256), np.float32), Q.Q2_K)
