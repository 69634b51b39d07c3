"""Firmware image build, importer: a Hugging Face Whisper folder -> the speech recognizer component.

Reads ``config.json``, ``generation_config.json`` (suppression lists), ``model.safetensors`` and
``tokenizer.json`` of a ``WhisperForConditionalGeneration`` / ``WhisperModel`` checkpoint,
re-saves the weights under the canonical names of ``m4d.model.whisper`` in float32 (q/k/v
packed, Whisper's missing k bias written as zeros) and copies the tokenizer. Never unpickles.
``write_whisper_component`` is shared with the CTranslate2 importer.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from m4image.fsutil import atomic_file, atomic_write_bytes, sha256_file
from safetensors import safe_open
from safetensors.torch import save_file

from m4d.builder.importers.common import Progress, read_json
from m4d.model.whisper import Whisper, WhisperConfig

log = logging.getLogger(__name__)

WEIGHTS = "model.safetensors"
TOKENIZER = "tokenizer.json"


class WhisperImportError(ValueError):
    """The folder/file is not a Whisper checkpoint we can import."""


def canonical_shapes(config: WhisperConfig) -> dict[str, tuple[int, ...]]:
    """Canonical tensor names and shapes (our module's state dict)."""
    with torch.device("meta"):
        return {k: tuple(v.shape) for k, v in Whisper(config).state_dict().items()}


def write_whisper_component(
    state: dict[str, torch.Tensor],
    config: WhisperConfig,
    tokenizer_file: Path,
    out_dir: Path,
    source: dict[str, Any],
    report: Progress,
) -> dict[str, Any]:
    """Check ``state`` against the config, write float32 safetensors + tokenizer atomically."""
    expected = canonical_shapes(config)
    missing, extra = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or extra:
        raise WhisperImportError(f"checkpoint does not match the Whisper layout: missing {missing[:3]}, unexpected {extra[:3]}")
    for name, t in state.items():
        if tuple(t.shape) != expected[name]:
            raise WhisperImportError(f"tensor {name} has shape {list(t.shape)}, expected {list(expected[name])}")
    if not tokenizer_file.is_file():
        raise WhisperImportError(f"{tokenizer_file} is missing; the speech recognizer needs a tokenizers JSON file")
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_file))
    for special in ("<|endoftext|>", "<|startoftranscript|>", "<|notimestamps|>"):
        if tok.token_to_id(special) is None:
            raise WhisperImportError(f"{tokenizer_file} has no {special} token; not a Whisper tokenizer")
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    for i, name in enumerate(sorted(state), 1):
        tensors[name] = state[name].to(torch.float32, copy=True).contiguous()  # aliases share storage
        report("speech: convert tensors", i, len(state))
    with atomic_file(out_dir / WEIGHTS) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt"})  # one key: reproducible bytes
    atomic_write_bytes(out_dir / TOKENIZER, tokenizer_file.read_bytes())
    report("speech: write files", 2, 2)
    log.info("imported Whisper (%d tensors, d_model %d) from %s", len(state), config.d_model, source.get("format"))
    return {
        "kind": "whisper",
        "config": config.to_dict(),
        "weights": WEIGHTS,
        "tokenizer": TOKENIZER,
        "source": source,
    }


def _hf_names(prefix: str, config: WhisperConfig) -> dict[str, str]:
    """Canonical name -> HF name for every tensor except the packed q/k/v ones."""
    m: dict[str, str] = {}
    for ours, hf in (("weight", "weight"), ("bias", "bias")):
        m[f"encoder.conv1.{ours}"] = f"{prefix}encoder.conv1.{hf}"
        m[f"encoder.conv2.{ours}"] = f"{prefix}encoder.conv2.{hf}"
        m[f"encoder.norm.{ours}"] = f"{prefix}encoder.layer_norm.{hf}"
        m[f"decoder.norm.{ours}"] = f"{prefix}decoder.layer_norm.{hf}"
        common = {"attention_norm": "self_attn_layer_norm", "attention.wo": "self_attn.out_proj",
                  "ffn_norm": "final_layer_norm", "feed_forward.w1": "fc1", "feed_forward.w2": "fc2"}
        for i in range(config.encoder_layers):
            for o, h in common.items():
                m[f"encoder.layers.{i}.{o}.{ours}"] = f"{prefix}encoder.layers.{i}.{h}.{hf}"
        cross = {"cross_norm": "encoder_attn_layer_norm", "cross_attention.wq": "encoder_attn.q_proj",
                 "cross_attention.wo": "encoder_attn.out_proj"}
        for i in range(config.decoder_layers):
            for o, h in {**common, **cross}.items():
                m[f"decoder.layers.{i}.{o}.{ours}"] = f"{prefix}decoder.layers.{i}.{h}.{hf}"
    m["encoder.positions"] = f"{prefix}encoder.embed_positions.weight"
    m["decoder.tok_embeddings.weight"] = f"{prefix}decoder.embed_tokens.weight"
    m["decoder.pos_embeddings.weight"] = f"{prefix}decoder.embed_positions.weight"
    return m


def hf_to_canonical(get: Callable[[str], torch.Tensor], names: list[str], config: WhisperConfig) -> dict[str, torch.Tensor]:
    """Map HF Whisper tensors to canonical ones (``model.`` prefix optional)."""
    prefix = "model." if any(n.startswith("model.encoder.") for n in names) else ""
    have = set(names)

    def take(name: str) -> torch.Tensor:
        if name not in have:
            raise WhisperImportError(f"tensor {name!r} missing from the checkpoint")
        return get(name)

    state = {ours: take(hf) for ours, hf in _hf_names(prefix, config).items()}

    def packed(base: str, parts: tuple[str, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        ws = [take(f"{base}.{p}_proj.weight") for p in parts]
        bs = [take(f"{base}.{p}_proj.bias") if p != "k" else torch.zeros(w.shape[0], dtype=w.dtype)
              for p, w in zip(parts, ws, strict=True)]
        if f"{base}.k_proj.bias" in have:
            raise WhisperImportError(f"{base}.k_proj has a bias; Whisper's key projection has none")
        return torch.cat(ws), torch.cat(bs)

    for side, n in (("encoder", config.encoder_layers), ("decoder", config.decoder_layers)):
        for i in range(n):
            base = f"{prefix}{side}.layers.{i}"
            w, b = packed(f"{base}.self_attn", ("q", "k", "v"))
            state[f"{side}.layers.{i}.attention.wqkv.weight"], state[f"{side}.layers.{i}.attention.wqkv.bias"] = w, b
            if side == "decoder":
                w, b = packed(f"{base}.encoder_attn", ("k", "v"))
                state[f"decoder.layers.{i}.cross_attention.wkv.weight"] = w
                state[f"decoder.layers.{i}.cross_attention.wkv.bias"] = b
    if "proj_out.weight" in have and not torch.equal(get("proj_out.weight"), state["decoder.tok_embeddings.weight"]):
        raise WhisperImportError("proj_out.weight differs from the token embedding; only tied output heads are supported")
    return state


def import_hf_whisper(folder: Path, out_dir: Path, progress: Progress | None = None) -> dict[str, Any]:
    """Import a Hugging Face Whisper folder into ``out_dir``; return the component dict."""
    folder, out_dir = Path(folder), Path(out_dir)
    report = progress or (lambda stage, done, total: None)
    hf = read_json(folder / "config.json", WhisperImportError, "Whisper checkpoint")
    if hf.get("model_type") != "whisper":
        raise WhisperImportError(f"{folder}/config.json has model_type {hf.get('model_type')!r}; expected 'whisper'")
    if hf.get("activation_function", "gelu") != "gelu" or hf.get("scale_embedding", False):
        raise WhisperImportError("only Whisper with exact GELU and unscaled embeddings is supported")
    gen = read_json(folder / "generation_config.json", WhisperImportError, required=False)
    lists = {k: gen.get(k, hf.get(k)) or [] for k in ("suppress_tokens", "begin_suppress_tokens")}
    try:
        config = WhisperConfig.from_dict({**hf, **lists})
    except (TypeError, ValueError) as e:
        raise WhisperImportError(f"{folder}/config.json: {e}") from None
    weights = folder / "model.safetensors"
    if not weights.is_file():
        raise WhisperImportError(f"{weights} is missing; only safetensors checkpoints are imported (no pickles)")
    with safe_open(str(weights), framework="pt", device="cpu") as f:
        state = hf_to_canonical(f.get_tensor, list(f.keys()), config)
    source = {
        "format": "huggingface",
        "base_model": hf.get("_name_or_path", ""),
        "weights_sha256": sha256_file(weights),
        "dtype": str(next(iter(state.values())).dtype).removeprefix("torch."),
    }
    return write_whisper_component(state, config, folder / TOKENIZER, out_dir, source, report)
