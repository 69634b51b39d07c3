"""Firmware image build, importer: a MobileVLM / MobileVLM V2 checkpoint folder -> three components.

A MobileVLM folder (``MobileLlamaForCausalLM``) holds a Llama backbone (``model.*``,
``lm_head.weight``), the projector (``model.mm_projector.*``, ``mm_projector_type`` "ldpnet",
"ldpnetv2" or an LLaVA MLP) and usually the CLIP vision tower
(``model.vision_tower.vision_tower.vision_model.*``). Its ``config.json`` names the tower
(``mm_vision_tower``, e.g. openai/clip-vit-large-patch14-336) but does not describe it, so the
tower's own folder (``config.json``, ``preprocessor_config.json`` and, when the checkpoint lacks
the tower's weights, its ``model.safetensors``) must be given as ``vision_tower`` or found at
``<folder>/vision_tower`` or at the local path ``mm_vision_tower``.

Writes the same files and component dicts as ``m4d.builder.importers.llava``; the image placeholder
is MobileVLM's ``IMAGE_TOKEN_INDEX`` (-200, outside the vocabulary: ``embed_prompt`` handles it).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from m4d.builder.importers.common import Progress, read_json, write_tensors
from m4d.builder.importers.hf_clip import (
    CheckpointFolder,
    ClipImportError,
    preprocess_from_folder,
    vision_config_from_hf,
    vision_tensors,
)
from m4d.builder.importers.llava import (
    PROJECTOR_WEIGHTS,
    VISION_WEIGHTS,
    LlavaImportError,
    backbone_component,
)
from m4d.model.projector import ProjectorConfig, mobilevlm_to_canonical

log = logging.getLogger(__name__)

IMAGE_TOKEN_INDEX = -200  # MobileVLM / LLaVA (original) placeholder id
_PROJECTORS = {"ldpnet": "ldpnet", "ldpnetv2": "ldpnetv2", "mlp2x_gelu": "mlp2x_gelu", "linear": "linear"}
_SELECT = {"patch": "default", "cls_patch": "full"}
_LM_PREFIXES: tuple[tuple[str, str | None], ...] = (
    ("model.vision_tower.", None), ("model.mm_projector.", None), ("model.", "model."),
    ("lm_head.", "lm_head."))


class MobileVLMImportError(LlavaImportError):
    """The folder is not a MobileVLM checkpoint this importer can convert."""


def _tower_folder(folder: Path, hf: dict[str, Any], given: Path | None) -> Path:
    candidates = [given] if given is not None else [folder / "vision_tower", Path(str(hf.get("mm_vision_tower", "")))]
    for c in candidates:
        if c is not None and str(c) and (c / "config.json").is_file():
            return c
    raise MobileVLMImportError(
        f"the vision tower {hf.get('mm_vision_tower')!r} is not described in {folder}: pass its "
        "Hugging Face folder (config.json, preprocessor_config.json) as vision_tower")


def import_mobilevlm(folder: Path, out_dir: Path, progress: Progress | None = None, *,
                     vision_tower: Path | None = None) -> dict[str, dict[str, Any]]:
    """Import ``folder``; return {"vision_encoder", "projector", "backbone"} component dicts."""
    folder, out_dir = Path(folder), Path(out_dir)
    report: Progress = progress or (lambda stage, done, total: None)
    hf = read_json(folder / "config.json", ClipImportError)
    kind = str(hf.get("mm_projector_type", ""))
    if kind not in _PROJECTORS:
        raise MobileVLMImportError(f"{folder}/config.json: mm_projector_type {kind!r} is not one of {sorted(_PROJECTORS)}")
    if hf.get("mm_use_im_start_end"):
        raise MobileVLMImportError("mm_use_im_start_end checkpoints are not supported")
    select = _SELECT.get(str(hf.get("mm_vision_select_feature", "patch")))
    if select is None:
        raise MobileVLMImportError(f"mm_vision_select_feature {hf.get('mm_vision_select_feature')!r} is not supported")
    layer = int(hf.get("mm_vision_select_layer", -2))
    tower = _tower_folder(folder, hf, Path(vision_tower) if vision_tower is not None else None)
    tower_cfg = read_json(tower / "config.json", ClipImportError)
    if tower_cfg.get("model_type") == "clip":
        tower_cfg = tower_cfg["vision_config"]
    vision = vision_config_from_hf(tower_cfg, f"{tower}/config.json")
    if int(hf["mm_hidden_size"]) != vision.vision_config.hidden_size:
        raise MobileVLMImportError(f"mm_hidden_size {hf['mm_hidden_size']} != the tower's width "
                                   f"{vision.vision_config.hidden_size}")
    pre = preprocess_from_folder(tower, pad_to_square=hf.get("image_aspect_ratio") == "pad")
    ckpt = CheckpointFolder(folder)
    out_dir.mkdir(parents=True, exist_ok=True)

    # Vision encoder: from the checkpoint if it carries the tower, else from the tower's folder.
    if any(n.startswith("model.vision_tower.") for n in ckpt.names()):
        vstate = vision_tensors(ckpt, vision, "model.vision_tower.")
    else:
        vstate = vision_tensors(CheckpointFolder(tower), vision, "")  # CLIPModel or CLIPVisionModel
    write_tensors(vstate, out_dir / VISION_WEIGHTS, progress=report, stage="vision_encoder: convert")
    vconf = vision.to_dict()
    vconf.update(preprocess=pre.to_dict(), vision_feature_layer=layer, vision_feature_select_strategy=select)
    vision_comp = {"kind": "clip_vision", "config": vconf, "weights": VISION_WEIGHTS}

    # Projector
    pcfg = ProjectorConfig(kind=_PROJECTORS[kind], in_dim=int(hf["mm_hidden_size"]),
                           out_dim=int(hf["hidden_size"]))
    try:
        pstate = mobilevlm_to_canonical(ckpt.get, pcfg.kind)
    except LlavaImportError as e:
        raise MobileVLMImportError(f"projector {kind!r}: {e}") from None
    write_tensors(pstate, out_dir / PROJECTOR_WEIGHTS)
    n_patches = vision.vision_config.grid ** 2 + (1 if select == "full" else 0)
    proj_comp = {"kind": "projector", "config": pcfg.to_dict(), "weights": PROJECTOR_WEIGHTS,
                 "image_token_id": IMAGE_TOKEN_INDEX, "tokens_per_image": pcfg.n_tokens(n_patches)}

    text_cfg = {**hf, "model_type": "llama"}
    backbone = backbone_component(folder, ckpt, text_cfg, out_dir, _LM_PREFIXES, report)
    source = {"format": "mobilevlm", "base_model": hf.get("_name_or_path", ""),
              "vision_tower": str(hf.get("mm_vision_tower", "")), "weights_sha256": ckpt.digest()}
    for comp in (vision_comp, proj_comp, backbone):
        comp["source"] = source
    log.info("imported MobileVLM %s: projector %s, %d tokens per image", folder, kind, proj_comp["tokens_per_image"])
    return {"vision_encoder": vision_comp, "projector": proj_comp, "backbone": backbone}
