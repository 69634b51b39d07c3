"""LoRA on the text encoder as m4d serves it: the texts of one pass each through their own
adapter (or none), the low-rank terms added per row inside the shared forward, on a small
generated BERT.

The reference is the same model with the adapter attached in torch (``LoraLinear``, which
equals PEFT: tests/adapters/test_lora_parity.py), one adapter for the whole batch.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from m4d.adapters.lora import AdapterError, Lora, encoder_terms, write_peft
from m4d.adapters.modules import attach, detach, merge, new_lora
from m4d.executor.adapters import EncoderLoraBank, encoder_adapters
from m4d.model.bert import BertConfig, BertEncoder, RowLoras, embed_with_counts

CFG = BertConfig(vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                 intermediate_size=64, max_position_embeddings=64)


def _model() -> BertEncoder:
    torch.manual_seed(0)
    model = BertEncoder(CFG).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _lora(model: BertEncoder, seed: int, ranks: dict[str, int]) -> Lora:
    """A LoRA with a rank per target (q, k and v of one fused linear differing) and a
    trained-looking B: it changes the vectors."""
    lora = Lora("text_encoder", max(ranks.values()), 8.0)
    for i, (target, rank) in enumerate(sorted(ranks.items())):
        lora.pairs.update(new_lora(model, rank, 2.0 * rank, [target], seed=seed + i).pairs)
    gen = torch.Generator().manual_seed(seed + 100)
    for pair in lora.pairs.values():
        pair.b = torch.randn(pair.b.shape, generator=gen) * 0.2
    return lora


A_RANKS = {"query": 4, "key": 2, "value": 3, "dense": 4}  # every linear, uneven q/k/v
B_RANKS = {"value": 2, "dense": 1}


def _batch(rows: int = 3, length: int = 9) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(1, CFG.vocab_size, (rows, length), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0  # padded rows: their padding is masked out, as in a real batch
    mask[-1, 4:] = 0
    return ids, mask


def _rows(loras: list[Lora], per_row: list[int]) -> RowLoras:
    return RowLoras([encoder_terms(lora, CFG) for lora in loras], torch.tensor(per_row))


@torch.no_grad()
def _reference(model: BertEncoder, lora: Lora | None, ids: torch.Tensor,
               mask: torch.Tensor) -> torch.Tensor:
    if lora is None:
        return model(ids, mask)  # type: ignore[no-any-return]
    attach(model, lora)
    try:
        return model(ids, mask)  # type: ignore[no-any-return]
    finally:
        detach(model)


@torch.no_grad()
def test_served_rows_equal_the_torch_reference() -> None:
    model = _model()
    ids, mask = _batch()
    base = model(ids, mask)
    for seed, ranks in ((1, A_RANKS), (2, B_RANKS)):
        lora = _lora(model, seed, ranks)
        served = model(ids, mask, lora=_rows([lora], [0, 0, 0]))
        expect = _reference(model, lora, ids, mask)
        assert (served - expect).abs().max().item() <= 1e-4
        assert (served - base).abs().max().item() > 1e-1  # the adapter changes the states
    assert torch.equal(model(ids, mask), base)  # the model itself never changed


@torch.no_grad()
def test_a_mixed_batch_equals_each_row_alone() -> None:
    """Rows of adapter A, B and none (A twice, apart) in one pass: each row as it is alone,
    the row without one as the base model's."""
    model = _model()
    ids, mask = _batch(rows=4)
    a, b = _lora(model, 1, A_RANKS), _lora(model, 2, B_RANKS)
    assignment = [0, -1, 1, 0]
    together = model(ids, mask, lora=_rows([a, b], assignment))
    for i, which in enumerate(assignment):
        row = slice(i, i + 1)
        alone = model(ids[row], mask[row],
                      lora=_rows([[a, b][which]], [0]) if which >= 0 else None)
        expect = _reference(model, [a, b][which] if which >= 0 else None, ids[row], mask[row])
        assert (together[row] - alone).abs().max().item() <= 1e-5, f"row {i} differs beside others"
        assert (alone - expect).abs().max().item() <= 1e-4, f"row {i} differs from the reference"
    assert (together[1] - model(ids[1:2], mask[1:2])[0]).abs().max().item() <= 1e-5
    assert (together[0] - together[3]).abs().max() > 0 and (together[2] - model(ids[2:3], mask[2:3])[0]).abs().max() > 1e-1


@torch.no_grad()
def test_merged_equals_unmerged() -> None:
    model = _model()
    ids, mask = _batch()
    lora = _lora(model, 3, A_RANKS)
    served = model(ids, mask, lora=_rows([lora], [0, 0, 0]))
    merged = copy.deepcopy(model)
    merge(merged, lora)
    assert (merged(ids, mask) - served).abs().max().item() <= 1e-4


@torch.no_grad()
def test_bfloat16_adds_the_float32_terms_rounded_once() -> None:
    """In a bf16 encoder the terms are computed in float32 and rounded into the output: the
    served states stay as close to float32 with the adapter as bf16 keeps the base model."""
    model = _model()
    half = copy.deepcopy(model).to(torch.bfloat16)
    ids, mask = _batch()
    lora = _lora(model, 4, A_RANKS)
    expect = _reference(model, lora, ids, mask)
    base_gap = (half(ids, mask).float() - model(ids, mask)).abs().max().item()
    served = half(ids, mask, lora=_rows([lora], [0, 0, 0]))
    assert served.dtype == torch.bfloat16
    gap = (served.float() - expect).abs().max().item()
    assert gap <= 2 * base_gap, (gap, base_gap)
    assert gap < (expect - model(ids, mask)).abs().max().item() / 10  # the terms are in


def _tokenizer():  # type: ignore[no-untyped-def]
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["turn", "on", "off", "the", "light", "please", "in", "kitchen", "set", "a", "timer", "for", "ten", "minutes"]
    vocab = {"[PAD]": 0, "[UNK]": 1, **{w: i + 2 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return tok


def test_embedding_in_chunks_keeps_each_texts_adapter() -> None:
    """embed_with_counts in batches of 2: each chunk's rows keep their own adapter."""
    model, tok = _model(), _tokenizer()
    texts = ["turn on the light", "set a timer", "turn off the light in the kitchen please",
             "a timer for ten minutes", "the kitchen light"]
    a, b = _lora(model, 1, A_RANKS), _lora(model, 2, B_RANKS)
    rows = _rows([a, b], [1, -1, 0, 0, -1])
    whole, counts = embed_with_counts(model, tok, texts, 16, lora=rows)
    chunked, _ = embed_with_counts(model, tok, texts, 16, lora=rows, batch_size=2)
    plain, _ = embed_with_counts(model, tok, texts, 16)
    assert counts == [4, 3, 8, 5, 3]
    assert (whole - chunked).abs().max().item() <= 1e-5
    assert torch.allclose(whole[[1, 4]], plain[[1, 4]], atol=1e-5)
    assert (whole[[0, 2, 3]] - plain[[0, 2, 3]]).abs().max().item() > 1e-2


def test_the_bank_loads_on_first_use_evicts_and_refuses_other_modules(tmp_path: Path) -> None:
    model = _model()
    specs = {}
    for i in range(3):
        write_peft(tmp_path / f"e{i}", _lora(model, 10 + i, {"query": 2, "value": 2}))
        specs[f"e{i}"] = {"kind": "lora", "module": "text_encoder", "dir": f"e{i}"}
    specs["bb"] = {"kind": "lora", "module": "backbone", "dir": "e0"}
    specs["h"] = {"kind": "head", "module": "text_encoder", "dir": "h", "labels": ["a", "b"],
                  "lora": "e1"}
    one = sum(t.nbytes for layer in encoder_terms(_lora(model, 10, {"query": 2, "value": 2}), CFG)
              for t in layer.values())
    bank = EncoderLoraBank(specs, CFG, lambda rel: tmp_path / rel, budget_bytes=2 * one + 1)
    assert bank.names == ["e0", "e1", "e2"] and bank.loads == 0
    rows = bank.rows(["e1", "", "e0", "e1"])
    assert rows is not None and rows.per_row.tolist() == [0, -1, 1, 0] and bank.loads == 2
    assert set(rows.adapters[0][0]) == {"attention.wqkv"}  # q and v: parts of one fused linear
    assert bank.rows(["", ""]) is None and bank.resident_bytes == 2 * one
    bank.rows(["e2"])  # over budget: e1 was used least recently
    assert bank.evictions == 1 and bank.resident_bytes <= 2 * one + 1
    bank.rows(["e0"])
    assert bank.loads == 3  # e0 stayed
    with pytest.raises(AdapterError, match="no adapter 'bb'"):
        bank.rows(["bb"])
    assert encoder_adapters(specs) == {"e0": "e0", "e1": "e1", "e2": "e2", "h": "e1"}
    assert encoder_adapters(specs, {"e1": "addon/e1@x", "h": "addon/h@x"})["addon/h@x"] == "addon/e1@x"
    gone: list[str] = []
    bank.hold("e0")
    assert bank.retire("e0", lambda: gone.append("e0")) == 1 and gone == []
    with pytest.raises(AdapterError, match="no lora 'e0' is served"):
        bank.hold("e0")
    bank.release("e0")
    assert gone == ["e0"] and "e0" not in bank.names
