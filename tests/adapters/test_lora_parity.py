"""Our LoRA forward against PEFT's, on small random Llama and BERT checkpoints (fp32).

The networks have random weights (they are not models): the tests check names, the fused
q/k/v and gate/up slices, scaling (alpha / r, rsLoRA, rank and alpha patterns), merging, and
that files we write load in PEFT with the same logits.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from m4d.adapters.lora import AdapterError, Lora, LoraPair, read_peft, write_peft
from m4d.adapters.modules import attach, collect, detach, merge, new_lora
from m4d.model.bert import BertConfig, load_bert
from m4d.model.llama import LlamaConfig, load_llama

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _hf_llama(tmp_path: Path):  # type: ignore[no-untyped-def]
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, rope_theta=10000.0, rms_norm_eps=1e-5,
        max_position_embeddings=128, tie_word_embeddings=True)
    model = transformers.LlamaForCausalLM(cfg).eval()
    model.save_pretrained(tmp_path / "base")
    ours_cfg = LlamaConfig(vocab_size=256, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=96,
                           rope_base=10000.0, norm_eps=1e-5, max_seq_len=128)
    ours = load_llama(tmp_path / "base" / "model.safetensors", ours_cfg, weight_format="float32",
                      compute_dtype=torch.float32)
    return model, ours


def _peft(model, targets, tmp_path: Path, **kw):  # type: ignore[no-untyped-def]
    import peft

    config = peft.LoraConfig(r=kw.pop("r", 8), lora_alpha=kw.pop("alpha", 16), target_modules=targets,
                             init_lora_weights=False, lora_dropout=0.0, **kw)
    torch.manual_seed(1)
    wrapped = peft.get_peft_model(model, config).eval()
    wrapped.save_pretrained(tmp_path / "adapter")
    return wrapped, tmp_path / "adapter"


@pytest.mark.parametrize("options", [
    {},
    {"use_rslora": True},
    {"rank_pattern": {"v_proj": 4}, "alpha_pattern": {"down_proj": 3.0}},
])
def test_llama_lora_equals_peft(tmp_path: Path, options: dict) -> None:
    hf, ours = _hf_llama(tmp_path)
    ref, folder = _peft(hf, LLAMA_TARGETS, tmp_path, **options)
    lora = read_peft(folder, "backbone")
    assert lora.module == "backbone" and sorted(lora.targets) == sorted(LLAMA_TARGETS)
    assert len(lora.pairs) == 2 * len(LLAMA_TARGETS)
    ids = torch.randint(0, 256, (2, 19), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expect = ref(input_ids=ids).logits
        base = ref.get_base_model()
        with ref.disable_adapter():
            plain = base(input_ids=ids).logits
    before = ours.forward_full(ids)
    assert (before - plain).abs().max().item() <= 1e-4  # the same base network
    attach(ours, lora)
    got = ours.forward_full(ids)
    assert (got - expect).abs().max().item() <= 1e-4
    assert (got - before).abs().max().item() > 1e-2  # the adapter changes the logits
    # the cached forward (the serving path in torch) agrees with the full one
    ours.setup_caches(2, 32)
    cached = ours(ids, torch.arange(19).expand(2, 19))
    assert (cached - expect).abs().max().item() <= 1e-4
    detach(ours)
    assert torch.equal(ours.forward_full(ids), before)


def test_merged_equals_unmerged(tmp_path: Path) -> None:
    hf, ours = _hf_llama(tmp_path)
    _, folder = _peft(hf, ["q_proj", "v_proj", "down_proj", "up_proj"], tmp_path)
    lora = read_peft(folder, "backbone")
    ids = torch.randint(0, 256, (1, 17), generator=torch.Generator().manual_seed(5))
    attach(ours, lora)
    unmerged = ours.forward_full(ids)
    detach(ours)
    merge(ours, lora)
    assert (ours.forward_full(ids) - unmerged).abs().max().item() <= 1e-4


def test_trained_adapter_written_by_us_loads_in_peft(tmp_path: Path) -> None:
    import peft

    hf, ours = _hf_llama(tmp_path)
    lora = new_lora(ours, rank=4, alpha=8, targets=["q_proj", "v_proj", "gate_proj"], seed=2)
    wrappers = attach(ours, lora, trainable=True)
    params = [p for w in wrappers for p in w.parameters() if p.requires_grad]
    assert params and all(not p.requires_grad for n, p in ours.named_parameters() if ".base." in n)
    opt = torch.optim.SGD(params, lr=0.5)
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(7))
    for _ in range(3):  # a few steps so B is no longer zero
        loss = torch.nn.functional.cross_entropy(
            ours.causal_logits(ids)[:, :-1].reshape(-1, 256), ids[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    trained = collect(ours, lora)
    assert any(p.b.abs().max() > 0 for p in trained.pairs.values())
    write_peft(tmp_path / "ours", trained)
    with torch.no_grad():
        expect = ours.causal_logits(ids)
        ref = peft.PeftModel.from_pretrained(hf, str(tmp_path / "ours")).eval()
        got = ref(input_ids=ids).logits
    assert (got - expect).abs().max().item() <= 1e-4
    again = read_peft(tmp_path / "ours", "backbone")
    assert set(again.pairs) == set(trained.pairs)


def test_bert_lora_equals_peft(tmp_path: Path) -> None:
    import transformers

    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=120, hidden_size=32, num_hidden_layers=2,
                                  num_attention_heads=4, intermediate_size=64,
                                  max_position_embeddings=64)
    hf = transformers.BertModel(cfg, add_pooling_layer=False).eval()
    hf.save_pretrained(tmp_path / "bert")
    ours = load_bert(tmp_path / "bert" / "model.safetensors", BertConfig.from_dict(cfg.to_dict()))
    ref, folder = _peft(hf, ["query", "value", "dense"], tmp_path, r=4, alpha=8)
    lora = read_peft(folder, "text_encoder")
    assert sorted(lora.targets) == ["dense", "query", "value"]
    ids = torch.randint(0, 120, (2, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    with torch.no_grad():
        expect = ref(input_ids=ids, attention_mask=mask).last_hidden_state
        attach(ours, lora)
        got = ours(ids, mask)
    assert (got - expect)[mask.bool()].abs().max().item() <= 1e-4


def test_bad_adapters_are_refused_with_the_reason(tmp_path: Path) -> None:
    hf, ours = _hf_llama(tmp_path)
    _, folder = _peft(hf, ["q_proj"], tmp_path)
    with pytest.raises(AdapterError, match="not a text_encoder linear"):
        read_peft(folder, "text_encoder")
    lora = read_peft(folder, "backbone")
    wide = Lora("backbone", 8, 16, {name: LoraPair(p.a, torch.zeros(p.b.shape[0] + 1, 8), 2.0)
                                    for name, p in lora.pairs.items()})
    with pytest.raises(AdapterError, match="do not fit"):
        attach(ours, wide)
    assert not any(type(m).__name__ == "LoraLinear" for m in ours.modules())
    extra = Lora("backbone", 8, 16, {"model.layers.7.self_attn.q_proj": next(iter(lora.pairs.values()))})
    with pytest.raises(AdapterError, match="does not"):
        attach(ours, extra)
    (folder / "adapter_config.json").write_text("{not json")
    with pytest.raises(AdapterError, match="is not JSON"):
        read_peft(folder, "backbone")
    with pytest.raises(AdapterError, match="is missing"):
        read_peft(tmp_path / "nowhere", "backbone")


def test_bf16_training_keeps_the_adapter_in_float32_and_the_loss_close(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`dtype` bfloat16 runs the matmuls under autocast (fast where the CPU has bf16
    arithmetic); the LoRA's weights and gradients stay float32 and the loss is float32's
    within bf16's rounding. "auto" follows the CPU."""
    from m4d.adapters import train

    _, ours = _hf_llama(tmp_path)
    lora = new_lora(ours, rank=4, alpha=8, targets=LLAMA_TARGETS, seed=3)
    for pair in lora.pairs.values():
        pair.b = torch.randn(pair.b.shape, generator=torch.Generator().manual_seed(4)) * 0.1
    wrappers = attach(ours, lora, trainable=True)
    params = [p for w in wrappers for p in w.parameters() if p.requires_grad]
    batch = [([5, 9, 17, 33, 2, 8, 90, 4], 5), ([7, 7, 1, 60, 3], 3)]
    losses, grads = {}, {}
    for dtype in (torch.float32, torch.bfloat16):
        for p in params:
            p.grad = None
        loss = train._loss(ours, batch, dtype)
        loss.backward()  # type: ignore[no-untyped-call]
        losses[dtype], grads[dtype] = loss.item(), torch.cat([p.grad.flatten() for p in params])
        assert loss.dtype == torch.float32
    assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32 for p in params)
    assert abs(losses[torch.bfloat16] - losses[torch.float32]) <= 0.02 * losses[torch.float32]
    cos = torch.nn.functional.cosine_similarity(grads[torch.bfloat16], grads[torch.float32], dim=0)
    assert cos > 0.99  # the same direction, to bf16's rounding
    detach(ours)

    for has, want in ((True, torch.bfloat16), (False, torch.float32)):
        monkeypatch.setattr(train, "has_bf16_arithmetic", lambda has=has: has)
        assert train.TrainSettings(dtype="auto").compute_dtype == want
        assert train.TrainSettings(dtype="float32").compute_dtype == torch.float32
    with pytest.raises(AdapterError, match="dtype 'float16' is not auto, bfloat16 or float32"):
        _ = train.TrainSettings(dtype="float16").compute_dtype
