"""Firmware image build, importer: a Hugging Face CLIP folder -> the "clip" component (M4 path 3).

Input: ``config.json`` (``CLIPModel``: both towers and projections, or ``CLIPVisionModel``),
``model.safetensors`` (or a sharded index), ``preprocessor_config.json`` and, with a text
tower, ``tokenizer.json``. Output in ``out_dir``: ``model.safetensors`` under the canonical
names of ``m4d.model.clip`` in float32, ``tokenizer.json`` without padding or truncation
(``m4d.model.clip.tokenize`` pads and refuses over-long texts), and the component dict.
Never unpickles. The helpers here (``CheckpointFolder``, ``preprocess_from_folder``) are
shared with the LLaVA and MobileVLM importers.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from m4image.fsutil import atomic_write_bytes
from safetensors import safe_open

from m4d.builder.importers.common import Progress, read_json, write_tensors
from m4d.model.clip import ClipConfig, hf_clip_to_canonical, hf_vision_to_canonical
from m4d.prepare.vision import PreprocessConfig

log = logging.getLogger(__name__)

WEIGHTS = "model.safetensors"
TOKENIZER = "tokenizer.json"


class ClipImportError(ValueError):
    """The folder is not a checkpoint this importer can convert; the message says what is missing."""


class CheckpointFolder:
    """The safetensors tensors of a checkpoint folder (single file or sharded), read lazily.

    ``get(name)`` returns float32 or bfloat16 (float16 is widened: fp16 is unusably slow on the
    target CPU); ``digest()`` is a sha256 over the weight files in name order.
    """

    def __init__(self, folder: Path) -> None:
        single, index = folder / "model.safetensors", folder / "model.safetensors.index.json"
        if single.is_file():
            self.files = [single]
        elif index.is_file():
            shards = sorted(set(read_json(index, ClipImportError)["weight_map"].values()))
            self.files = [folder / s for s in shards]
        else:
            raise ClipImportError(f"no model.safetensors(.index.json) in {folder}; only safetensors "
                                  "checkpoints are imported (no pickles)")
        self.where: dict[str, Path] = {}
        for f in self.files:
            with safe_open(str(f), framework="pt") as st:
                for k in st.keys():  # noqa: SIM118 (safe_open is not a dict)
                    self.where[k] = f

    def names(self) -> list[str]:
        return sorted(self.where)

    def has(self, name: str) -> bool:
        return name in self.where

    def get(self, name: str) -> torch.Tensor:
        if name not in self.where:
            raise ClipImportError(f"tensor {name!r} is missing from the checkpoint")
        with safe_open(str(self.where[name]), framework="pt") as st:
            t: torch.Tensor = st.get_tensor(name)
        if t.dtype == torch.float16:
            t = t.to(torch.float32)
        if t.dtype not in (torch.float32, torch.bfloat16):
            raise ClipImportError(f"tensor {name!r} has unsupported dtype {t.dtype}")
        return t

    def digest(self) -> str:
        import hashlib

        h = hashlib.sha256()
        for f in self.files:
            with open(f, "rb") as fh:
                while block := fh.read(1 << 20):
                    h.update(block)
        return h.hexdigest()


def preprocess_from_folder(folder: Path, *, pad_to_square: bool = False) -> PreprocessConfig:
    path = folder / "preprocessor_config.json"
    if not path.is_file():
        raise ClipImportError(f"{path} is missing: the image mean/std and sizes come from it")
    try:
        return PreprocessConfig.from_hf(read_json(path, ClipImportError), pad_to_square=pad_to_square)
    except ValueError as e:
        raise ClipImportError(f"{path}: {e}") from None


def clean_tokenizer(path: Path) -> bytes:
    """The tokenizer without padding/truncation (the model code decides both)."""
    from tokenizers import Tokenizer

    if not path.is_file():
        raise ClipImportError(f"{path} is missing; the text tower needs a tokenizers JSON file")
    tok = Tokenizer.from_file(str(path))
    tok.no_padding()
    tok.no_truncation()
    return tok.to_str(pretty=True).encode("utf-8")


def vision_config_from_hf(cfg: dict[str, Any], where: str) -> ClipConfig:
    """A CLIP vision tower config (``clip_vision_model``) -> ClipConfig without a text tower."""
    if cfg.get("model_type", "clip_vision_model") != "clip_vision_model":
        raise ClipImportError(f"{where}: vision model_type {cfg.get('model_type')!r} is not supported "
                              "(only CLIP vision towers)")
    try:
        return ClipConfig.from_dict(cfg)
    except (ValueError, TypeError) as e:
        raise ClipImportError(f"{where}: {e}") from None


def vision_tensors(ckpt: CheckpointFolder, cfg: ClipConfig, under: str) -> dict[str, torch.Tensor]:
    """Canonical vision-tower tensors from HF names found under ``under`` (e.g. "model.vision_tower.")."""
    marker = "embeddings.patch_embedding.weight"
    found = [n for n in ckpt.names() if n.startswith(under) and n.endswith(marker)]
    if len(found) != 1:
        raise ClipImportError(f"expected one CLIP vision tower under {under!r}, found {len(found)}")
    prefix = found[0][: -len(marker)]
    return hf_vision_to_canonical(ckpt.get, prefix, cfg.vision_config)


def import_hf_clip(folder: Path, out_dir: Path, progress: Progress | None = None) -> dict[str, Any]:
    """Import the CLIP checkpoint in ``folder`` into ``out_dir``; return the component dict."""
    folder, out_dir = Path(folder), Path(out_dir)
    report: Progress = progress or (lambda stage, done, total: None)
    hf = read_json(folder / "config.json", ClipImportError)
    model_type = hf.get("model_type")
    if model_type == "clip":
        try:
            cfg = ClipConfig.from_dict(hf)
        except (ValueError, TypeError) as e:
            raise ClipImportError(f"{folder}/config.json: {e}") from None
    elif model_type == "clip_vision_model":
        cfg = vision_config_from_hf(hf, f"{folder}/config.json")
    else:
        raise ClipImportError(f"{folder}/config.json has model_type {model_type!r}; expected 'clip' "
                              "or 'clip_vision_model'")
    pre = preprocess_from_folder(folder)
    if pre.crop_size != cfg.vision_config.image_size:
        raise ClipImportError(f"preprocessor crop_size {pre.crop_size} != vision image_size "
                              f"{cfg.vision_config.image_size}")
    ckpt = CheckpointFolder(folder)
    if cfg.text_config is not None:
        state = hf_clip_to_canonical(ckpt.get, cfg)
        tokenizer = clean_tokenizer(folder / TOKENIZER)
    else:
        state = vision_tensors(ckpt, cfg, "")
        tokenizer = None

    out_dir.mkdir(parents=True, exist_ok=True)
    write_tensors(state, out_dir / WEIGHTS, progress=report, stage="clip: convert tensors")
    if tokenizer is not None:
        atomic_write_bytes(out_dir / TOKENIZER, tokenizer)
    log.info("imported %s: %d tensors", folder, len(state))
    config = cfg.to_dict()
    config["preprocess"] = pre.to_dict()
    return {
        "kind": "clip" if cfg.text_config is not None else "clip_vision",
        "config": config,
        "weights": WEIGHTS,
        "tokenizer": TOKENIZER if tokenizer is not None else None,
        "dimensions": cfg.projection_dim,
        "max_seq_len": None if cfg.text_config is None else cfg.text_config.max_position_embeddings,
        "source": {"format": "hf-clip", "base_model": hf.get("_name_or_path", ""),
                   "weights_sha256": ckpt.digest(), "dtype": "float32"},
    }
