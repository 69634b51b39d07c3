"""Hugging Face Llama checkpoint folder -> M4 firmware-image component (image-build stage).

Input: ``config.json``, ``model.safetensors`` (or a sharded ``model.safetensors.index.json``),
``tokenizer.json``, and the chat template in ``tokenizer_config.json`` or ``chat_template.jinja``.
Dense weights are copied with their names and dtypes (float16 is widened to float32: fp16
matmuls are unusably slow on the target CPU); a tied ``lm_head.weight`` is dropped.
The result has the same component shape as the GGUF importer, with ``quantization: "none"``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from m4d.builder.importers.common import Progress
from m4d.builder.importers.gguf_llama import write_safetensors_atomic
from m4d.model.llama import LlamaConfig

log = logging.getLogger(__name__)


class HFImportError(ValueError):
    """The folder is not a Hugging Face Llama checkpoint this importer can convert."""


def _eos(value: Any) -> int | None:
    if isinstance(value, list):
        return int(value[0]) if value else None
    return None if value is None else int(value)


def config_from_hf(cfg: dict[str, Any]) -> LlamaConfig:
    if cfg.get("model_type") != "llama":
        raise HFImportError(f"model_type {cfg.get('model_type')!r} is not 'llama'")
    if cfg.get("attention_bias") or cfg.get("mlp_bias"):
        raise HFImportError("Llama variants with biases are not supported")
    if cfg.get("hidden_act", "silu") != "silu":
        raise HFImportError(f"activation {cfg.get('hidden_act')!r} is not supported (only silu)")
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise HFImportError(f"rope scaling {rope!r} is not supported")
    theta = rope.get("rope_theta", cfg.get("rope_theta", 10000.0))
    n_heads = int(cfg["num_attention_heads"])
    dim = int(cfg["hidden_size"])
    if cfg.get("head_dim") not in (None, dim // n_heads):
        raise HFImportError(f"head_dim {cfg['head_dim']} != hidden_size / heads")
    return LlamaConfig(
        vocab_size=int(cfg["vocab_size"]), dim=dim, n_layers=int(cfg["num_hidden_layers"]),
        n_heads=n_heads, n_kv_heads=int(cfg.get("num_key_value_heads") or n_heads),
        ffn_dim=int(cfg["intermediate_size"]), rope_base=float(theta),
        norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        max_seq_len=int(cfg.get("max_position_embeddings", 2048)),
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        bos_id=None if cfg.get("bos_token_id") is None else int(cfg["bos_token_id"]),
        eos_id=_eos(cfg.get("eos_token_id")),
    )


def _weight_files(folder: Path) -> list[Path]:
    single = folder / "model.safetensors"
    if single.is_file():
        return [single]
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [folder / s for s in shards]
    raise HFImportError(f"no model.safetensors(.index.json) in {folder}")


def _chat_template(folder: Path) -> str:
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text()
    tc = folder / "tokenizer_config.json"
    template = json.loads(tc.read_text()).get("chat_template") if tc.is_file() else None
    if isinstance(template, list):  # named templates: take "default"
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    if not isinstance(template, str):
        raise HFImportError(f"{folder} has no chat template (tokenizer_config.json or chat_template.jinja)")
    return template


def import_hf_llama(folder: Path, out_dir: Path, progress: Progress | None = None) -> dict[str, Any]:
    """Convert the checkpoint in ``folder`` into ``out_dir``; return the component description."""
    folder, out_dir = Path(folder), Path(out_dir)
    report: Progress = progress or (lambda stage, done, total: None)
    if not (folder / "config.json").is_file():
        raise HFImportError(f"{folder} has no config.json")
    cfg = config_from_hf(json.loads((folder / "config.json").read_text()))
    if not (folder / "tokenizer.json").is_file():
        raise HFImportError(f"{folder} has no tokenizer.json")
    template = _chat_template(folder)
    out_dir.mkdir(parents=True, exist_ok=True)

    tensors: dict[str, torch.Tensor] = {}
    digest = hashlib.sha256()
    files = _weight_files(folder)
    for path in files:
        with open(path, "rb") as fh:
            while block := fh.read(1 << 20):
                digest.update(block)
        with safe_open(str(path), framework="pt") as f:
            keys = list(f.keys())
            for i, key in enumerate(keys):
                if key == "lm_head.weight" and cfg.tie_embeddings:
                    continue
                if key.endswith("rotary_emb.inv_freq"):
                    continue
                t = f.get_tensor(key)
                if t.dtype == torch.float16:
                    t = t.to(torch.float32)
                if t.dtype not in (torch.float32, torch.bfloat16):
                    raise HFImportError(f"tensor {key} has unsupported dtype {t.dtype}")
                tensors[key] = t.contiguous()
                report("tensors", i + 1, len(keys))
    if "model.embed_tokens.weight" not in tensors:
        raise HFImportError("checkpoint lacks model.embed_tokens.weight")
    report("write", 0, 1)
    write_safetensors_atomic(tensors, out_dir / "model.safetensors", {"format": "m4-llama"})
    report("write", 1, 1)
    tmp = out_dir / ".tokenizer.json.tmp"
    shutil.copyfile(folder / "tokenizer.json", tmp)
    os.replace(tmp, out_dir / "tokenizer.json")
    log.info("imported %s: %d tensors", folder, len(tensors))
    return {
        "kind": "llama",
        "config": cfg.to_dict(),
        "weights": "model.safetensors",
        "tokenizer": "tokenizer.json",
        "chat_template": template,
        "quantization": "none",
        "source": {"file": folder.name, "sha256": digest.hexdigest()},
    }
