"""Firmware image build, importer: a CTranslate2 Whisper folder -> the speech recognizer component.

A CTranslate2 model folder holds ``model.bin`` (variables of a ``WhisperSpec``), ``config.json``
(suppression lists) and ``tokenizer.json``. ``model.bin`` is read by our own parser of the
format CTranslate2's ``ModelSpec._serialize`` writes (binary versions 4..6, little-endian):

    u32 binary_version; str spec_name; u32 spec_revision; u32 n_variables
    n_variables x { str name; u8 rank; u32 dims[rank]; u8 dtype_id; u32 n_bytes; bytes data }
    u32 n_aliases; n_aliases x { str alias; str target }
    str = u16 length (incl. NUL) + UTF-8 bytes + NUL
    dtype_id: 0 float32, 1 int8, 2 int16, 3 int32, 4 float16, 5 bfloat16

Quantized weights are dequantized to float32: int8 rows carry a per-row ``<name>_scale``
(q = round(w * scale)), int16 a single scale. The file is only parsed, never executed.
"""

from __future__ import annotations

import json
import mmap
import re
import struct
from pathlib import Path
from typing import Any

import torch
from m4image.fsutil import sha256_file

from m4d.builder.importers.common import Progress
from m4d.builder.importers.hf_whisper import (
    TOKENIZER,
    WhisperImportError,
    write_whisper_component,
)
from m4d.model.whisper import WhisperConfig

_DTYPES = {0: torch.float32, 1: torch.int8, 2: torch.int16, 3: torch.int32, 4: torch.float16, 5: torch.bfloat16}
_BINARY_VERSIONS = (4, 5, 6)
_MAX_SPEC_REVISION = 3
_GELU = 3  # ctranslate2.specs.common_spec.Activation.GELU


def read_ct2_model(path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict[str, str]]:
    """Parse ``model.bin`` -> (header, variables as tensors in their stored dtype, aliases)."""
    with path.open("rb") as fh:
        size = path.stat().st_size
        if size < 16:
            raise WhisperImportError(f"{path} is too short ({size} bytes) for a CTranslate2 model")
        buf = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_COPY)  # private writable view for frombuffer
    pos = 0

    def take(n: int) -> memoryview:
        nonlocal pos
        if pos + n > size:
            raise WhisperImportError(f"{path} is truncated at byte {pos} (needs {n} more bytes)")
        view = memoryview(buf)[pos : pos + n]
        pos += n
        return view

    def u(fmt: str) -> int:
        return int(struct.unpack(fmt, take(struct.calcsize(fmt)))[0])

    def string() -> str:
        raw = bytes(take(u("<H")))
        return raw.rstrip(b"\0").decode("utf-8")

    version = u("<I")
    if version not in _BINARY_VERSIONS:
        raise WhisperImportError(f"{path}: CTranslate2 binary version {version} is not supported; use {_BINARY_VERSIONS}")
    header: dict[str, Any] = {"binary_version": version, "spec": string(), "spec_revision": u("<I")}
    if header["spec"] != "WhisperSpec":
        raise WhisperImportError(f"{path} holds a {header['spec']!r}, not a WhisperSpec")
    if header["spec_revision"] > _MAX_SPEC_REVISION:
        raise WhisperImportError(f"{path}: WhisperSpec revision {header['spec_revision']} is newer than {_MAX_SPEC_REVISION}")
    variables: dict[str, torch.Tensor] = {}
    for _ in range(u("<I")):
        name = string()
        shape = [u("<I") for _ in range(u("<B"))]
        dtype_id, n_bytes = u("<B"), u("<I")
        if dtype_id not in _DTYPES:
            raise WhisperImportError(f"{path}: variable {name} has unknown dtype id {dtype_id}")
        dtype = _DTYPES[dtype_id]
        numel = 1
        for d in shape:
            numel *= d
        if numel * dtype.itemsize != n_bytes:
            raise WhisperImportError(f"{path}: variable {name} {shape} {dtype} declares {n_bytes} bytes")
        data = take(n_bytes)
        variables[name] = torch.frombuffer(data, dtype=dtype, count=numel).reshape(shape).clone() if numel else torch.empty(shape, dtype=dtype)
    aliases = {}
    for _ in range(u("<I")):
        alias = string()
        aliases[alias] = string()
    if pos != size:
        raise WhisperImportError(f"{path}: {size - pos} unexpected trailing bytes")
    return header, variables, aliases


def _resolve_aliases(variables: dict[str, torch.Tensor], aliases: dict[str, str]) -> dict[str, torch.Tensor]:
    """CTranslate2 stores identical tensors once (e.g. tied embeddings, equal LayerNorms) and
    lists the other names as aliases; give every alias its tensor."""
    out = dict(variables)
    for alias, target in aliases.items():
        seen = {alias}
        while target in aliases and target not in seen:
            seen.add(target)
            target = aliases[target]
        if target not in variables:
            raise WhisperImportError(f"model.bin alias {alias} points to a missing variable {target}")
        out[alias] = variables[target]
        if f"{target}_scale" in variables and f"{alias}_scale" not in variables:
            out[f"{alias}_scale"] = variables[f"{target}_scale"]  # a quantized alias shares the scale
    return out


def _dequantize(variables: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every floating/quantized tensor -> float32; scales folded in and dropped."""
    out: dict[str, torch.Tensor] = {}
    for name, t in variables.items():
        if name.endswith("_scale"):
            continue
        scale = variables.get(f"{name}_scale")
        if scale is not None:
            if t.dtype not in (torch.int8, torch.int16):
                raise WhisperImportError(f"{name} has a scale but is stored as {t.dtype}")
            s = scale.to(torch.float32)
            rows = t.reshape(t.shape[0], -1).to(torch.float32)  # conv weights scale per output channel
            t = (rows / (s[:, None] if s.dim() else s)).reshape(t.shape)
        elif t.dtype in (torch.int8, torch.int16) and t.dim() > 0:
            raise WhisperImportError(f"{name} is {t.dtype} without a scale; cannot dequantize")
        out[name] = t.to(torch.float32) if t.is_floating_point() or scale is not None else t
    return out


def _scalar(v: dict[str, torch.Tensor], name: str, default: int | None = None) -> int:
    if name not in v:
        if default is None:
            raise WhisperImportError(f"model.bin lacks {name}")
        return default
    return int(v[name].reshape(-1)[0])


def _to_canonical(v: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    names = {"layer_norm/gamma": "norm.weight", "layer_norm/beta": "norm.bias"}
    linear = {"weight": "weight", "bias": "bias"}
    enc_layer = {"self_attention/layer_norm": "attention_norm", "self_attention/linear_0": "attention.wqkv",
                 "self_attention/linear_1": "attention.wo", "ffn/layer_norm": "ffn_norm",
                 "ffn/linear_0": "feed_forward.w1", "ffn/linear_1": "feed_forward.w2"}
    dec_layer = {**enc_layer, "attention/layer_norm": "cross_norm", "attention/linear_0": "cross_attention.wq",
                 "attention/linear_1": "cross_attention.wkv", "attention/linear_2": "cross_attention.wo"}
    mapping: dict[str, str] = {
        "encoder/position_encodings/encodings": "encoder.positions",
        "decoder/embeddings/weight": "decoder.tok_embeddings.weight",
        "decoder/position_encodings/encodings": "decoder.pos_embeddings.weight",
    }
    for side in ("encoder", "decoder"):
        for ct, ours in names.items():
            mapping[f"{side}/{ct}"] = f"{side}.{ours}"
    for conv in ("conv1", "conv2"):
        for p in linear:
            mapping[f"encoder/{conv}/{p}"] = f"encoder.{conv}.{p}"
    layer_re = re.compile(r"(encoder|decoder)/layer_(\d+)/(.+)/(weight|bias|gamma|beta)$")
    param = {"weight": "weight", "bias": "bias", "gamma": "weight", "beta": "bias"}
    state: dict[str, torch.Tensor] = {}
    counts = {"encoder": 0, "decoder": 0}
    proj = "decoder/projection/weight"
    for name, t in v.items():
        if t.dim() == 0 or name == proj:
            continue  # scalar options, checked separately; the tied projection below
        if name in mapping:
            state[mapping[name]] = t
            continue
        m = layer_re.match(name)
        table = enc_layer if m and m.group(1) == "encoder" else dec_layer
        if not m or m.group(3) not in table:
            raise WhisperImportError(f"model.bin variable {name} is not part of the Whisper layout we import")
        side, i = m.group(1), int(m.group(2))
        counts[side] = max(counts[side], i + 1)
        state[f"{side}.layers.{i}.{table[m.group(3)]}.{param[m.group(4)]}"] = t
    if proj in v and not torch.equal(v[proj], v["decoder/embeddings/weight"]):
        raise WhisperImportError("the output projection is not tied to the token embedding; not supported")
    return state, counts


def import_ct2_whisper(src: Path, out_dir: Path, progress: Progress | None = None) -> dict[str, Any]:
    """Import a CTranslate2 Whisper folder (model.bin, config.json, tokenizer.json) into ``out_dir``."""
    src, out_dir = Path(src), Path(out_dir)
    report = progress or (lambda stage, done, total: None)
    model_bin = src / "model.bin"
    if not model_bin.is_file():
        raise WhisperImportError(f"{model_bin} is missing; is {src} a CTranslate2 model folder?")
    header, raw, aliases = read_ct2_model(model_bin)
    report("speech: read model.bin", 1, 1)
    v = _dequantize(_resolve_aliases(raw, aliases))
    if _scalar(v, "decoder/pre_norm", 1) != 1 or _scalar(v, "decoder/activation", _GELU) != _GELU:
        raise WhisperImportError("model.bin decoder is not pre-norm with exact GELU")
    if _scalar(v, "decoder/scale_embeddings", 0) or _scalar(v, "decoder/alibi", 0):
        raise WhisperImportError("model.bin uses scaled embeddings or ALiBi; not a standard Whisper")
    state, layers = _to_canonical(v)
    try:
        ct2_cfg = json.loads((src / "config.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        ct2_cfg = {}
    except json.JSONDecodeError as e:
        raise WhisperImportError(f"{src}/config.json is not valid JSON: {e}") from None
    emb = state["decoder.tok_embeddings.weight"]
    config = WhisperConfig(
        vocab_size=emb.shape[0],
        num_mel_bins=state["encoder.conv1.weight"].shape[1],
        d_model=emb.shape[1],
        encoder_layers=layers["encoder"],
        encoder_attention_heads=_scalar(v, "encoder/num_heads"),
        encoder_ffn_dim=state["encoder.layers.0.feed_forward.w1.weight"].shape[0],
        decoder_layers=layers["decoder"],
        decoder_attention_heads=_scalar(v, "decoder/num_heads"),
        decoder_ffn_dim=state["decoder.layers.0.feed_forward.w1.weight"].shape[0],
        max_source_positions=state["encoder.positions"].shape[0],
        max_target_positions=state["decoder.pos_embeddings.weight"].shape[0],
        suppress_tokens=[int(t) for t in ct2_cfg.get("suppress_ids", [])],
        begin_suppress_tokens=[int(t) for t in ct2_cfg.get("suppress_ids_begin", [])],
    )
    stored = sorted({str(t.dtype).removeprefix("torch.") for t in raw.values() if t.dim() > 1})
    source = {"format": "ctranslate2", **header, "weights_sha256": sha256_file(model_bin), "dtype": ",".join(stored)}
    return write_whisper_component(state, config, src / TOKENIZER, out_dir, source, report)
