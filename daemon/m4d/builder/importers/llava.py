"""Firmware image build, importer: a HF ``LlavaForConditionalGeneration`` folder -> three components.

M4 path 1 is vision encoder -> projector -> backbone. This reads a LLaVA checkpoint whose text
model is a Llama and whose vision tower is a CLIP ViT, and writes into ``out_dir``:

* ``vision_encoder.safetensors``  CLIP vision tower, canonical ``m4d.model.clip`` names, float32
* ``projector.safetensors``       ``m4d.model.projector`` names ("mlp2x_gelu"), float32
* ``model.safetensors``           the Llama backbone under HF Llama names, as ``hf_llama`` writes
* ``tokenizer.json``              copied as is

Tensor names of every saved layout are accepted: ``language_model.model.*`` /
``vision_tower.vision_model.*`` (llava-hf, transformers 4), ``language_model.model.*`` /
``vision_tower.*`` (what transformers 5 saves) and ``model.language_model.*`` / ``lm_head``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from m4image.fsutil import atomic_write_bytes

from m4d.builder.importers.common import Progress, read_json, write_tensors
from m4d.builder.importers.hf_clip import (
    CheckpointFolder,
    ClipImportError,
    preprocess_from_folder,
    vision_config_from_hf,
    vision_tensors,
)
from m4d.builder.importers.hf_llama import HFImportError, _chat_template, config_from_hf
from m4d.model.projector import ProjectorConfig, llava_to_canonical

log = logging.getLogger(__name__)

VISION_WEIGHTS = "vision_encoder.safetensors"
PROJECTOR_WEIGHTS = "projector.safetensors"
BACKBONE_WEIGHTS = "model.safetensors"
TOKENIZER = "tokenizer.json"

_LM_PREFIXES: tuple[tuple[str, str | None], ...] = (("language_model.model.", "model."), ("model.language_model.", "model."),
                ("language_model.lm_head.", "lm_head."), ("lm_head.", "lm_head."))


class LlavaImportError(ClipImportError):
    """The folder is not a LLaVA checkpoint this importer can convert."""


Renames = tuple[tuple[str, str | None], ...]


def backbone_tensors(ckpt: CheckpointFolder, tied: bool, renames: Renames,
                     progress: Progress) -> dict[str, torch.Tensor]:
    """The language model's tensors under HF Llama names (``model.*``, ``lm_head.weight``).

    ``renames``: (source prefix, target prefix) pairs, first match wins; a None target skips."""
    out: dict[str, torch.Tensor] = {}
    names = ckpt.names()
    for i, name in enumerate(names, 1):
        for src, dst in renames:
            if name.startswith(src):
                if dst is None:
                    break
                new = dst + name[len(src):]
                if (new == "lm_head.weight" and tied) or new.endswith("rotary_emb.inv_freq"):
                    break
                out[new] = ckpt.get(name)
                break
        progress("backbone: read tensors", i, len(names))
    if "model.embed_tokens.weight" not in out:
        raise LlavaImportError("the checkpoint has no language-model embedding table")
    return out


def _template(folder: Path) -> str | None:
    """The chat template: tokenizer files as ``hf_llama`` reads them, else the processor's
    ``chat_template.json`` (where llava-hf folders keep it); None if the folder has none."""
    try:
        return _chat_template(folder)
    except HFImportError:
        pass
    processor = folder / "chat_template.json"
    if processor.is_file():
        template = read_json(processor, ClipImportError).get("chat_template")
        if isinstance(template, str):
            return template
    return None


def backbone_component(folder: Path, ckpt: CheckpointFolder, text_cfg: dict[str, Any], out_dir: Path,
                       renames: Renames, progress: Progress) -> dict[str, Any]:
    """Write the Llama backbone + tokenizer; return its component dict (as ``hf_llama``'s)."""
    try:
        cfg = config_from_hf(text_cfg)
    except (HFImportError, KeyError) as e:
        raise LlavaImportError(f"{folder}: the text model is not a supported Llama: {e}") from None
    if not (folder / TOKENIZER).is_file():
        raise LlavaImportError(f"{folder / TOKENIZER} is missing")
    template = _template(folder)
    tensors = backbone_tensors(ckpt, cfg.tie_embeddings, renames, progress)
    emb = tensors["model.embed_tokens.weight"]
    if tuple(emb.shape) != (cfg.vocab_size, cfg.dim):
        raise LlavaImportError(f"embedding table {list(emb.shape)} does not match vocab {cfg.vocab_size} x {cfg.dim}")
    write_tensors(tensors, out_dir / BACKBONE_WEIGHTS, dtype=torch.float32)
    atomic_write_bytes(out_dir / TOKENIZER, (folder / TOKENIZER).read_bytes())
    return {
        "kind": "llama",
        "config": cfg.to_dict(),
        "weights": BACKBONE_WEIGHTS,
        "tokenizer": TOKENIZER,
        "chat_template": template,
        "quantization": "none",
    }


def import_llava(folder: Path, out_dir: Path, progress: Progress | None = None) -> dict[str, dict[str, Any]]:
    """Import ``folder``; return {"vision_encoder", "projector", "backbone"} component dicts."""
    folder, out_dir = Path(folder), Path(out_dir)
    report: Progress = progress or (lambda stage, done, total: None)
    hf = read_json(folder / "config.json", ClipImportError)
    if hf.get("model_type") != "llava":
        raise LlavaImportError(f"{folder}/config.json has model_type {hf.get('model_type')!r}; expected 'llava'")
    text_cfg = dict(hf.get("text_config") or {})
    if "tie_word_embeddings" not in text_cfg:
        text_cfg["tie_word_embeddings"] = hf.get("tie_word_embeddings", False)
    for key in ("bos_token_id", "eos_token_id"):
        if text_cfg.get(key) is None and hf.get(key) is not None:
            text_cfg[key] = hf[key]
    vision = vision_config_from_hf(hf.get("vision_config") or {}, f"{folder}/config.json vision_config")
    layer = hf.get("vision_feature_layer", -2)
    select = hf.get("vision_feature_select_strategy", "default")
    if select not in ("default", "full"):
        raise LlavaImportError(f"vision_feature_select_strategy {select!r} is not supported")
    n_layers = 1 if isinstance(layer, int) else len(layer)
    image_token = hf.get("image_token_index", hf.get("image_token_id"))
    if image_token is None:
        raise LlavaImportError(f"{folder}/config.json has no image_token_index")
    pre = preprocess_from_folder(folder, pad_to_square=hf.get("image_aspect_ratio") == "pad")
    ckpt = CheckpointFolder(folder)
    out_dir.mkdir(parents=True, exist_ok=True)

    # Vision encoder
    vstate = vision_tensors(ckpt, vision, "")  # the only patch embedding is the vision tower's
    write_tensors(vstate, out_dir / VISION_WEIGHTS, progress=report, stage="vision_encoder: convert")
    vconf = vision.to_dict()
    vconf.update(preprocess=pre.to_dict(), vision_feature_layer=layer, vision_feature_select_strategy=select)
    vision_comp = {"kind": "clip_vision", "config": vconf, "weights": VISION_WEIGHTS}

    # Projector
    text_dim = int(text_cfg["hidden_size"])
    pcfg = ProjectorConfig(kind="mlp2x_gelu", in_dim=vision.vision_config.hidden_size * n_layers,
                           out_dim=text_dim, act=str(hf.get("projector_hidden_act", "gelu")),
                           bias=bool(hf.get("multimodal_projector_bias", True)))
    prefix = next((p for p in ("multi_modal_projector.", "model.multi_modal_projector.")
                   if ckpt.has(p + "linear_1.weight")), None)
    if prefix is None:
        raise LlavaImportError("the checkpoint has no multi_modal_projector.linear_1.weight")
    pstate = llava_to_canonical(lambda n: ckpt.get(n) if ckpt.has(n) else None, prefix)
    write_tensors(pstate, out_dir / PROJECTOR_WEIGHTS)
    n_patches = vision.vision_config.grid ** 2 + (1 if select == "full" else 0)
    proj_comp = {"kind": "projector", "config": pcfg.to_dict(), "weights": PROJECTOR_WEIGHTS,
                 "image_token_id": int(image_token), "tokens_per_image": pcfg.n_tokens(n_patches)}

    backbone = backbone_component(folder, ckpt, text_cfg, out_dir, _LM_PREFIXES, report)
    source = {"format": "hf-llava", "base_model": hf.get("_name_or_path", ""), "weights_sha256": ckpt.digest()}
    for comp in (vision_comp, proj_comp, backbone):
        comp["source"] = source
    log.info("imported LLaVA %s: %d vision, %d projector tensors", folder, len(vstate), len(pstate))
    return {"vision_encoder": vision_comp, "projector": proj_comp, "backbone": backbone}
