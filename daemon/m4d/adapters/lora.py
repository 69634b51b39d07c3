"""LoRA adapters over the shared modules (model stage): PEFT's files in, M4's fused linears out.

An adapter is data (PEFT's layout, as Punica and vLLM read it): ``adapter_config.json`` (rank,
alpha, target modules) and ``adapter_model.safetensors`` (``lora_A`` [r, in] and ``lora_B``
[out, r] per adapted linear, named as in the Hugging Face model). A linear's output becomes
``W·x + s·B·(A·x)`` with ``s = alpha / r`` (``alpha / sqrt(r)`` with rsLoRA); dropout only
acts in training.

M4's networks fuse some linears (Llama's q/k/v into ``wqkv`` and gate/up into ``w13``; BERT's
query/key/value into ``wqkv``). A fused linear's adapter is the pairs of its parts side by
side: ``A`` stacked over the parts' ranks, ``B`` placing each part's rows in its slice of the
fused output (zeros elsewhere), the scaling folded into ``B``. That is the form the fused
decode step takes (``m4.decode_layers``' ``lora`` tensors: ``Aᵀ`` [in, R] and ``Bᵀ`` [R, out]).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from m4image.fsutil import atomic_write_bytes
from torch import Tensor

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
MAX_RANK = 64
MODULES = ("backbone", "text_encoder")  # what an adapter may adapt

# Each fused linear of a layer: its name in our network, and the Hugging Face linears it is
# made of, in output order (q/k/v rows, gate/up rows)
LLAMA_FUSED = {
    "attention.wqkv": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "attention.wo": ("self_attn.o_proj",),
    "feed_forward.w13": ("mlp.gate_proj", "mlp.up_proj"),
    "feed_forward.w2": ("mlp.down_proj",),
}
BERT_FUSED = {
    "attention.wqkv": ("attention.self.query", "attention.self.key", "attention.self.value"),
    "attention.wo": ("attention.output.dense",),
    "feed_forward.w1": ("intermediate.dense",),
    "feed_forward.w2": ("output.dense",),
}
LAYER_PREFIX = {"backbone": "model.layers", "text_encoder": "encoder.layer"}
FUSED = {"backbone": LLAMA_FUSED, "text_encoder": BERT_FUSED}
# a PEFT key: any wrapper prefix, the HF module path, then lora_A / lora_B (adapter name optional)
_KEY = re.compile(r"^(?:base_model\.model\.)?(?:[a-z_]+\.)?(?P<module>(?:model\.layers|encoder\.layer)"
                  r"\.\d+\.[a-z_.]+?)\.lora_(?P<ab>[AB])(?:\.[A-Za-z0-9_]+)?\.weight$")


class AdapterError(ValueError):
    """An adapter that cannot be used: the message says which file and what is wrong."""


@dataclass
class LoraPair:
    a: Tensor  # [r, in] float32
    b: Tensor  # [out, r] float32
    scaling: float

    @property
    def rank(self) -> int:
        return int(self.a.shape[0])


@dataclass
class Lora:
    """One adapter's low-rank pairs by Hugging Face module path (``model.layers.3.self_attn.q_proj``)."""

    module: str  # "backbone" or "text_encoder"
    rank: int
    alpha: float
    pairs: dict[str, LoraPair] = field(default_factory=dict)
    rslora: bool = False
    base_model: str = ""  # what it was trained on (PEFT's base_model_name_or_path)

    @property
    def targets(self) -> list[str]:
        """The linears it adapts, by their last name (q_proj, v_proj, ...)."""
        return sorted({name.rsplit(".", 1)[-1] for name in self.pairs})

    @property
    def nbytes(self) -> int:
        return sum(p.a.numel() * 4 + p.b.numel() * 4 for p in self.pairs.values())

    def scaling(self, rank: int, alpha: float) -> float:
        return alpha / math.sqrt(rank) if self.rslora else alpha / rank


def _target_names(config: Mapping[str, Any]) -> list[str]:
    targets = config.get("target_modules") or []
    return [targets] if isinstance(targets, str) else list(targets)


def read_peft(folder: Path, module: str = "backbone") -> Lora:
    """A PEFT LoRA folder (``adapter_config.json`` + ``adapter_model.safetensors``)."""
    from safetensors.torch import load_file

    if module not in MODULES:
        raise AdapterError(f"an adapter adapts one of {', '.join(MODULES)}, not {module!r}")
    config_path, weights_path = folder / PEFT_CONFIG, folder / PEFT_WEIGHTS
    for path in (config_path, weights_path):
        if not path.is_file():
            raise AdapterError(f"{path} is missing: a PEFT adapter folder holds "
                               f"{PEFT_CONFIG} and {PEFT_WEIGHTS}")
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError) as exc:
        raise AdapterError(f"{config_path} is not JSON: {exc}") from exc
    if str(config.get("peft_type", "LORA")).upper() != "LORA":
        raise AdapterError(f"{config_path}: peft_type {config.get('peft_type')!r} is not LORA")
    for flag in ("fan_in_fan_out", "use_dora"):
        if config.get(flag):
            raise AdapterError(f"{config_path}: {flag} adapters are not supported")
    if config.get("bias", "none") != "none":
        raise AdapterError(f"{config_path}: bias {config['bias']!r} is not supported (only 'none')")
    rank, alpha = int(config.get("r", 8)), float(config.get("lora_alpha", 8))
    lora = Lora(module, rank, alpha, rslora=bool(config.get("use_rslora")),
                base_model=str(config.get("base_model_name_or_path") or ""))
    ranks, alphas = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    try:
        tensors = load_file(str(weights_path))
    except Exception as exc:  # safetensors raises its own error types
        raise AdapterError(f"{weights_path} is not a safetensors file: {exc}") from exc
    halves: dict[str, dict[str, Tensor]] = {}
    for key, value in tensors.items():
        m = _KEY.match(key)
        if m is None:
            raise AdapterError(f"{weights_path}: tensor {key!r} is not a LoRA A or B weight of "
                               f"a linear this daemon knows ({', '.join(MODULES)} layers)")
        halves.setdefault(m["module"], {})[m["ab"]] = value.float().contiguous()
    prefix = LAYER_PREFIX[module] + "."
    for name, ab in sorted(halves.items()):
        if not name.startswith(prefix):
            raise AdapterError(f"{weights_path}: {name} is not a {module} linear")
        if set(ab) != {"A", "B"}:
            raise AdapterError(f"{weights_path}: {name} has lora_{''.join(ab)} but not both A and B")
        a, b = ab["A"], ab["B"]
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            raise AdapterError(f"{weights_path}: {name}: lora_A {tuple(a.shape)} and lora_B "
                               f"{tuple(b.shape)} are not [r, in] and [out, r]")
        r = a.shape[0]
        if not 1 <= r <= MAX_RANK:
            raise AdapterError(f"{weights_path}: {name} has rank {r}; ranks 1..{MAX_RANK} are served")
        short = name.rsplit(".", 1)[-1]
        pattern_alpha = next((float(v) for k, v in alphas.items() if name.endswith(k) or k == short), None)
        expected = next((int(v) for k, v in ranks.items() if name.endswith(k) or k == short), rank)
        if r != expected:
            raise AdapterError(f"{weights_path}: {name} has rank {r}, the config says {expected}")
        scale_alpha = pattern_alpha if pattern_alpha is not None else alpha
        lora.pairs[name] = LoraPair(a, b, lora.scaling(r, scale_alpha))
    if not lora.pairs:
        raise AdapterError(f"{weights_path} holds no LoRA weights")
    return lora


def peft_module(folder: Path) -> str:
    """Which module a PEFT folder adapts ("backbone" or "text_encoder"), from its tensors'
    names (read from the header: no weights loaded)."""
    from safetensors import safe_open

    path = folder / PEFT_WEIGHTS
    try:
        with safe_open(str(path), framework="pt") as f:
            keys = list(f.keys())
    except Exception as exc:  # safetensors raises its own error types
        raise AdapterError(f"{path} is not a safetensors file: {exc}") from exc
    found = {module for key in keys if (m := _KEY.match(key)) is not None
             for module, prefix in LAYER_PREFIX.items() if m["module"].startswith(prefix + ".")}
    if len(found) != 1:
        raise AdapterError(f"{path}: its LoRA weights are not those of one module "
                           f"({', '.join(MODULES)}): {', '.join(sorted(found)) or 'none'}")
    return found.pop()


def write_peft(folder: Path, lora: Lora, extra: Mapping[str, Any] | None = None,
               dtype: torch.dtype = torch.float32) -> None:
    """Writes ``lora`` as a PEFT folder (each file whole or not at all), its weights in
    `dtype` (float16 halves the file; `read_peft` reads them back as float32). Pairs that
    share the adapter's rank and alpha need no pattern; others go into rank/alpha patterns."""
    from safetensors.torch import save

    folder.mkdir(parents=True, exist_ok=True)
    top = "base_model.model."  # PEFT's wrapper around the model's own names
    tensors: dict[str, Tensor] = {}
    ranks: dict[str, int] = {}
    alphas: dict[str, float] = {}
    for name, pair in sorted(lora.pairs.items()):
        tensors[f"{top}{name}.lora_A.weight"] = pair.a.detach().to(dtype).contiguous()
        tensors[f"{top}{name}.lora_B.weight"] = pair.b.detach().to(dtype).contiguous()
        alpha = pair.scaling * (math.sqrt(pair.rank) if lora.rslora else pair.rank)
        if pair.rank != lora.rank:
            ranks[name] = pair.rank
        if not math.isclose(alpha, lora.alpha, rel_tol=1e-6):
            alphas[name] = alpha
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM" if lora.module == "backbone" else "FEATURE_EXTRACTION",
        "base_model_name_or_path": lora.base_model, "r": lora.rank, "lora_alpha": lora.alpha,
        "target_modules": lora.targets, "lora_dropout": 0.0, "bias": "none",
        "use_rslora": lora.rslora, "fan_in_fan_out": False, "inference_mode": True,
        "rank_pattern": ranks, "alpha_pattern": alphas, "modules_to_save": None,
        **(extra or {}),
    }
    atomic_write_bytes(folder / PEFT_WEIGHTS, save(tensors, metadata={"format": "pt"}))
    atomic_write_bytes(folder / PEFT_CONFIG, (json.dumps(config, indent=2) + "\n").encode())


# ---- fused form -----------------------------------------------------------------------

@dataclass(frozen=True)
class FusedPart:
    """One HF linear inside a fused one: its module path and its rows of the fused output."""

    name: str
    start: int
    stop: int


def fused_parts(module: str, layer: int, sizes: Sizes) -> dict[str, list[FusedPart]]:
    """Per fused linear of `layer` (``attention.wqkv`` ...), its parts with their output rows
    (`sizes`: ``llama_sizes`` / ``bert_sizes``)."""
    out: dict[str, list[FusedPart]] = {}
    for ours, theirs in FUSED[module].items():
        start, parts = 0, []
        for hf, size in zip(theirs, sizes[ours][0], strict=True):
            parts.append(FusedPart(f"{LAYER_PREFIX[module]}.{layer}.{hf}", start, start + size))
            start += size
        out[ours] = parts
    return out


def fuse(pairs: Sequence[tuple[FusedPart, LoraPair]], n_in: int, n_out: int
         ) -> tuple[Tensor, Tensor, Tensor]:
    """The parts' pairs as one fused pair: ``Aᵀ`` [in, R] and ``s·Bᵀ`` [R, out], R the sum of
    the parts' ranks, and ``Bᵀ``'s row spans: int32 [R, 2], row j's part's output columns
    [start, stop) (zero elsewhere), or empty where every row spans the whole output (empty
    tensors when no part is adapted)."""
    if not pairs:
        return torch.empty(0), torch.empty(0), torch.empty(0, dtype=torch.int32)
    total = sum(pair.rank for _, pair in pairs)
    at = torch.zeros(n_in, total)
    bt = torch.zeros(total, n_out)
    spans = torch.zeros(total, 2, dtype=torch.int32)
    j = 0
    for part, pair in pairs:
        r = pair.rank
        if pair.a.shape[1] != n_in or pair.b.shape[0] != part.stop - part.start:
            raise AdapterError(f"{part.name}: lora_A {tuple(pair.a.shape)} / lora_B "
                               f"{tuple(pair.b.shape)} do not fit the model's [{part.stop - part.start}, {n_in}] linear")
        at[:, j:j + r] = pair.a.t()
        bt[j:j + r, part.start:part.stop] = pair.b.t() * pair.scaling
        spans[j:j + r] = torch.tensor([part.start, part.stop], dtype=torch.int32)
        j += r
    whole = bool((spans[:, 0] == 0).all() and (spans[:, 1] == n_out).all())
    return at.contiguous(), bt.contiguous(), torch.empty(0, dtype=torch.int32) if whole else spans


# each fused linear's part sizes (output rows) and input size
Sizes = Mapping[str, tuple[list[int], int]]


def sizes_for(config: Any) -> dict[str, tuple[list[int], int]]:
    """``llama_sizes`` or ``bert_sizes`` of a network's config (LlamaConfig, BertConfig)."""
    if hasattr(config, "ffn_dim"):
        return llama_sizes(config.dim, config.n_heads, config.n_kv_heads, config.head_dim,
                           config.ffn_dim)
    return bert_sizes(config.hidden_size, config.intermediate_size)


def llama_sizes(dim: int, n_heads: int, n_kv_heads: int, head_dim: int, ffn: int) -> dict[str, tuple[list[int], int]]:
    """Each fused Llama linear's part sizes and input size."""
    q, kv = n_heads * head_dim, n_kv_heads * head_dim
    return {"attention.wqkv": ([q, kv, kv], dim), "attention.wo": ([dim], q),
            "feed_forward.w13": ([ffn, ffn], dim), "feed_forward.w2": ([dim], ffn)}


def bert_sizes(hidden: int, intermediate: int) -> dict[str, tuple[list[int], int]]:
    return {"attention.wqkv": ([hidden] * 3, hidden), "attention.wo": ([hidden], hidden),
            "feed_forward.w1": ([intermediate], hidden), "feed_forward.w2": ([hidden], intermediate)}


def fused_layers(lora: Lora, n_layers: int, sizes: Sizes) -> list[dict[str, tuple[Tensor, Tensor, Tensor]]]:
    """Per layer, each fused linear's (Aᵀ, s·Bᵀ, Bᵀ's row spans) as `fuse` makes them (empty
    tensors where not adapted). Refuses pairs for layers or linears the model does not have."""
    known: set[str] = set()
    out = []
    for layer in range(n_layers):
        parts = fused_parts(lora.module, layer, sizes)
        fused: dict[str, tuple[Tensor, Tensor, Tensor]] = {}
        for ours, members in parts.items():
            known.update(p.name for p in members)
            present = [(p, lora.pairs[p.name]) for p in members if p.name in lora.pairs]
            fused[ours] = fuse(present, sizes[ours][1], sum(sizes[ours][0]))
        out.append(fused)
    unknown = sorted(set(lora.pairs) - known)
    if unknown:
        raise AdapterError(f"the adapter has linears the model does not: {', '.join(unknown[:4])}")
    return out


def encoder_terms(lora: Lora, config: Any, device: torch.device | None = None) -> list[dict[str, Any]]:
    """Per layer of a BERT encoder (`config`: its BertConfig), each adapted fused linear's
    low-rank terms as the encoder's forward adds them per row (``m4d.model.bert.LowRank``:
    float32, each part's own slice of B), on `device`."""
    from m4d.model.bert import LowRank

    if lora.module != "text_encoder":
        raise AdapterError(f"the adapter is for the {lora.module}, not the text_encoder")
    return [{name: LowRank.from_fused(at.to(device), bt.to(device), spans)
             for name, (at, bt, spans) in layer.items() if at.numel()}
            for layer in fused_layers(lora, config.num_hidden_layers, sizes_for(config))]


DECODE_DTYPES = (torch.float32, torch.bfloat16)  # what m4.decode_layers reads adapters in


def decode_tensors(lora: Lora, n_layers: int, sizes: Sizes,
                   dtype: torch.dtype = torch.float32, spans: bool = False) -> list[Tensor]:
    """``m4.decode_layers``' ``lora`` tensors for one adapter: per layer, qkv, o, w13, w2's
    (Aᵀ, Bᵀ) in `dtype` (float32, or bfloat16: half the memory and the bytes a step reads;
    converted after the scaling is folded into Bᵀ), each followed by its Bᵀ's int32 row
    spans when `spans` (empty where every row spans the whole output): the decode step then
    skips the zeros outside each fused part's slice (two thirds of q/k/v's Bᵀ when each part
    has the same rank, half of gate/up's), with the same numbers."""
    if dtype not in DECODE_DTYPES:
        raise ValueError(f"adapters decode in float32 or bfloat16, not {dtype}")
    out: list[Tensor] = []
    for layer in fused_layers(lora, n_layers, sizes):
        for name in LLAMA_FUSED:  # qkv, o, w13, w2: the op's order
            at, bt, row_spans = layer[name]
            out += [at.to(dtype).contiguous(), bt.to(dtype).contiguous()]
            if spans:
                out.append(row_spans)
    return out
