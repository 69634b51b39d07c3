"""Adapters as m4d serves them: per-row LoRA inside the fused decode step (w4a8, float32) on
the real SmolLM2 weights, rows of different adapters (and none) in one batch.

The reference is the same model with the adapter attached in torch (``LoraLinear``, which
equals PEFT: tests/adapters/test_lora_parity.py) running its layers one by one.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from m4d.adapters.lora import AdapterError, Lora, decode_tensors, sizes_for, write_peft
from m4d.adapters.modules import attach, detach, new_lora
from m4d.executor.adapters import AdapterBank
from m4d.model.llama import Llama

PROMPTS = ["Turn off the kitchen lights.", "Water boils at", "Set a timer for ten minutes",
           "The three primary colours are"]


def _random_lora(model: Llama, seed: int, targets: list[str], rank: int = 8) -> Lora:
    lora = new_lora(model, rank=rank, alpha=2 * rank, targets=targets, seed=seed)
    gen = torch.Generator().manual_seed(seed + 100)
    for pair in lora.pairs.values():  # a trained-looking B: the adapter changes the answers
        pair.b = torch.randn(pair.b.shape, generator=gen) * 0.02
    return lora


def _tensors(model: Llama, lora: Lora) -> list[torch.Tensor]:
    c = model.config
    return decode_tensors(lora, c.n_layers, sizes_for(c))


def _greedy(model: Llama, prompts: list[list[int]], rows: list[int], adapters: list[int],
            bank: list[torch.Tensor], steps: int = 6) -> list[list[int]]:
    """Prefill each prompt in its row, then decode all rows together for `steps` tokens."""
    out: list[list[int]] = [[] for _ in prompts]
    nxt = []
    for p, r, a in zip(prompts, rows, adapters, strict=True):
        lora = (bank, torch.tensor([a])) if a >= 0 else None
        logits = model(torch.tensor([p]), torch.arange(len(p))[None], rows=torch.tensor([r]),
                       last_only=True, lora=lora)
        nxt.append(int(logits[0, -1].argmax()))
    pos = [len(p) for p in prompts]
    for _ in range(steps):
        for i, t in enumerate(nxt):
            out[i].append(t)
        lora = (bank, torch.tensor(adapters)) if any(a >= 0 for a in adapters) else None
        logits = model(torch.tensor([[t] for t in nxt]), torch.tensor([[p] for p in pos]),
                       rows=torch.tensor(rows), lora=lora)[:, 0]
        nxt = [int(t) for t in logits.argmax(-1)]
        pos = [p + 1 for p in pos]
    return out


def test_rows_of_different_adapters_share_a_step_and_get_their_own_tokens(imported_llama) -> None:
    model = imported_llama.load("w4a8", torch.float32)
    model.setup_caches(6, 128)
    assert model.fused and model.serves_adapters
    tok = imported_llama.tokenizer
    prompts = [tok.encode(t) for t in PROMPTS]
    a = _random_lora(model, 1, ["q_proj", "v_proj", "down_proj"])
    b = _random_lora(model, 2, ["k_proj", "o_proj", "gate_proj", "up_proj"], rank=4)
    bank = _tensors(model, a) + _tensors(model, b)
    assignment = [0, -1, 1, 0]
    together = _greedy(model, prompts, [3, 0, 5, 1], assignment, bank)
    for i, (p, adapter) in enumerate(zip(prompts, assignment, strict=True)):
        alone = _greedy(model, [p], [2], [adapter], bank)[0]
        assert together[i] == alone, f"row {i} (adapter {adapter}) differs beside others"
    base = _greedy(model, prompts, [3, 0, 5, 1], [-1] * 4, [])
    assert together[1] == base[1]  # the row without adapter is the base model's
    assert together[0] != base[0] or together[2] != base[2] or together[3] != base[3]


def test_fused_lora_step_computes_what_torch_lora_computes(imported_llama) -> None:
    """Logits of the fused step with a row's adapter against the same w4a8 model with the
    adapter attached in torch and its layers run one by one."""
    model = imported_llama.load("w4a8", torch.float32)
    tok = imported_llama.tokenizer
    lora = _random_lora(model, 3, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                   "up_proj", "down_proj"])
    prompt = tok.encode(PROMPTS[0])

    def run(fused: bool) -> list[torch.Tensor]:
        model.setup_caches(2, 64)
        if fused:
            assert model.fused
            rows = ([*_tensors(model, lora)], torch.tensor([0]))
        else:
            attach(model, lora)
            assert not model.fused
            rows = None
        try:
            logits = model(torch.tensor([prompt]), torch.arange(len(prompt))[None],
                           rows=torch.tensor([1]), last_only=True, lora=rows)[0, -1]
            steps, pos = [logits.log_softmax(-1)], len(prompt)
            for _ in range(4):
                t = int(steps[-1].argmax())
                logits = model(torch.tensor([[t]]), torch.tensor([[pos]]), rows=torch.tensor([1]),
                               lora=rows)[0, 0]
                steps.append(logits.log_softmax(-1))
                pos += 1
            return steps
        finally:
            detach(model)

    fused, layered = run(True), run(False)
    for i, (f, g) in enumerate(zip(fused, layered, strict=True)):
        assert int(f.argmax()) == int(g.argmax()), f"step {i}: next tokens differ"
        kl = (g.exp() * (g - f)).sum(-1).item()
        assert kl < 1e-4, f"step {i}: KL {kl}"


def test_adapter_bank_loads_on_first_use_and_evicts_least_recently_used(
        imported_llama, tmp_path: Path) -> None:
    model = imported_llama.load("w4a8", torch.float32)
    specs = {}
    for i in range(3):
        write_peft(tmp_path / f"a{i}", _random_lora(model, 10 + i, ["q_proj", "v_proj"]))
        specs[f"a{i}"] = {"kind": "lora", "module": "backbone", "dir": f"a{i}"}
    c = model.config  # one adapter's bytes as the bank keeps it (bf16, with row spans)
    one = sum(t.numel() * t.element_size() for t in decode_tensors(
        _random_lora(model, 10, ["q_proj", "v_proj"]), c.n_layers,
        sizes_for(c), torch.bfloat16, spans=True))
    bank = AdapterBank({**specs, "enc": {"kind": "lora", "module": "text_encoder", "dir": "x"}},
                       model.config, lambda rel: tmp_path / rel, budget_bytes=2 * one + 1)
    assert bank.names == ["a0", "a1", "a2"] and bank.loads == 0
    step = bank.step(["a1", "", "a0", "a1"])
    assert step is not None and step[1].tolist() == [0, -1, 1, 0]
    assert sum(t.is_floating_point() for t in step[0]) == 2 * 8 * model.config.n_layers
    assert all(t.dtype in (torch.bfloat16, torch.int32) for t in step[0]) and bank.loads == 2
    assert bank.step(["", ""]) is None
    bank.step(["a2"])  # over budget: a1 was used least recently (a0 after it)
    assert bank.evictions == 1 and bank.resident_bytes <= 2 * one + 1
    bank.step(["a0"])
    assert bank.loads == 3  # a0 stayed
    bank.step(["a1"])
    assert bank.loads == 4  # a1 was read again
    with pytest.raises(AdapterError, match="no adapter 'enc'"):
        bank.step(["enc"])
