"""Firmware image build, importer: a sentence-transformers BERT folder -> the text encoder component.

Reads a sentence-transformers model folder (``config.json``, ``model.safetensors``,
``tokenizer.json``, ``modules.json``, ``1_Pooling/config.json``, ``sentence_bert_config.json``),
re-saves the weights under the canonical names of ``m4d.model.bert`` in float32 and writes the
tokenizer with the truncation/padding the model is served with. Never unpickles anything.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from m4image.fsutil import atomic_write_bytes, sha256_file
from safetensors import safe_open

from m4d.builder.importers.common import Progress, read_json, write_tensors
from m4d.model.bert import BertConfig, hf_to_canonical

log = logging.getLogger(__name__)

WEIGHTS = "model.safetensors"
TOKENIZER = "tokenizer.json"


class SentenceTransformerImportError(ValueError):
    """The folder is not a sentence-transformers BERT model we can import."""


def _pooling(folder: Path) -> tuple[str, bool]:
    """Read modules.json: the pooling mode and whether a Normalize module follows it."""
    modules_file = folder / "modules.json"
    if not modules_file.exists():
        return "mean", False
    modules = read_json(modules_file, SentenceTransformerImportError, "sentence-transformers model")
    types = [m.get("type", "") for m in modules]
    normalize = any(t.endswith(".Normalize") for t in types)
    for m in modules:
        if m.get("type", "").endswith(".Pooling"):
            cfg = read_json(folder / m["path"] / "config.json", SentenceTransformerImportError, "sentence-transformers model")
            modes = [k for k, v in cfg.items() if k.startswith("pooling_mode_") and v is True]
            if modes != ["pooling_mode_mean_tokens"]:
                raise SentenceTransformerImportError(f"pooling {modes} in {folder / m['path']} is not supported; only mean pooling")
    return "mean", normalize


def _tokenizer_json(path: Path, max_seq_len: int, pad_id: int) -> bytes:
    """The tokenizer with truncation at ``max_seq_len`` and padding to the batch's longest text.

    The shipped file often pads to a fixed length and truncates shorter than the model's
    ``max_seq_length`` (all-MiniLM-L6-v2: 128 vs 256), which sentence-transformers overrides
    at run time; the image stores the settings the model is served with instead.
    """
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(path))
    tok.no_padding()
    tok.enable_padding(pad_id=pad_id, pad_token=tok.id_to_token(pad_id) or "[PAD]")
    tok.enable_truncation(max_length=max_seq_len)
    return tok.to_str(pretty=True).encode("utf-8")


def import_sentence_transformer(
    folder: Path, out_dir: Path, progress: Progress | None = None
) -> dict[str, Any]:
    """Import ``folder`` into ``out_dir``; return the component dict (paths relative to ``out_dir``)."""
    folder, out_dir = Path(folder), Path(out_dir)
    report = progress or (lambda stage, done, total: None)
    hf_config = read_json(folder / "config.json", SentenceTransformerImportError, "sentence-transformers model")
    if hf_config.get("model_type") != "bert":
        raise SentenceTransformerImportError(f"{folder}/config.json has model_type {hf_config.get('model_type')!r}; expected 'bert'")
    config = BertConfig.from_dict(hf_config)
    pooling, normalize = _pooling(folder)
    st_cfg_file = folder / "sentence_bert_config.json"
    max_seq_len = int(read_json(st_cfg_file, SentenceTransformerImportError, "sentence-transformers model")["max_seq_length"]) if st_cfg_file.exists() else 512
    max_seq_len = min(max_seq_len, config.max_position_embeddings)
    src_weights = folder / "model.safetensors"
    if not src_weights.exists():
        raise SentenceTransformerImportError(f"{src_weights} is missing; only safetensors checkpoints are imported (no pickles)")
    if not (folder / TOKENIZER).exists():
        raise SentenceTransformerImportError(f"{folder / TOKENIZER} is missing; the text encoder needs a tokenizers JSON file")

    out_dir.mkdir(parents=True, exist_ok=True)
    with safe_open(str(src_weights), framework="pt", device="cpu") as f:
        names = list(f.keys())
        state = hf_to_canonical(f.get_tensor, names, config)
    total = len(state)
    write_tensors(state, out_dir / WEIGHTS, progress=report, stage="text_encoder: convert tensors")
    atomic_write_bytes(out_dir / TOKENIZER, _tokenizer_json(folder / TOKENIZER, max_seq_len, config.pad_token_id))
    report("text_encoder: write files", 2, 2)
    log.info("imported %s: %d tensors, %d dimensions", folder, total, config.hidden_size)

    return {
        "kind": "bert",
        "config": config.to_dict(),
        "weights": WEIGHTS,
        "tokenizer": TOKENIZER,
        "pooling": pooling,
        "normalize": normalize,
        "max_seq_len": max_seq_len,
        "dimensions": config.hidden_size,
        "source": {
            "format": "sentence-transformers",
            "base_model": hf_config.get("_name_or_path", ""),
            "weights_sha256": sha256_file(src_weights),
            "dtype": "float32",
        },
    }
