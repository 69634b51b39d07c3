"""Executor stage, text encoder: a BERT-family encoder (e.g. all-MiniLM-L6-v2) and its pooling head.

Matches Hugging Face ``BertModel`` (post-LN, absolute positions, GELU FFN) with a mean-pool
plus optional L2-normalisation head as sentence-transformers applies it. Weights are loaded
from a firmware image's safetensors file by mmap; both our canonical tensor names (what the
image builder writes) and the Hugging Face names (with or without a ``bert.`` prefix) are
accepted.

Per-row LoRA (serving, as Punica's BGMV for the backbone): a forward pass may take
``RowLoras``, each text's adapter (or none) and each adapter's low-rank terms per layer.
The shared linears run over the whole batch; each adapter then adds ``s·(x·Aᵀ)·Bᵀ`` into the
rows of its texts only (rows without one pay nothing), the model itself never changed, so one
model object serves any mix of adapters, and two images at once during a hot swap. The
low-rank terms are computed in float32 whatever the encoder's compute dtype, and rounded
once into the linear's output dtype as they are added (as ``LoraLinear`` adds them).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from m4d.model.mapped import MappedSafetensors
from m4d.model.weights import embedding


@dataclass
class BertConfig:
    """Architecture of a BERT encoder; field names follow the Hugging Face ``config.json``."""

    vocab_size: int = 30522
    hidden_size: int = 384
    num_hidden_layers: int = 6
    num_attention_heads: int = 12
    intermediate_size: int = 1536
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_act: str = "gelu"
    pad_token_id: int = 0
    head_dim: int = field(init=False)

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not divisible by "
                f"num_attention_heads {self.num_attention_heads}"
            )
        if self.hidden_act not in _ACTIVATIONS:
            raise ValueError(f"unsupported hidden_act {self.hidden_act!r}; use one of {sorted(_ACTIVATIONS)}")
        self.head_dim = self.hidden_size // self.num_attention_heads

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BertConfig:
        """Build from a Hugging Face config dict (extra keys ignored) or from ``to_dict()``."""
        pos = d.get("position_embedding_type", "absolute")
        if pos != "absolute":
            raise ValueError(f"unsupported position_embedding_type {pos!r}; only 'absolute'")
        names = {f.name for f in fields(cls) if f.init}
        return cls(**{k: v for k, v in d.items() if k in names})

    def to_dict(self) -> dict[str, Any]:
        """The constructor fields only (derived fields are recomputed)."""
        d = asdict(self)
        d.pop("head_dim")
        return d


_ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "gelu": lambda x: F.gelu(x),  # exact (erf), as HF "gelu"
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}


@dataclass(frozen=True)
class LowRank:
    """One adapter's low-rank terms on one fused linear, float32: ``Aᵀ`` [in, R] (its parts'
    A side by side) and, per part, its columns of R, ``s·Bᵀ`` [r, part rows] and the part's
    output rows (q, k and v each write only their third of ``wqkv``'s output)."""

    at: Tensor  # [in, R]
    parts: tuple[tuple[int, int, Tensor, int, int], ...]  # (r0, r1, s·Bᵀ [r1-r0, stop-start], start, stop)

    @classmethod
    def from_fused(cls, at: Tensor, bt: Tensor, spans: Tensor) -> LowRank:
        """From ``m4d.adapters.lora.fuse``'s form: Aᵀ [in, R], s·Bᵀ [R, out] and Bᵀ's row
        spans (int32 [R, 2]; empty when every row spans the whole output)."""
        at, bt = at.float().contiguous(), bt.float()
        if spans.numel() == 0:
            return cls(at, ((0, at.shape[1], bt.contiguous(), 0, bt.shape[1]),))
        rows, parts, r0 = spans.tolist(), [], 0
        for j in range(1, len(rows) + 1):  # a part: consecutive rows of R with one span
            if j == len(rows) or rows[j] != rows[r0]:
                start, stop = rows[r0]
                parts.append((r0, j, bt[r0:j, start:stop].contiguous(), start, stop))
                r0 = j
        return cls(at, tuple(parts))

    @property
    def nbytes(self) -> int:
        return (self.at.numel() + sum(p[2].numel() for p in self.parts)) * 4

    def add(self, y: Tensor, x: Tensor, rows: Tensor) -> Tensor:
        """y [B, S, N] = linear(x [B, S, K]), with the terms added in batch rows `rows`."""
        h = x.index_select(0, rows).float() @ self.at  # [n, S, R]
        for r0, r1, bt, start, stop in self.parts:
            y[rows, :, start:stop] += (h[..., r0:r1] @ bt).to(y.dtype)  # [n, S, part rows]
        return y


# one layer's per-row LoRA: per adapter of the pass, its batch rows and its terms by linear
LayerLora = Sequence[tuple[Tensor, Mapping[str, LowRank]]]


def _linear(linear: nn.Module, x: Tensor, name: str, lora: LayerLora) -> Tensor:
    """``linear(x)`` shared by the batch, then each adapter's terms in its own rows."""
    y: Tensor = linear(x)
    for rows, terms in lora:
        low = terms.get(name)
        if low is not None:
            y = low.add(y, x, rows)
    return y


class RowLoras(NamedTuple):
    """The per-row LoRA of a pass over N texts (Punica's BGMV index): each adapter present's
    terms per layer (fused linear name -> LowRank, as ``m4d.adapters.lora.BERT_FUSED`` names
    them), and each text's adapter among them (-1: none)."""

    adapters: Sequence[Sequence[Mapping[str, LowRank]]]  # [adapter][layer]
    per_row: Tensor  # long [N]

    def slice(self, start: int, stop: int) -> RowLoras | None:
        """The texts [start, stop) (None when none of them has an adapter)."""
        per_row = self.per_row[start:stop]
        return RowLoras(self.adapters, per_row) if bool((per_row >= 0).any()) else None

    def groups(self, device: torch.device) -> list[tuple[Tensor, Sequence[Mapping[str, LowRank]]]]:
        """Per adapter with rows in the pass: its rows (long [n]) and its terms per layer."""
        index = self.per_row.to(device)
        out = []
        for a, terms in enumerate(self.adapters):
            rows = (index == a).nonzero().flatten()
            if rows.numel():
                out.append((rows, terms))
        return out


class Attention(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.config = config
        self.wqkv = nn.Linear(config.hidden_size, 3 * config.hidden_size)
        self.wo = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, x: Tensor, mask: Tensor, lora: LayerLora = ()) -> Tensor:
        # x: [B, S, D]; mask: [B, 1, 1, S] bool, True = attend
        b, s, d = x.shape
        h, dh = self.config.num_attention_heads, self.config.head_dim
        q, k, v = _linear(self.wqkv, x, "attention.wqkv", lora).chunk(3, dim=-1)  # each [B, S, D]
        q, k, v = (t.view(b, s, h, dh).transpose(1, 2) for t in (q, k, v))  # [B, H, S, Dh]
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # [B, H, S, Dh]
        return _linear(self.wo, y.transpose(1, 2).reshape(b, s, d), "attention.wo", lora)  # [B, S, D]


class FeedForward(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.w1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.w2 = nn.Linear(config.intermediate_size, config.hidden_size)
        self.act = _ACTIVATIONS[config.hidden_act]

    def forward(self, x: Tensor, lora: LayerLora = ()) -> Tensor:
        hidden = self.act(_linear(self.w1, x, "feed_forward.w1", lora))  # [B, S, F]
        return _linear(self.w2, hidden, "feed_forward.w2", lora)  # [B, S, D]


class EncoderLayer(nn.Module):
    """Post-LN: x = LN(x + attn(x)); x = LN(x + ffn(x)), as BERT."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.attention = Attention(config)
        self.attention_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.feed_forward = FeedForward(config)
        self.ffn_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, x: Tensor, mask: Tensor, lora: LayerLora = ()) -> Tensor:
        x = self.attention_norm(x + self.attention(x, mask, lora))
        out: Tensor = self.ffn_norm(x + self.feed_forward(x, lora))
        return out


class BertEncoder(nn.Module):
    """Token ids -> contextual hidden states [B, S, D]."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.config = config
        self.tok_embeddings = embedding(config.vocab_size, config.hidden_size)
        self.pos_embeddings = embedding(config.max_position_embeddings, config.hidden_size)
        self.type_embeddings = embedding(config.type_vocab_size, config.hidden_size)
        self.emb_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.layers = nn.ModuleList(EncoderLayer(config) for _ in range(config.num_hidden_layers))

    def forward(
        self, input_ids: Tensor, attention_mask: Tensor, token_type_ids: Tensor | None = None,
        lora: RowLoras | None = None,
    ) -> Tensor:
        # input_ids, attention_mask, token_type_ids: [B, S]; lora: each row's adapter (or none)
        s = input_ids.shape[1]
        if s > self.config.max_position_embeddings:
            raise ValueError(f"sequence length {s} exceeds max_position_embeddings {self.config.max_position_embeddings}")
        pos = torch.arange(s, device=input_ids.device)  # [S]
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        x = self.tok_embeddings(input_ids) + self.pos_embeddings(pos) + self.type_embeddings(token_type_ids)
        x = self.emb_norm(x)  # [B, S, D]
        mask = attention_mask.bool()[:, None, None, :]  # [B, 1, 1, S]
        groups = lora.groups(x.device) if lora is not None else []
        for i, layer in enumerate(self.layers):
            x = layer(x, mask, [(rows, terms[i]) for rows, terms in groups])
        return x  # type: ignore[no-any-return]  # [B, S, D]


class MeanPool(nn.Module):
    """Head ``mean_pool_l2``: mean over unmasked tokens, then L2 normalisation if configured."""

    def __init__(self, normalize: bool = True) -> None:
        super().__init__()
        self.normalize = normalize

    def forward(self, hidden: Tensor, attention_mask: Tensor) -> Tensor:
        # hidden: [B, S, D]; attention_mask: [B, S] -> [B, D] (always float32)
        m = attention_mask.to(torch.float32).unsqueeze(-1)  # [B, S, 1]
        summed = (hidden.to(torch.float32) * m).sum(dim=1)  # [B, D]
        pooled = summed / m.sum(dim=1).clamp(min=1e-9)
        return F.normalize(pooled, p=2, dim=-1) if self.normalize else pooled


# ---------------------------------------------------------------------------------------------
# Weights: canonical names <-> Hugging Face names

_HF_LAYER = {
    "attention.output.dense": "attention.wo",
    "attention.output.LayerNorm": "attention_norm",
    "intermediate.dense": "feed_forward.w1",
    "output.dense": "feed_forward.w2",
    "output.LayerNorm": "ffn_norm",
}
_HF_TOP = {
    "embeddings.word_embeddings": "tok_embeddings",
    "embeddings.position_embeddings": "pos_embeddings",
    "embeddings.token_type_embeddings": "type_embeddings",
    "embeddings.LayerNorm": "emb_norm",
}


def canonical_names(config: BertConfig) -> list[str]:
    """The tensor names a firmware image stores for this encoder (our module's state dict)."""
    with torch.device("meta"):
        return list(BertEncoder(config).state_dict().keys())


def hf_to_canonical(get: Any, names: Sequence[str], config: BertConfig) -> dict[str, Tensor]:
    """Map Hugging Face BertModel tensors to canonical ones.

    ``get(name) -> Tensor`` reads one tensor; ``names`` lists what is available. A ``bert.``
    prefix (BertForX checkpoints) is stripped. q/k/v are concatenated into ``wqkv``.
    """
    prefix = "bert." if any(n.startswith("bert.embeddings.") for n in names) else ""
    have = set(names)
    out: dict[str, Tensor] = {}

    def take(hf: str) -> Tensor:
        full = prefix + hf
        if full not in have:
            raise KeyError(f"tensor {full!r} missing from the checkpoint")
        return get(full)  # type: ignore[no-any-return]

    for hf, ours in _HF_TOP.items():
        for p in ("weight", "bias"):
            if hf == "embeddings.LayerNorm" or p == "weight":
                out[f"{ours}.{p}"] = take(f"{hf}.{p}")
    for i in range(config.num_hidden_layers):
        base = f"encoder.layer.{i}."
        for p in ("weight", "bias"):
            out[f"layers.{i}.attention.wqkv.{p}"] = torch.cat(
                [take(f"{base}attention.self.{n}.{p}") for n in ("query", "key", "value")], dim=0
            )
            for hf, ours in _HF_LAYER.items():
                out[f"layers.{i}.{ours}.{p}"] = take(f"{base}{hf}.{p}")
    return out


def load_bert(
    weights_file: str | Path,
    config: BertConfig,
    *,
    compute_dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> BertEncoder:
    """Build on meta, map the safetensors file and assign its tensors; returns an eval model."""
    with torch.device("meta"):
        model = BertEncoder(config)
    f = MappedSafetensors(weights_file)
    names = f.keys()
    expected = set(model.state_dict().keys())
    if expected <= set(names):
        state = {n: f.get(n) for n in expected}
    else:
        state = hf_to_canonical(f.get, names, config)
    for name, t in state.items():
        if not t.is_floating_point():
            raise ValueError(f"tensor {name!r} in {weights_file} is {t.dtype}, expected floating point")
        state[name] = t.to(device=device, dtype=compute_dtype)
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()


# ---------------------------------------------------------------------------------------------
# Tokenization + forward


def configure_tokenizer(tokenizer: Any, max_seq_len: int, pad_id: int = 0) -> None:
    """Pad to the longest text of a batch and truncate to ``max_seq_len`` (idempotent)."""
    trunc = tokenizer.truncation
    if trunc is None or trunc.get("max_length") != max_seq_len:
        tokenizer.enable_truncation(max_length=max_seq_len)
    pad = tokenizer.padding
    if pad is None or pad.get("length") is not None or pad.get("pad_id") != pad_id:
        pad_token = tokenizer.id_to_token(pad_id) or "[PAD]"
        tokenizer.enable_padding(pad_id=pad_id, pad_token=pad_token)


class Embeddings(NamedTuple):
    vectors: Tensor  # float32 [N, D]
    token_counts: list[int]  # per text, after truncation, special tokens included


@torch.inference_mode()
def embed_with_counts(
    model: BertEncoder,
    tokenizer: Any,
    texts: Sequence[str],
    max_seq_len: int,
    *,
    normalize: bool = True,
    batch_size: int = 64,
    lora: RowLoras | None = None,
) -> Embeddings:
    """Embed texts with a ``tokenizers.Tokenizer``: float32 [N, D] and each text's token count
    (after truncation, special tokens included: what the encoder actually processed).
    `lora`: each text's adapter (index [N])."""
    if max_seq_len > model.config.max_position_embeddings:
        raise ValueError(f"max_seq_len {max_seq_len} exceeds max_position_embeddings {model.config.max_position_embeddings}")
    configure_tokenizer(tokenizer, max_seq_len, model.config.pad_token_id)
    device = model.tok_embeddings.weight.device
    head = MeanPool(normalize)
    chunks: list[Tensor] = []
    counts: list[int] = []
    for start in range(0, len(texts), batch_size):
        encs = tokenizer.encode_batch(list(texts[start : start + batch_size]))
        ids = torch.tensor([e.ids for e in encs], dtype=torch.long, device=device)  # [B, S]
        mask = torch.tensor([e.attention_mask for e in encs], dtype=torch.long, device=device)
        types = torch.tensor([e.type_ids for e in encs], dtype=torch.long, device=device)
        rows = lora.slice(start, start + batch_size) if lora is not None else None
        chunks.append(head(model(ids, mask, types, rows), mask))  # [B, D]
        counts.extend(int(sum(e.attention_mask)) for e in encs)
    if not chunks:
        return Embeddings(torch.empty(0, model.config.hidden_size), counts)
    return Embeddings(torch.cat(chunks), counts)  # [N, D], [N]
