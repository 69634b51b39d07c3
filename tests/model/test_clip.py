"""Parity: m4d.model.clip (after m4d.builder.importers.hf_clip) against transformers' CLIPModel, fp32.

The checkpoints are small random CLIPs made here (they are not models: they check names,
layouts, pooling and normalisation against transformers' own forward), with a tiny word-level
tokenizer. Preprocessing is checked against transformers' Pillow CLIP image processor.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from m4d.builder.importers.hf_clip import ClipImportError, import_hf_clip
from m4d.errors import InvalidArgument
from m4d.model.clip import ClipConfig, load_clip, tokenize
from m4d.prepare.vision import PreprocessConfig, preprocess
from PIL import Image, ImageDraw
from tokenizers import Tokenizer, models, pre_tokenizers, processors

WORDS = ["a", "photo", "of", "red", "blue", "green", "circle", "square", "triangle", "cat", "dog",
         "the", "on", "table", "is", "big", "small"]
SPECIAL = ["<pad>", "<s>", "<unused>", "</s>"]  # pad 0, bos 1, eos 3 (2 would mean "legacy")
IMAGE = 28
TEXTS = ["a photo of a red circle", "a blue square", "the dog", "a small green triangle on the table",
         "cat"]


def _tokenizer(eos_last: bool) -> Tokenizer:
    """Word-level tokenizer adding <s> ... </s>; with ``eos_last`` the EOS has the highest id
    (what the legacy ``eos_token_id == 2`` rule of CLIP relies on)."""
    order = SPECIAL[:2] + WORDS + ["</s>"] if eos_last else SPECIAL + WORDS
    vocab = {w: i for i, w in enumerate(order)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", vocab["<s>"]), ("</s>", vocab["</s>"])])
    return tok


def _make_checkpoint(folder: Path, *, legacy_eos: bool, act: str, seed: int) -> tuple[object, Tokenizer]:
    import transformers  # reference only

    torch.manual_seed(seed)
    tok = _tokenizer(eos_last=legacy_eos)
    eos = tok.token_to_id("</s>")
    cfg = transformers.CLIPConfig(
        text_config=dict(vocab_size=tok.get_vocab_size(), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=16,
                         hidden_act=act, eos_token_id=2 if legacy_eos else eos, bos_token_id=1,
                         pad_token_id=0),
        vision_config=dict(hidden_size=48, intermediate_size=96, num_hidden_layers=3,
                           num_attention_heads=4, image_size=IMAGE, patch_size=7, hidden_act=act),
        projection_dim=24, logit_scale_init_value=2.6592)
    ref = transformers.CLIPModel(cfg).eval()
    with torch.no_grad():  # random, non-trivial norms and class token
        for name, p in ref.named_parameters():
            if "layer_norm" in name or "layrnorm" in name or "class_embedding" in name:
                p.add_(torch.randn_like(p) * 0.2)
    ref.save_pretrained(folder)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "preprocessor_config.json").write_text(json.dumps({
        "crop_size": {"height": IMAGE, "width": IMAGE}, "do_center_crop": True, "do_normalize": True,
        "do_resize": True, "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711], "resample": 3,
        "size": {"shortest_edge": IMAGE}}))
    return ref, tok


def _shapes() -> list[Image.Image]:
    """Pillow-drawn test images of different sizes and aspect ratios."""
    out = []
    for i, (w, h) in enumerate([(64, 64), (90, 50), (40, 120), (28, 28), (33, 61)]):
        img = Image.new("RGB", (w, h), (255, 255, 255))
        d = ImageDraw.Draw(img)
        colour = [(220, 20, 20), (20, 40, 220), (20, 160, 40), (240, 200, 0), (90, 0, 120)][i]
        if i % 2:
            d.rectangle([w // 5, h // 5, 4 * w // 5, 4 * h // 5], fill=colour)
        else:
            d.ellipse([w // 6, h // 6, 5 * w // 6, 5 * h // 6], fill=colour)
        out.append(img)
    return out


@pytest.mark.parametrize(("legacy_eos", "act"), [(False, "quick_gelu"), (True, "gelu")])
def test_clip_embeddings_match_transformers(tmp_path: Path, legacy_eos: bool, act: str) -> None:
    torch.set_num_threads(1)
    ref, _ = _make_checkpoint(tmp_path / "ckpt", legacy_eos=legacy_eos, act=act, seed=1)
    out = tmp_path / "component"
    comp = import_hf_clip(tmp_path / "ckpt", out)
    assert comp["kind"] == "clip" and comp["dimensions"] == 24 and comp["max_seq_len"] == 16
    json.dumps(comp)
    cfg = ClipConfig.from_dict(comp["config"])
    assert ClipConfig.from_dict(cfg.to_dict()) == cfg
    model = load_clip(out / comp["weights"], cfg, compute_dtype=torch.float32)
    our_tok = Tokenizer.from_file(str(out / comp["tokenizer"]))

    pre = PreprocessConfig.from_dict(comp["config"]["preprocess"])
    pixels = preprocess(_shapes(), pre)  # [5, 3, 28, 28]
    ids = tokenize(our_tok, TEXTS, cfg.text_config)  # [5, S], padded after EOS
    assert len({len(our_tok.encode(t).ids) for t in TEXTS}) > 2  # padding is exercised

    with torch.no_grad():
        r = ref(input_ids=ids, pixel_values=pixels, attention_mask=(ids != 0).long())
    img, txt = model.image_features(pixels), model.text_features(ids)
    err_i = (img - r.image_embeds).abs().max().item()
    err_t = (txt - r.text_embeds).abs().max().item()
    logits = model.similarity(img, txt)
    err_l = (logits - r.logits_per_image).abs().max().item()
    print(f"clip fp32 ({act}, legacy_eos={legacy_eos}): image {err_i:.2e}, text {err_t:.2e}, logits {err_l:.2e}")
    assert err_i <= 1e-4 and err_t <= 1e-4 and err_l <= 1e-3
    assert torch.allclose(img.norm(dim=-1), torch.ones(5), atol=1e-5)
    # Retrieval: the same ranking of texts for every image, and of images for every text.
    assert torch.equal(logits.argsort(dim=1), r.logits_per_image.argsort(dim=1))
    assert torch.equal(logits.argsort(dim=0), r.logits_per_image.argsort(dim=0))
    # A text's embedding does not depend on the batch (padding is after EOS, attention causal).
    alone = model.text_features(tokenize(our_tok, [TEXTS[2]], cfg.text_config))
    assert torch.allclose(alone[0], txt[2], atol=1e-5)

    # bf16 compute: close; the same top-1 text wherever fp32's margin is not a near tie.
    m16 = load_clip(out / comp["weights"], cfg, compute_dtype=torch.bfloat16)
    img16, txt16 = m16.image_features(pixels), m16.text_features(ids)
    cos = min((img16 * img).sum(-1).min().item(), (txt16 * txt).sum(-1).min().item())
    print(f"clip bf16: min cosine to fp32 {cos:.5f}")
    assert img16.dtype == torch.float32 and cos > 0.99
    top2 = logits.topk(2, dim=1).values
    clear = (top2[:, 0] - top2[:, 1]) > 0.1
    assert clear.any()
    assert torch.equal(m16.similarity(img16, txt16).argmax(1)[clear], logits.argmax(1)[clear])


def test_vision_hidden_matches_hidden_states(tmp_path: Path) -> None:
    ref, _ = _make_checkpoint(tmp_path / "ckpt", legacy_eos=False, act="quick_gelu", seed=2)
    comp = import_hf_clip(tmp_path / "ckpt", tmp_path / "c")
    model = load_clip(tmp_path / "c" / comp["weights"], ClipConfig.from_dict(comp["config"]))
    pixels = torch.randn(2, 3, IMAGE, IMAGE)
    with torch.no_grad():
        hs = ref.vision_model(pixel_values=pixels, output_hidden_states=True).hidden_states  # 4 x [2, 17, 48]
    for layer in (0, 1, -2, -1):
        ours = model.vision_hidden(pixels, layer, "full")
        assert (ours - hs[layer]).abs().max().item() <= 1e-4, layer
        assert torch.equal(model.vision_hidden(pixels, layer, "default"), ours[:, 1:])
    both = model.vision_hidden(pixels, [-3, -1], "default")
    assert torch.allclose(both, torch.cat([hs[-3][:, 1:], hs[-1][:, 1:]], dim=-1), atol=1e-4)
    with pytest.raises(InvalidArgument, match="out of range"):
        model.vision_hidden(pixels, 4)
    with pytest.raises(InvalidArgument, match=r"\[B, 3, 28, 28\]"):
        model.vision_hidden(torch.randn(1, 3, 32, 32), -2)
    with pytest.raises(InvalidArgument, match="select"):
        model.vision_hidden(pixels, -2, "cls")


def test_bad_inputs_raise_invalid_argument(tmp_path: Path) -> None:
    _make_checkpoint(tmp_path / "ckpt", legacy_eos=False, act="quick_gelu", seed=3)
    comp = import_hf_clip(tmp_path / "ckpt", tmp_path / "c")
    cfg = ClipConfig.from_dict(comp["config"])
    model = load_clip(tmp_path / "c" / comp["weights"], cfg)
    tok = Tokenizer.from_file(str(tmp_path / "c" / comp["tokenizer"]))
    with pytest.raises(InvalidArgument, match="limit is 16"):
        tokenize(tok, [" ".join(["cat"] * 20)], cfg.text_config)
    with pytest.raises(InvalidArgument, match="no texts"):
        tokenize(tok, [], cfg.text_config)
    with pytest.raises(InvalidArgument, match="EOS"):
        model.text_features(torch.tensor([[1, 5, 6]]))
    with pytest.raises(InvalidArgument, match=r"lie in \[0, "):
        model.text_features(torch.tensor([[1, 999, 2]]))
    with pytest.raises(InvalidArgument, match="limit is 16"):
        model.text_features(torch.ones(1, 17, dtype=torch.long))
    with pytest.raises(InvalidArgument, match="no images"):
        preprocess([], PreprocessConfig.from_dict(comp["config"]["preprocess"]))


def test_preprocess_matches_transformers_pil_processor() -> None:
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    ref = CLIPImageProcessorPil(size={"shortest_edge": 24}, crop_size={"height": 20, "width": 20})
    ours = PreprocessConfig.from_hf(ref.to_dict())
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in
              [(50, 50), (31, 77), (90, 40), (16, 12), (24, 24)]]
    images.append(Image.fromarray(rng.integers(0, 256, (40, 30), dtype=np.uint8)))  # greyscale
    expected = torch.as_tensor(np.stack(ref(images, return_tensors="np")["pixel_values"]))
    got = preprocess(images, ours)
    assert got.shape == expected.shape == (6, 3, 20, 20)
    err = (got - expected).abs().max().item()
    print(f"preprocess max abs error vs CLIPImageProcessorPil: {err:.2e}")
    assert err <= 1e-5


def test_vision_only_checkpoint_and_import_errors(tmp_path: Path) -> None:
    import transformers

    torch.manual_seed(0)
    vcfg = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=2, image_size=IMAGE, patch_size=14)
    ref = transformers.CLIPVisionModel(vcfg).eval()
    src = tmp_path / "vis"
    ref.save_pretrained(src)
    with pytest.raises(ClipImportError, match=r"preprocessor_config\.json"):
        import_hf_clip(src, tmp_path / "out")
    (src / "preprocessor_config.json").write_text(json.dumps({"size": IMAGE, "crop_size": IMAGE}))
    comp = import_hf_clip(src, tmp_path / "out")
    assert comp["kind"] == "clip_vision" and comp["tokenizer"] is None
    model = load_clip(tmp_path / "out" / comp["weights"], ClipConfig.from_dict(comp["config"]))
    px = torch.randn(1, 3, IMAGE, IMAGE)
    with torch.no_grad():
        hs = ref(pixel_values=px, output_hidden_states=True).hidden_states
    assert (model.vision_hidden(px, -2) - hs[-2][:, 1:]).abs().max().item() <= 1e-4
    with pytest.raises(InvalidArgument, match="no text tower"):
        model.image_features(px)
    (src / "config.json").write_text(json.dumps({"model_type": "siglip"}))
    with pytest.raises(ClipImportError, match="model_type"):
        import_hf_clip(src, tmp_path / "out2")


def test_import_is_reproducible(tmp_path: Path) -> None:
    from m4image.fsutil import sha256_file

    _make_checkpoint(tmp_path / "ckpt", legacy_eos=False, act="quick_gelu", seed=4)
    a = import_hf_clip(tmp_path / "ckpt", tmp_path / "a")
    b = import_hf_clip(tmp_path / "ckpt", tmp_path / "b")
    assert a == b
    for name in ("model.safetensors", "tokenizer.json"):
        assert sha256_file(tmp_path / "a" / name) == sha256_file(tmp_path / "b" / name), name
    assert not list((tmp_path / "a").glob(".*tmp*")), "temporary files left behind"
