"""Memory as the footprint issue wants it, in process: KV pages committed as they are written
and given back when a row empties; weights as views of their mapped file, one map per file
content; a token table gathered from its stored blocks to the same bits as the float table;
a second load of the same weights sharing their tensors but not the KV cache."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from m4d.executor.shared import share_weights, shared_load
from m4d.model.block_linear import BlockEmbedding, BlockLinear
from m4d.model.kv_cache import PAGE, KVCache, LazyZeros
from m4d.model.llama import Llama, LlamaConfig, load_llama
from m4d.model.mapped import MappedSafetensors, is_mapped
from m4d.model.packed import PACKED_NAME, load_packed, save_packed
from m4d.model.qtensors import dequantize, pack_int4
from safetensors.torch import load_file, save_file


def rss_anon() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no RssAnon in /proc/self/status")


def test_lazy_zeros_take_ram_where_written_and_give_it_back() -> None:
    mib = 1 << 20
    z = LazyZeros((4, 64, mib // 4), torch.float32)  # 4 rows of 64 MiB, reserved
    before = rss_anon()
    assert float(z.tensor[:, ::7].sum()) == 0.0  # reads: the shared zero page, no RAM
    assert rss_anon() - before < 8 * mib
    z.tensor[1, :32] = 1.5  # half of row 1: 32 MiB
    z.tensor[3, 0, 0] = 2.0  # one page of row 3
    grown = rss_anon() - before
    assert 30 * mib < grown < 40 * mib, grown
    row = 64 * mib
    z.discard(row, 2 * row)  # row 1
    assert rss_anon() - before < 8 * mib
    assert float(z.tensor[1].abs().sum()) == 0.0  # reads as zeros again
    assert float(z.tensor[3, 0, 0]) == 2.0  # the other row kept its page
    z.discard(3 * row, 3 * row + PAGE // 2)  # no whole page inside: nothing happens
    assert float(z.tensor[3, 0, 0]) == 2.0


def test_kv_cache_row_costs_what_it_holds() -> None:
    cache = KVCache(n_slots=3, n_kv_heads=2, max_seq=512, head_dim=64, dtype=torch.float32)
    per_page = PAGE // (64 * 4)  # positions of one head in a page
    assert cache.row_bytes(0) == 0
    assert cache.row_bytes(1) == cache.row_bytes(per_page) == 2 * 2 * PAGE  # k, v x 2 heads
    assert cache.row_bytes(per_page + 1) == 2 * 2 * 2 * PAGE
    assert cache.row_bytes(10_000) == 2 * cache.k[0].numel() * 4  # at most the whole row
    k = torch.randn(1, 2, 33, 64)
    cache.write(k, k, torch.arange(33)[None], torch.tensor([2]))
    assert torch.equal(cache.k[2, :, :33], k[0]) and torch.equal(cache.v[2, :, :33], k[0])
    cache.write(k, k, torch.arange(33)[None], torch.tensor([0]))
    cache.discard(2)
    assert float(cache.k[2].abs().sum()) == 0.0 and float(cache.v[2].abs().sum()) == 0.0
    assert torch.equal(cache.k[0, :, :33], k[0])  # another row is untouched


def test_mapped_safetensors_are_views_of_one_map_per_content(tmp_path: Path) -> None:
    tensors = {"a": torch.randn(7, 5), "b": torch.arange(12, dtype=torch.int8).view(3, 4),
               "c": torch.randn(3).to(torch.bfloat16), "empty": torch.zeros(0, 4)}
    path = tmp_path / "w.safetensors"
    save_file(tensors, str(path))
    f = MappedSafetensors(path, digest="d1")
    for name, t in load_file(str(path)).items():
        got = f.get(name)
        assert got.dtype == t.dtype and torch.equal(got, t), name
    assert is_mapped(f.get("a")) and not is_mapped(tensors["a"])
    copy = tmp_path / "copy.safetensors"
    shutil.copyfile(path, copy)
    same = MappedSafetensors(copy, digest="d1")  # same content digest: the same pages
    assert same.get("a").data_ptr() == f.get("a").data_ptr()
    other = MappedSafetensors(copy)  # by inode: another map
    assert other.get("a").data_ptr() != f.get("a").data_ptr()
    assert torch.equal(other.get("a"), tensors["a"])


def test_mapped_safetensors_refuses_bad_files(tmp_path: Path) -> None:
    short = tmp_path / "short.safetensors"
    short.write_bytes(b"\x01\x00")
    with pytest.raises(ValueError, match="not a safetensors file"):
        MappedSafetensors(short)
    bad = tmp_path / "bad.safetensors"
    header = b'{"x": {"dtype": "F32", "shape": [4], "data_offsets": [0, 64]}}'
    bad.write_bytes(len(header).to_bytes(8, "little") + header + bytes(16))
    with pytest.raises(ValueError, match="does not fit its bytes"):
        MappedSafetensors(bad)
    garbled = tmp_path / "garbled.safetensors"
    garbled.write_bytes((10).to_bytes(8, "little") + b"not json!!" + bytes(8))
    with pytest.raises(ValueError, match="unreadable safetensors header"):
        MappedSafetensors(garbled)


@pytest.mark.parametrize("kind", ["q8_0", "q4_1"])
def test_block_embedding_gathers_the_tables_bits(kind: str) -> None:
    rng = np.random.default_rng(0)
    n, k = 96, 64
    scales = torch.from_numpy(rng.uniform(0.001, 0.05, (n, k // 32)).astype(np.float16))
    if kind == "q8_0":
        blocks: tuple[torch.Tensor, ...] = (
            torch.from_numpy(rng.integers(-127, 128, (n, k), dtype=np.int8)), scales)
    else:
        q = pack_int4(rng.integers(0, 16, (n, k)))
        mins = torch.from_numpy(rng.uniform(-0.2, 0.0, (n, k // 32)).astype(np.float16))
        blocks = (torch.from_numpy(q), scales, mins)
    table = dequantize(kind, blocks)
    emb = BlockEmbedding(kind, blocks, torch.float32)
    assert (emb.num_embeddings, emb.embedding_dim) == (n, k)
    ids = torch.tensor([[5, 0, 95], [5, 17, 3]])
    assert torch.equal(emb(ids), table[ids])


def _tiny() -> Llama:
    """Random weights, NOT a model: only whether two loads share tensors and not caches."""
    torch.manual_seed(0)
    net = Llama(LlamaConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2,
                            ffn_dim=48, max_seq_len=64))
    for p in net.parameters():
        torch.nn.init.normal_(p, std=0.2)
    net.init_rope()
    return net.eval()


def test_a_second_load_shares_weights_not_kv() -> None:
    calls = []

    def load() -> Llama:
        calls.append(1)
        return _tiny()

    first, shared = shared_load(("weights-digest", "tiny"), load)
    assert not shared
    first.setup_caches(2, 32, torch.float32)
    second, shared = shared_load(("weights-digest", "tiny"), load)
    assert shared and len(calls) == 1
    second.setup_caches(2, 32, torch.float32)
    for (name, a), (_, b) in zip(first.named_parameters(), second.named_parameters(), strict=True):
        assert a.data_ptr() == b.data_ptr(), name
    ka, kb = first.layers[0].attention.kv_cache, second.layers[0].attention.kv_cache
    assert ka is not kb and ka.k.data_ptr() != kb.k.data_ptr()
    toks, pos = torch.randint(0, 64, (1, 6)), torch.arange(6)[None]
    out_a = first(toks, pos, torch.tensor([0]))
    assert float(kb.k.abs().sum()) == 0.0  # the first's prefill wrote only its own cache
    assert torch.equal(second(toks, pos, torch.tensor([1])), out_a)
    assert share_weights(first).layers[0].attention.kv_cache is None


def _block_linears(model: torch.nn.Module) -> dict[str, BlockLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, BlockLinear)}


def test_packed_backbone_loads_mapped_with_the_same_numbers(imported_llama: Any,
                                                            tmp_path: Path) -> None:
    """SmolLM2's linears as the builder packs them: the loader maps them instead of packing
    the blocks, and the model computes the same bits."""
    packing = imported_llama.load("w4a8", torch.float32)
    path = tmp_path / PACKED_NAME
    assert save_packed(packing, path)
    mapped = load_llama(imported_llama.weights, imported_llama.config, weight_format="w4a8",
                        compute_dtype=torch.float32, packed=load_packed(path))
    ours, theirs = _block_linears(packing), _block_linears(mapped)
    assert ours.keys() == theirs.keys() and len(ours) == 4 * imported_llama.config.n_layers + 1
    for name, lin in theirs.items():
        assert lin.kind == ours[name].kind, name
        assert torch.equal(lin.weight, ours[name].weight) and torch.equal(lin.sc, ours[name].sc)
        assert is_mapped(lin.weight) and not is_mapped(ours[name].weight), name
    assert theirs["output"].out_dtype == torch.float32
    ids = torch.tensor([imported_llama.tokenizer.encode("The capital of France is")])
    pos = torch.arange(ids.shape[1])[None]
    for model in (packing, mapped):
        model.setup_caches(1, 64, torch.float32)
    assert torch.equal(mapped(ids, pos), packing(ids, pos))


def test_packed_file_of_another_layout_is_ignored(tmp_path: Path) -> None:
    path = tmp_path / PACKED_NAME
    save_file({"x.weight": torch.zeros(64, dtype=torch.uint8)}, str(path),
              metadata={"format": json.dumps({"layout": "m4-tiles-0", "linears": {}})})
    assert load_packed(path) is None
