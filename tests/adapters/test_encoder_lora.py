"""A LoRA on the text encoder trained with a task head (``m4d.adapters.encoder_lora``): what
the trainer writes loads with our reader and gives the vectors it trained, the served per-row
path equals the torch reference on them, and `python -m m4d.adapters head --lora-rank` on the
real image writes the head (naming its LoRA) and the PEFT folder pinned to the encoder."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch
from m4d.adapters.encoder_lora import (
    STORE_DTYPE,
    Encoder,
    EncoderTrainSettings,
    _batch_vectors,
    train_encoder_head,
    vectors,
)
from m4d.adapters.heads import read_head, train_head, write_head
from m4d.adapters.lora import peft_module, read_peft, write_peft
from m4d.adapters.modules import attach, detach
from m4d.model.bert import BertConfig, BertEncoder

CFG = BertConfig(vocab_size=40, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                 intermediate_size=64, max_position_embeddings=32)
WORDS = ["turn", "on", "off", "the", "light", "please", "in", "kitchen", "set", "a", "timer", "for", "ten", "minutes", "play", "music"]


def _encoder() -> Encoder:
    from tokenizers import Tokenizer, models, pre_tokenizers

    torch.manual_seed(0)
    model = BertEncoder(CFG).eval()
    model.requires_grad_(False)
    tok = Tokenizer(models.WordLevel({"[PAD]": 0, "[UNK]": 1,
                                      **{w: i + 2 for i, w in enumerate(WORDS)}}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return Encoder(model, tok, 16, True, "ab" * 32)


def _examples(n: int, seed: int) -> list[tuple[str, str]]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        label = ["light_on", "light_off", "timer"][int(torch.randint(3, (1,), generator=gen))]
        words = {"light_on": "turn on the light", "light_off": "turn off the light",
                 "timer": "set a timer for ten minutes"}[label].split()
        extra = [WORDS[int(i)] for i in torch.randint(len(WORDS), (2,), generator=gen)]
        out.append((" ".join(words + extra), label))
    return out


def test_trained_adapter_written_loads_and_gives_the_same_vectors(tmp_path: Path) -> None:
    encoder = _encoder()
    texts = [t for t, _ in _examples(12, seed=9)]
    before = vectors(encoder, texts)
    settings = EncoderTrainSettings(rank=4, alpha=8, batch=8, max_epochs=4, eval_every=5, lr=1e-2,
                                    head_lr=1e-2, seed=3)
    lora, head, report = train_encoder_head(encoder, _examples(96, seed=1), settings,
                                            validation=_examples(24, seed=2))
    assert lora.module == "text_encoder" and lora.base_model == encoder.digest
    assert lora.targets == ["dense", "key", "query", "value"] and len(lora.pairs) == 6 * 2
    assert any(float(p.b.abs().max()) > 0 for p in lora.pairs.values())  # it trained
    assert report.steps > 0 and 0 < report.best_step <= report.steps and report.val_examples == 24
    assert head.labels == ["light_off", "light_on", "timer"]
    assert not any(type(m).__name__ == "LoraLinear" for m in encoder.model.modules())

    write_peft(tmp_path / "enc-lora", lora, dtype=STORE_DTYPE)
    head.lora = "enc-lora"
    write_head(tmp_path / "head", head)
    assert peft_module(tmp_path / "enc-lora") == "text_encoder"
    again = read_peft(tmp_path / "enc-lora", "text_encoder")
    assert again.base_model == encoder.digest and set(again.pairs) == set(lora.pairs)
    assert read_head(tmp_path / "head").lora == "enc-lora"
    trained, loaded = vectors(encoder, texts, lora), vectors(encoder, texts, again)
    assert torch.equal(trained, loaded)  # the trainer hands back what it stores
    assert (loaded - before).abs().max().item() > 1e-3  # and that changes the vectors
    attach(encoder.model, again)
    try:
        with torch.no_grad():
            reference = _batch_vectors(encoder, texts)  # the LoRA in torch, as it trained
    finally:
        detach(encoder.model)
    assert (reference - loaded).abs().max().item() <= 1e-4
    # fp16 storage: half the bytes of float32, and the file is what was evaluated
    size = (tmp_path / "enc-lora" / "adapter_model.safetensors").stat().st_size
    assert size < sum(p.a.numel() + p.b.numel() for p in lora.pairs.values()) * 3


def test_an_mlp_head_trains_with_the_lora_from_the_frozen_mlp_head(tmp_path: Path) -> None:
    encoder = _encoder()
    train, val = _examples(96, seed=1), _examples(24, seed=2)
    frozen = train_head(vectors(encoder, [t for t, _ in train]), [y for _, y in train],
                        hidden=16, seed=3)
    settings = EncoderTrainSettings(rank=4, alpha=8, batch=8, max_epochs=4, eval_every=5, lr=1e-2,
                                    head_lr=1e-2, seed=3)
    lora, head, report = train_encoder_head(encoder, train, settings, validation=val,
                                            frozen=frozen)
    assert head.hidden is not None and frozen.hidden is not None
    assert head.hidden.weight.shape == (16, CFG.hidden_size) and head.weight.shape == (3, 16)
    assert head.labels == frozen.labels and report.best_step > 0
    for name, start in frozen.tensors().items():  # every layer of the head trained on
        assert (head.tensors()[name] - start).abs().max().item() > 1e-4, name
    assert not any(t.requires_grad for t in head.tensors().values())
    write_head(tmp_path / "head", head)
    texts = [t for t, _ in val]
    assert torch.equal(read_head(tmp_path / "head").logits(vectors(encoder, texts, lora)),
                       head.logits(vectors(encoder, texts, lora)))
    # without a head to start from, settings.hidden trains the frozen MLP head here
    _, fresh, _ = train_encoder_head(encoder, train, EncoderTrainSettings(
        rank=2, batch=8, max_epochs=1, eval_every=5, seed=3, hidden=8), validation=val)
    assert fresh.hidden is not None and fresh.hidden.weight.shape == (8, CFG.hidden_size)


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "m4d.adapters", *args], capture_output=True,
                          text=True, timeout=600)


def _labelled(path: Path, rows: list[tuple[str, str]]) -> Path:
    path.write_text("".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in rows))
    return path


def test_head_with_lora_rank_on_the_real_image(default_image: Path, tmp_path: Path) -> None:
    rows = [("turn on the lights", "on"), ("lights on please", "on"), ("switch the lamp on", "on"),
            ("turn off the lights", "off"), ("lights off please", "off"),
            ("switch the lamp off", "off")] * 3
    data = _labelled(tmp_path / "train.jsonl", rows)
    val = _labelled(tmp_path / "val.jsonl", [("make it bright", "on"), ("make it dark", "off")])
    done = _run("head", "--image", str(default_image), "--data", str(data), "--val", str(val),
                "--eval", str(val), "--out", str(tmp_path / "lamp-head"), "--lora-rank", "2",
                "--batch", "6", "--epochs", "1", "--threads", "1")
    assert done.returncode == 0, done.stderr
    manifest = json.loads((default_image / "manifest.json").read_text())
    weights = manifest["components"]["text_encoder"]["weights"]
    lora = read_peft(tmp_path / "lamp-head-lora", "text_encoder")  # the default --lora-out
    assert lora.rank == 2 and lora.base_model == manifest["files"][weights]["sha256"]
    head = read_head(tmp_path / "lamp-head")
    assert head.lora == "lamp-head-lora" and head.labels == ["off", "on"]
    metrics = json.loads((tmp_path / "lamp-head" / "metrics.json").read_text())
    assert set(metrics["eval"]) == {"head", "frozen_head", "base", "examples"}
    assert metrics["train"]["lora"]["steps"] == 3 and metrics["train"]["lora"]["val_examples"] == 2
    assert "train [" in done.stderr
    done = _run("head", "--image", str(default_image), "--data", str(data),
                "--out", str(tmp_path / "plain"))
    assert done.returncode == 0, done.stderr
    assert read_head(tmp_path / "plain").lora == "" and not (tmp_path / "plain-lora").exists()


def test_head_with_hidden_on_the_real_image(default_image: Path, tmp_path: Path) -> None:
    rows = [("turn on the lights", "on"), ("lights on please", "on"), ("switch the lamp on", "on"),
            ("turn off the lights", "off"), ("lights off please", "off"),
            ("switch the lamp off", "off")]
    data = _labelled(tmp_path / "train.jsonl", rows)
    val = _labelled(tmp_path / "val.jsonl", [("make it bright", "on"), ("make it dark", "off")])
    done = _run("head", "--image", str(default_image), "--data", str(data), "--eval", str(val),
                "--out", str(tmp_path / "mlp"), "--hidden", "8", "--activation", "relu",
                "--threads", "1")
    assert done.returncode == 0, done.stderr
    head = read_head(tmp_path / "mlp")
    assert head.hidden is not None and head.hidden.activation == "relu"
    assert head.hidden.weight.shape == (8, 384) and head.labels == ["off", "on"]
    metrics = json.loads((tmp_path / "mlp" / "metrics.json").read_text())
    assert set(metrics["eval"]) == {"head", "linear_head", "base", "examples"}
    assert (metrics["train"]["hidden"], metrics["train"]["activation"]) == (8, "relu")
