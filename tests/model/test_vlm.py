"""M4 path 1 (vision encoder -> projector -> Llama backbone) against references, fp32.

* LLaVA: a small random ``LlavaForConditionalGeneration`` (CLIP vision tower + Llama) saved by
  transformers, imported with ``import_llava``, run through our modules: logits must match
  transformers' on the same pixels and prompt.
* MobileVLM: no installable reference exists (the PyPI package ``mobilevlm`` 0.0.3 is an
  unrelated re-implementation on zetascale, not Meituan's code), so the LDP / LDPv2 projectors
  are checked against an independent formulation written here with explicit functional ops
  and MobileVLM's tensor names, the whole pipeline against transformers' CLIP + Llama with that
  projector in between, and shapes / parameter counts against MobileVLM's published design.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from m4d.builder.importers.llava import import_llava
from m4d.builder.importers.mobilevlm import MobileVLMImportError, import_mobilevlm
from m4d.errors import InvalidArgument
from m4d.model.clip import ClipConfig, load_clip
from m4d.model.llama import LlamaConfig, load_llama
from m4d.model.projector import (
    LdpProjector,
    MlpProjector,
    Projector,
    ProjectorConfig,
    build_projector,
    embed_prompt,
    load_projector,
    se_channels,
    splice_image,
)
from safetensors.torch import save_file
from tokenizers import Tokenizer, models, pre_tokenizers

IMAGE, PATCH = 28, 7  # 4 x 4 = 16 patches
VOCAB = 120


def _tokenizer(path: Path) -> None:
    vocab = {f"w{i}": i for i in range(VOCAB)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(path))


def _preprocessor(folder: Path, size: int = IMAGE) -> None:
    (folder / "preprocessor_config.json").write_text(json.dumps(
        {"size": {"shortest_edge": size}, "crop_size": {"height": size, "width": size},
         "image_mean": [0.5, 0.5, 0.5], "image_std": [0.25, 0.25, 0.25]}))


def _perturb_norms(model: torch.nn.Module) -> None:
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "class_embedding" in name:
                p.add_(torch.randn_like(p) * 0.2)


def _round_fp16(model: torch.nn.Module) -> None:
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(torch.float16).to(torch.float32))


def _load_path1(out: Path, comps: dict) -> tuple:
    v, p, b = comps["vision_encoder"], comps["projector"], comps["backbone"]
    vision = load_clip(out / v["weights"], ClipConfig.from_dict(v["config"]))
    proj = load_projector(out / p["weights"], ProjectorConfig.from_dict(p["config"]))
    llama = load_llama(out / b["weights"], LlamaConfig.from_dict(b["config"]),
                       weight_format="float32", compute_dtype=torch.float32)
    return vision, proj, llama


def _our_logits(comps: dict, vision, proj, llama, pixels: torch.Tensor, ids: list[int]) -> tuple:
    v, p = comps["vision_encoder"]["config"], comps["projector"]
    feats = proj(vision.vision_hidden(pixels, v["vision_feature_layer"], v["vision_feature_select_strategy"]))
    assert feats.shape[1] == p["tokens_per_image"]
    embeds = embed_prompt(llama.tok_embeddings, ids, p["image_token_id"], feats)  # [1, S', D]
    full = llama.forward_full(None, embeds=embeds)
    llama.setup_caches(1, embeds.shape[1])
    cached = llama(None, torch.arange(embeds.shape[1])[None], embeds=embeds)
    return full, cached, feats


# ---------------------------------------------------------------------------------------------
# LLaVA


@pytest.mark.parametrize(("layer", "select", "tied"), [(-2, "default", False), ([-3, -1], "full", True)])
def test_llava_logits_match_transformers(tmp_path: Path, layer, select: str, tied: bool) -> None:
    import transformers  # reference only

    torch.set_num_threads(1)
    torch.manual_seed(0)
    image_token = VOCAB - 1
    cfg = transformers.LlavaConfig(
        vision_config=transformers.CLIPVisionConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
            image_size=IMAGE, patch_size=PATCH),
        text_config=transformers.LlamaConfig(
            vocab_size=VOCAB, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, rope_theta=20000.0,
            max_position_embeddings=256, tie_word_embeddings=tied, bos_token_id=1, eos_token_id=2),
        image_token_index=image_token, vision_feature_layer=layer,
        vision_feature_select_strategy=select, tie_word_embeddings=tied)
    ref = transformers.LlavaForConditionalGeneration(cfg).eval()
    _perturb_norms(ref)
    src = tmp_path / "llava"
    ref.save_pretrained(src)
    _tokenizer(src / "tokenizer.json")
    _preprocessor(src)
    template = "{% for m in messages %}USER: {{ m['content'] }} {% endfor %}ASSISTANT:"
    (src / "chat_template.json").write_text(json.dumps({"chat_template": template}))

    out = tmp_path / "image"
    comps = import_llava(src, out)
    assert comps["backbone"]["chat_template"] == template
    assert set(comps) == {"vision_encoder", "projector", "backbone"}
    assert [c["kind"] for c in comps.values()] == ["clip_vision", "projector", "llama"]
    json.dumps(comps)
    n_feat = 16 + (select == "full")
    assert comps["projector"]["tokens_per_image"] == n_feat
    assert comps["projector"]["image_token_id"] == image_token
    for c in comps.values():
        assert (out / c["weights"]).is_file()
    vision, proj, llama = _load_path1(out, comps)

    pixels = torch.randn(1, 3, IMAGE, IMAGE)
    before, after = [1, 5, 17, 33], [40, 41, 7, 99, 3]
    ids = [*before, image_token, *after]  # our convention: one placeholder
    ref_ids = torch.tensor([[*before, *[image_token] * n_feat, *after]])  # the processor's expansion
    with torch.no_grad():
        expected = ref(input_ids=ref_ids, pixel_values=pixels).logits  # [1, S', V]
    full, cached, _ = _our_logits(comps, vision, proj, llama, pixels, ids)
    err_full = (full - expected).abs().max().item()
    err_cached = (cached - expected).abs().max().item()
    print(f"llava fp32 layer={layer} {select}: max abs logit error full {err_full:.2e}, cached {err_cached:.2e}")
    assert full.shape == expected.shape
    assert err_full <= 1e-4 and err_cached <= 1e-4

    # bf16 compute along the whole path stays close to the fp32 reference.
    v, p = comps["vision_encoder"], comps["projector"]
    vision16 = load_clip(out / v["weights"], ClipConfig.from_dict(v["config"]), compute_dtype=torch.bfloat16)
    proj16 = load_projector(out / p["weights"], ProjectorConfig.from_dict(p["config"]),
                            compute_dtype=torch.bfloat16)
    llama16 = load_llama(out / comps["backbone"]["weights"], LlamaConfig.from_dict(comps["backbone"]["config"]),
                         weight_format="bfloat16", compute_dtype=torch.bfloat16)
    full16, _, _ = _our_logits(comps, vision16, proj16, llama16, pixels, ids)
    cos = F.cosine_similarity(full16[0], expected[0], dim=-1).min().item()
    print(f"llava bf16: min per-position logit cosine {cos:.4f}")
    assert cos > 0.98


def test_llava_import_errors(tmp_path: Path) -> None:
    from m4d.builder.importers.hf_clip import (
        ClipImportError,  # base of the LLaVA / MobileVLM errors
    )
    from m4d.builder.importers.llava import LlavaImportError

    src = tmp_path / "x"
    src.mkdir()
    with pytest.raises(ClipImportError, match=r"config\.json is missing"):
        import_llava(src, tmp_path / "out")
    (src / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(LlavaImportError, match="expected 'llava'"):
        import_llava(src, tmp_path / "out")
    (src / "config.json").write_text(json.dumps({
        "model_type": "llava", "image_token_index": 5, "text_config": {"model_type": "llama"},
        "vision_config": {"model_type": "siglip_vision_model", "hidden_size": 8, "intermediate_size": 8,
                          "num_hidden_layers": 1, "num_attention_heads": 1}}))
    with pytest.raises(ClipImportError, match="only CLIP vision towers"):
        import_llava(src, tmp_path / "out")


def test_splice_image_convention_and_errors() -> None:
    emb = torch.arange(5 * 2, dtype=torch.float32).view(1, 5, 2)
    ids = torch.tensor([[7, 9, 3, 9, 4]])
    feats = torch.full((2, 3, 2), -1.0)
    feats[1] = -2.0
    out = splice_image(emb, ids, 9, feats)
    assert out.shape == (1, 5 - 2 + 6, 2)
    assert torch.equal(out[0, 0], emb[0, 0]) and torch.equal(out[0, 4], emb[0, 2])
    assert torch.equal(out[0, 1:4], feats[0]) and torch.equal(out[0, 5:8], feats[1])
    assert torch.equal(out[0, 8], emb[0, 4])
    with pytest.raises(InvalidArgument, match="2 image placeholders but 1"):
        splice_image(emb, ids, 9, feats[:1])
    with pytest.raises(InvalidArgument, match="width"):
        splice_image(emb, ids, 9, torch.zeros(2, 3, 4))
    table = torch.nn.Embedding(10, 2)
    with pytest.raises(InvalidArgument, match="outside the vocabulary"):
        embed_prompt(table, [1, 10, -200], -200, torch.zeros(3, 2))
    assert embed_prompt(table, [1, -200, 2], -200, torch.zeros(3, 2)).shape == (1, 5, 2)


# ---------------------------------------------------------------------------------------------
# MobileVLM LDP / LDPv2: an independent formulation with MobileVLM's own tensor names


def _mobilevlm_projector_tensors(kind: str, cin: int, c: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Random projector weights named as MobileVLM saves them (``model.mm_projector.*``)."""
    def r(*shape: int, scale: float = 0.2) -> torch.Tensor:
        return torch.randn(*shape, generator=gen) * scale

    p = "model.mm_projector."
    if kind == "ldpnetv2":
        return {p + "mlp.mlp.0.weight": r(c, cin), p + "mlp.mlp.0.bias": r(c),
                p + "mlp.mlp.2.weight": r(c, c), p + "mlp.mlp.2.bias": r(c),
                p + "peg.peg.0.weight": r(c, 1, 3, 3), p + "peg.peg.0.bias": r(c)}
    s = max(8, (c // 4 + 4) // 8 * 8)  # torchvision's _make_divisible(c // 4, 8) for these sizes
    t = {p + "model.mlp.1.weight": r(c, cin), p + "model.mlp.1.bias": r(c),
         p + "model.mlp.3.weight": r(c, c), p + "model.mlp.3.bias": r(c)}
    for i in (1, 2):
        b = f"{p}model.mb_block.{i}.block."
        t |= {b + "0.0.weight": r(c, 1, 3, 3), b + "0.1.weight": 1 + r(c), b + "0.1.bias": r(c),
              b + "1.fc1.weight": r(s, c, 1, 1), b + "1.fc1.bias": r(s),
              b + "1.fc2.weight": r(c, s, 1, 1), b + "1.fc2.bias": r(c),
              b + "2.0.weight": r(c, c, 1, 1), b + "2.1.weight": 1 + r(c), b + "2.1.bias": r(c)}
    return t


def _reference_ldp(w: dict[str, torch.Tensor], kind: str, x: torch.Tensor) -> torch.Tensor:
    """MobileVLM's projector written out with plain ops (channels-last LayerNorm by hand)."""
    def chan_ln(y: torch.Tensor, g: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        mu = y.mean(dim=1, keepdim=True)
        var = ((y - mu) ** 2).mean(dim=1, keepdim=True)
        return (y - mu) / torch.sqrt(var + 1e-5) * g[None, :, None, None] + b[None, :, None, None]

    def hswish(y: torch.Tensor) -> torch.Tensor:
        return y * torch.clamp(y + 3, 0, 6) / 6

    p = "model.mm_projector."
    bsz, n, _ = x.shape
    side = int(n**0.5)
    if kind == "ldpnetv2":
        h = F.linear(F.gelu(F.linear(x, w[p + "mlp.mlp.0.weight"], w[p + "mlp.mlp.0.bias"])),
                     w[p + "mlp.mlp.2.weight"], w[p + "mlp.mlp.2.bias"])
        g = h.permute(0, 2, 1).reshape(bsz, -1, side, side)
        # adaptive average pool to 12 x 12 written as explicit window means
        c = g.shape[1]
        pooled = torch.empty(bsz, c, 12, 12)
        for i in range(12):
            for j in range(12):
                r0, r1 = (i * side) // 12, -((-(i + 1) * side) // 12)
                c0, c1 = (j * side) // 12, -((-(j + 1) * side) // 12)
                pooled[:, :, i, j] = g[:, :, r0:r1, c0:c1].mean(dim=(2, 3))
        y = F.conv2d(pooled, w[p + "peg.peg.0.weight"], w[p + "peg.peg.0.bias"], padding=1, groups=c) + pooled
        return y.flatten(2).transpose(1, 2)
    h = F.linear(F.gelu(F.linear(x, w[p + "model.mlp.1.weight"], w[p + "model.mlp.1.bias"])),
                 w[p + "model.mlp.3.weight"], w[p + "model.mlp.3.bias"])
    g = h.permute(0, 2, 1).reshape(bsz, -1, side, side)
    for i, stride in ((1, 1), (2, 2)):
        b = f"{p}model.mb_block.{i}.block."
        y = F.conv2d(g, w[b + "0.0.weight"], None, stride=stride, padding=1, groups=g.shape[1])
        y = hswish(chan_ln(y, w[b + "0.1.weight"], w[b + "0.1.bias"]))
        s = y.mean(dim=(2, 3), keepdim=True)
        s = F.conv2d(torch.relu(F.conv2d(s, w[b + "1.fc1.weight"], w[b + "1.fc1.bias"])),
                     w[b + "1.fc2.weight"], w[b + "1.fc2.bias"])
        y = y * (torch.clamp(s + 3, 0, 6) / 6)
        y = chan_ln(F.conv2d(y, w[b + "2.0.weight"]), w[b + "2.1.weight"], w[b + "2.1.bias"])
        g = g + y if stride == 1 else y
    return g.flatten(2).transpose(1, 2)


def _mobilevlm_folder(tmp_path: Path, kind: str, grid: int, *, embed_tower: bool) -> tuple[Path, Path, dict, object, object]:
    """A MobileVLM-layout checkpoint: HF Llama weights + MobileVLM projector names + the CLIP
    tower under ``model.vision_tower.vision_tower.vision_model.*`` (or only in its own folder)."""
    import transformers

    torch.manual_seed(1)
    vcfg = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                         num_attention_heads=4, image_size=grid * 4, patch_size=4)
    tower = transformers.CLIPVisionModel(vcfg).eval()
    _perturb_norms(tower)
    _round_fp16(tower)  # MobileVLM ships fp16; the references see the same rounded weights
    tower_dir = tmp_path / "clip-tower"
    tower.save_pretrained(tower_dir)
    _preprocessor(tower_dir, grid * 4)
    lcfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=48, intermediate_size=96,
                                    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                                    rms_norm_eps=1e-6, max_position_embeddings=512,
                                    tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    llm = transformers.LlamaForCausalLM(lcfg).eval()
    _perturb_norms(llm)
    _round_fp16(llm)
    tensors = {k: v.contiguous() for k, v in llm.state_dict().items()}
    proj = _mobilevlm_projector_tensors(kind, 32, 48, torch.Generator().manual_seed(3))
    tensors |= proj
    if embed_tower:
        tensors |= {f"model.vision_tower.vision_tower.{k}": v.contiguous() for k, v in tower.state_dict().items()}
    src = tmp_path / "mobilevlm"
    src.mkdir()
    save_file({k: v.to(torch.float16) for k, v in tensors.items()}, str(src / "model.safetensors"))
    hf = json.loads(lcfg.to_json_string()) | {
        "model_type": "mobilevlm", "architectures": ["MobileLlamaForCausalLM"], "mm_hidden_size": 32,
        "mm_projector_type": kind, "mm_vision_select_feature": "patch", "mm_vision_select_layer": -2,
        "mm_vision_tower": "openai/clip-vit-large-patch14-336", "image_aspect_ratio": "pad",
        "vision_tower_type": "clip", "mm_use_im_start_end": False}
    (src / "config.json").write_text(json.dumps(hf))
    _tokenizer(src / "tokenizer.json")
    proj = {k: v.to(torch.float16).to(torch.float32) for k, v in proj.items()}
    return src, tower_dir, proj, tower, llm


@pytest.mark.parametrize(("kind", "grid", "embed_tower"), [("ldpnet", 6, True), ("ldpnet", 5, False),
                                                           ("ldpnetv2", 18, True)])
def test_mobilevlm_pipeline_matches_reference(tmp_path: Path, kind: str, grid: int, embed_tower: bool) -> None:
    torch.set_num_threads(1)
    src, tower_dir, proj_w, tower, llm = _mobilevlm_folder(tmp_path, kind, grid, embed_tower=embed_tower)
    out = tmp_path / "image"
    with pytest.raises(MobileVLMImportError, match="vision_tower"):
        import_mobilevlm(src, out)  # the tower is only named, not described
    comps = import_mobilevlm(src, out, vision_tower=tower_dir)
    p = comps["projector"]
    n_out = {"ldpnet": ((grid + 1) // 2) ** 2, "ldpnetv2": 144}[kind]
    assert p["config"]["kind"] == kind and p["tokens_per_image"] == n_out
    assert p["image_token_id"] == -200
    assert comps["vision_encoder"]["config"]["preprocess"]["pad_to_square"] is True
    vision, proj, llama = _load_path1(out, comps)

    pixels = torch.randn(1, 3, grid * 4, grid * 4)
    ids = [1, 9, 8, -200, 30, 31, 32]
    full, cached, feats = _our_logits(comps, vision, proj, llama, pixels, ids)
    with torch.no_grad():
        hidden = tower(pixel_values=pixels, output_hidden_states=True).hidden_states[-2][:, 1:]
        ref_feats = _reference_ldp(proj_w, kind, hidden)
        emb = llm.get_input_embeddings()
        embeds = torch.cat([emb(torch.tensor([ids[:3]])), ref_feats, emb(torch.tensor([ids[4:]]))], dim=1)
        expected = llm(inputs_embeds=embeds).logits
    err_p = (feats - ref_feats).abs().max().item()
    err_l = (full - expected).abs().max().item()
    err_c = (cached - expected).abs().max().item()
    print(f"mobilevlm {kind} grid {grid}: projector {err_p:.2e}, logits full {err_l:.2e}, cached {err_c:.2e}")
    assert feats.shape == ref_feats.shape == (1, n_out, 48)
    assert err_p <= 1e-4 and err_l <= 1e-4 and err_c <= 1e-4


def test_ldp_shapes_and_parameter_counts_at_mobilevlm_sizes() -> None:
    """MobileVLM: CLIP ViT-L/14-336 (1024 wide, 24 x 24 = 576 patches) into MobileLLaMA 1.4B
    (2048) / 2.7B (2560); LDP turns 576 tokens into 144, LDPv2 pools to 12 x 12 = 144."""
    def count(kind: str, cin: int, c: int) -> int:
        with torch.device("meta"):
            return sum(t.numel() for t in Projector(ProjectorConfig(kind, cin, c)).parameters())

    for c in (2048, 2560):
        mlp = 1024 * c + c + c * c + c
        s = se_channels(c)
        assert s == c // 4  # torchvision's _make_divisible(c // 4, 8) for these widths
        block = 9 * c + 2 * c + (c * s + s) + (s * c + c) + c * c + 2 * c  # dw, LN, SE, pw, LN
        assert count("ldpnet", 1024, c) == mlp + 2 * block
        assert count("ldpnetv2", 1024, c) == mlp + 9 * c + c
        assert count("mlp2x_gelu", 1024, c) == mlp
    print(f"LDP params at 1.7B: {count('ldpnet', 1024, 2048) / 1e6:.2f}M, LDPv2 {count('ldpnetv2', 1024, 2048) / 1e6:.2f}M")
    with torch.device("meta"):
        for kind in ("ldpnet", "ldpnetv2"):
            y = Projector(ProjectorConfig(kind, 1024, 2048))(torch.empty(1, 576, 1024))
            assert y.shape == (1, 144, 2048)
    cfg = ProjectorConfig("ldpnet", 1024, 2048)
    assert cfg.n_tokens(576) == 144 and ProjectorConfig.from_dict(cfg.to_dict()) == cfg
    assert isinstance(build_projector(ProjectorConfig("ldpnetv2", 8, 8)), LdpProjector)
    assert isinstance(build_projector(ProjectorConfig("mlp2x_gelu", 8, 8)), MlpProjector)
    with pytest.raises(ValueError, match="LdpProjector"):
        LdpProjector(ProjectorConfig("linear", 8, 8))
    with pytest.raises(ValueError, match="unknown projector kind"):
        ProjectorConfig("qformer", 8, 8)
    with pytest.raises(InvalidArgument, match="square"):
        Projector(ProjectorConfig("ldpnet", 8, 8))(torch.zeros(1, 15, 8))
    with pytest.raises(InvalidArgument, match=r"\[B, N, 8\]"):
        Projector(ProjectorConfig("mlp2x_gelu", 8, 8))(torch.zeros(1, 4, 9))
