"""The M4 text decoder: a Llama network with a slot-addressed KV cache (model stage).

gpt-fast style: a dataclass config from the firmware manifest, plain modules, a static KV
cache set up explicitly, weights built under ``torch.device("meta")`` and assigned from an
mmap'd safetensors file written by ``m4d.builder.importers``.

Layout notes:
* q/k/v and gate/up are fused into one linear each at load time (fewer kernel launches; decode
  is limited by per-step overhead on this CPU, not by bandwidth). With w4a8 in float32 a
  whole decode step is one C++ call (see ``LayerStack``).
* RoPE uses the Hugging Face ``rotate_half`` convention; the GGUF importer undoes llama.cpp's
  row permutation of q/k so the stored weights are HF-style.
"""

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from m4d.model import kernels
from m4d.model.block_linear import KERNEL_TILE, BlockEmbedding, BlockLinear, q8_0_from_float
from m4d.model.kv_cache import KVCache
from m4d.model.layer_stack import LayerStack, script_stack
from m4d.model.quant import Int8DynamicLinear
from m4d.model.weights import WeightFile, build_linear, embedding, resolve_weight_format

# a step's LoRA tensors (m4.decode_layers' `lora`) and each row's adapter index, -1: none
RowAdapters = tuple[list[torch.Tensor], torch.Tensor]
ATTN_BLOCK = 64  # cached attention spans a multiple of this many positions (see forward)


@dataclass
class LlamaConfig:
    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    ffn_dim: int
    rope_base: float = 10000.0
    norm_eps: float = 1e-5
    max_seq_len: int = 2048
    tie_embeddings: bool = True
    bos_id: int | None = None
    eos_id: int | None = None
    head_dim: int = field(init=False)

    def __post_init__(self) -> None:
        if self.dim % self.n_heads or self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"bad head layout: dim {self.dim}, heads {self.n_heads}, kv heads {self.n_kv_heads}"
            )
        self.head_dim = self.dim // self.n_heads

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LlamaConfig":
        names = {f.name for f in fields(cls) if f.init}
        unknown = set(d) - names - {"head_dim"}
        if unknown:
            raise ValueError(f"unknown LlamaConfig keys in manifest: {sorted(unknown)}")
        return cls(**{k: v for k, v in d.items() if k in names})

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("head_dim")
        return d


def rope_tables(head_dim: int, max_seq: int, base: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin float32 [max_seq, head_dim] (HF layout: the half-frequencies repeated twice)."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    freqs = torch.arange(max_seq, dtype=torch.float32)[:, None] * inv_freq[None, :]
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: [B, S, H, Dh]; cos/sin: [B, S, 1, Dh] in x's dtype
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # HF order: normalize in fp32, cast back, then scale.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def _decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      mask: torch.Tensor) -> torch.Tensor:
    """One query per row, computed in fp32: torch's bf16 SDPA CPU kernel is 3-6x slower here.

    q: [B, H, 1, Dh]; k, v: [B, Hkv, L, Dh]; mask: [B, 1, 1, L] -> [B, H, 1, Dh]
    """
    b, h, _, dh = q.shape
    hkv = k.shape[1]
    qg = q.reshape(b, hkv, h // hkv, dh).float()  # query heads grouped by their kv head
    scores = torch.matmul(qg, k.float().transpose(-1, -2)) * dh**-0.5  # [B, Hkv, G, L]
    scores = scores.masked_fill(~mask, float("-inf"))
    out = torch.matmul(torch.softmax(scores, dim=-1), v.float())  # [B, Hkv, G, Dh]
    return out.to(q.dtype).view(b, h, 1, dh)


class Attention(nn.Module):
    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.q_size, self.kv_size = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
        self.wqkv: nn.Module = nn.Linear(cfg.dim, self.q_size + 2 * self.kv_size, bias=False)
        self.wo: nn.Module = nn.Linear(self.q_size, cfg.dim, bias=False)
        self.kv_cache: KVCache | None = None
        self.scale = cfg.head_dim**-0.5
        # decode reads the cache in place with m4's kernel (setup_caches turns it on)
        self.fused_decode = False

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                mask: torch.Tensor | None, input_pos: torch.Tensor | None,
                rows: torch.Tensor | None, length: int) -> torch.Tensor:
        # x: [B, S, D]; mask: [B, 1, S, L] bool or None (= causal, cache-free)
        b, s, _ = x.shape
        q, k, v = self.wqkv(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = apply_rope(q.view(b, s, self.n_heads, self.head_dim), cos, sin)
        k = apply_rope(k.view(b, s, self.n_kv_heads, self.head_dim), cos, sin)
        q, k = q.transpose(1, 2), k.transpose(1, 2)  # [B, H, S, Dh], [B, Hkv, S, Dh]
        v = v.view(b, s, self.n_kv_heads, self.head_dim).transpose(1, 2)
        if mask is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        else:
            if self.kv_cache is None or input_pos is None:
                raise RuntimeError("cached forward needs setup_caches() first")
            if s == 1 and self.fused_decode:  # rows attend over [0, pos] of their own slot
                row_idx = self.kv_cache.write(k, v, input_pos, rows)
                y = torch.ops.m4.decode_attention(
                    q.reshape(b, self.n_heads, self.head_dim), self.kv_cache.k, self.kv_cache.v,
                    row_idx, input_pos[:, 0], self.scale).unsqueeze(2)
                fused: torch.Tensor = self.wo(y.transpose(1, 2).reshape(b, s, self.q_size))
                return fused
            k, v = self.kv_cache.update(k, v, input_pos, rows, length)  # [B, Hkv, L, Dh]
            if s == 1 and q.dtype != torch.float32:
                y = _decode_attention(q, k, v, mask)
            else:  # the cache may be kept in fp32 for the decode path
                y = F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype),
                                                   attn_mask=mask, enable_gqa=True)
        y = y.transpose(1, 2).reshape(b, s, self.q_size)  # [B, S, H*Dh]
        out: torch.Tensor = self.wo(y)
        return out


class FeedForward(nn.Module):
    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.ffn_dim = cfg.ffn_dim
        self.w13: nn.Module = nn.Linear(cfg.dim, 2 * cfg.ffn_dim, bias=False)  # gate ++ up
        self.w2: nn.Module = nn.Linear(cfg.ffn_dim, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.w13(x).split([self.ffn_dim, self.ffn_dim], dim=-1)  # [B, S, F] each
        out: torch.Tensor = self.w2(F.silu(gate) * up)
        return out


class Block(nn.Module):
    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.feed_forward = FeedForward(cfg)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                mask: torch.Tensor | None, input_pos: torch.Tensor | None,
                rows: torch.Tensor | None, length: int) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), cos, sin, mask, input_pos, rows, length)
        out: torch.Tensor = h + self.feed_forward(self.ffn_norm(h))
        return out


class Llama(nn.Module):
    rope_cos: torch.Tensor  # [max_seq_len, Dh] float32
    rope_sin: torch.Tensor

    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.config = cfg
        self.tok_embeddings: nn.Embedding | BlockEmbedding = embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        # Tied: holds the embedding matrix itself, multiplied with F.linear.
        self.output: nn.Module = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.register_buffer("rope_cos", torch.empty(0), persistent=False)
        self.register_buffer("rope_sin", torch.empty(0), persistent=False)
        self.cache_slots = 0
        self.cache_seq = 0
        # a decode step of a w4a8 model in float32 runs as one m4.decode_layers call
        self.fuse_decode = True
        # the layer loop, eager until setup_caches scripts it; not a submodule (it shares the
        # layers' tensors, which would otherwise appear twice in state_dict)
        self.__dict__["_stack"] = LayerStack(self.layers)

    @property
    def blocks(self) -> list[Block]:
        return [b for b in self.layers if isinstance(b, Block)]

    @property
    def dtype(self) -> torch.dtype:
        return self.norm.weight.dtype

    def init_rope(self, device: torch.device | str = "cpu") -> None:
        cos, sin = rope_tables(self.config.head_dim, self.config.max_seq_len, self.config.rope_base)
        self.rope_cos, self.rope_sin = cos.to(device), sin.to(device)

    def setup_caches(self, n_slots: int, max_seq: int, dtype: torch.dtype | None = None) -> None:
        """KV caches for `n_slots` sequences of up to `max_seq` tokens, then the layer stack
        over them (`_build_stack`)."""
        if max_seq > self.config.max_seq_len:
            raise ValueError(f"max_seq {max_seq} exceeds the model's context {self.config.max_seq_len}")
        dtype = dtype or self.dtype
        device = self.norm.weight.device
        fused = (device.type == "cpu" and dtype in (torch.bfloat16, torch.float32)
                 and self.config.head_dim in kernels.ATTENTION_HEAD_DIMS and kernels.available())
        for layer in self.blocks:
            layer.attention.kv_cache = KVCache(n_slots, self.config.n_kv_heads, max_seq,
                                               self.config.head_dim, dtype, device)
            layer.attention.fused_decode = fused
        self.cache_slots, self.cache_seq = n_slots, max_seq
        self.rebuild_stack()

    def _build_stack(self) -> None:
        """(Re)builds the layer stack over the current caches (see LayerStack). A fused stack
        runs every cached forward as one C++ call and stays eager: TorchScript would only
        speed its cache-free forward (next-word prediction) by ~3 %, for ~0.7 s of compile
        holding the GIL. Any other is TorchScript'd (eager where TorchScript cannot)."""
        stack = self._stack_over_caches()
        self.__dict__["_stack"] = stack if len(stack.fused) > 0 else script_stack(stack)

    def rebuild_stack(self) -> None:
        """After linears were swapped (an adapter attached or detached in torch, see
        ``m4d.adapters.modules``): the layers run eagerly, or as before once restored."""
        if any(type(m).__name__ == "LoraLinear" for m in self.modules()):
            self.__dict__["_stack"] = LayerStack(self.layers)  # eager: no fused step, no script
        elif self.cache_slots:
            self._build_stack()
        else:
            self.__dict__["_stack"] = LayerStack(self.layers)

    def _stack_over_caches(self) -> LayerStack:
        return LayerStack(self.layers, self._fused_tensors(), self.config.n_heads,
                          self.config.n_kv_heads, self.config.norm_eps, self.config.head_dim**-0.5)

    def _fused_tensors(self) -> tuple[list[torch.Tensor], list[int]] | None:
        """The layers' tensors and linears' weight kinds in m4.decode_layers' order when it
        can run the decode step (block linears, float32 activations, caches the fused
        attention reads), else None."""
        blocks = self.blocks
        if not (self.fuse_decode and blocks and self.dtype == torch.float32
                and all(b.attention.fused_decode for b in blocks)):
            return None
        tensors: list[torch.Tensor] = []
        kinds: list[int] = []
        for b in blocks:
            att, ffn, cache = b.attention, b.feed_forward, b.attention.kv_cache
            linears = [m for m in (att.wqkv, att.wo, ffn.w13, ffn.w2) if isinstance(m, BlockLinear)]
            if cache is None or len(linears) != 4:
                return None
            qkv, o, w13, w2 = linears
            tensors += [b.attention_norm.weight, qkv.weight, qkv.sc, o.weight, o.sc,
                        b.ffn_norm.weight, w13.weight, w13.sc, w2.weight, w2.sc, cache.k, cache.v]
            kinds += [lin.kind_code for lin in linears]
        return [t.detach() for t in tensors], kinds

    @property
    def fused(self) -> bool:
        """Whether a decode step runs as one m4.decode_layers call."""
        return len(self.__dict__["_stack"].fused) > 0

    @property
    def scripted(self) -> bool:
        """Whether the layers run as one TorchScript call."""
        return isinstance(self.__dict__["_stack"], torch.jit.ScriptModule)

    def _apply(self, fn: Any, recurse: bool = True) -> "Llama":  # .to(), .float(), ...
        super()._apply(fn, recurse)  # type: ignore[no-untyped-call]
        if self.cache_slots:  # the stack holds the old buffers: .to() may have made new ones
            self.rebuild_stack()
        return self

    def _layers(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                mask: torch.Tensor | None, input_pos: torch.Tensor | None,
                rows: torch.Tensor | None, length: int,
                lora: RowAdapters | None = None) -> torch.Tensor:
        tensors, ids = lora if lora is not None else ([], None)
        # no profiling-guided rewrites of a script: the same graph for every batch shape
        with torch.jit.optimized_execution(False):  # type: ignore[attr-defined]
            out: torch.Tensor = self.__dict__["_stack"](x, cos, sin, mask, input_pos, rows, length,
                                                        tensors, ids)
        return out

    @property
    def serves_adapters(self) -> bool:
        """Whether a cached forward can give each row its own LoRA (the fused step only)."""
        return self.fused

    def _rope(self, pos: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        # pos: [B, S] -> cos, sin: [B, S, 1, Dh]
        return (self.rope_cos[pos].unsqueeze(2).to(dtype), self.rope_sin[pos].unsqueeze(2).to(dtype))

    def _head(self, x: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.output(self.norm(x))
        return logits.float()

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor | None, input_pos: torch.Tensor,
                rows: torch.Tensor | None = None, last_only: bool = False,
                embeds: torch.Tensor | None = None,
                lora: RowAdapters | None = None) -> torch.Tensor:
        """tokens, input_pos: [B, S]; rows: [B] cache rows (None = rows 0..B-1); lora: the
        step's adapters (m4.decode_layers' tensors) and each row's, -1 for none [B].

        ``embeds`` [B, S, D] replaces ``tokens`` when the input is not (only) token ids, as
        in M4 path 1 where projected image or audio features sit among the prompt's tokens.
        Returns float32 logits [B, S, V] (or [B, 1, V] with last_only).
        """
        if embeds is None:
            if tokens is None:
                raise ValueError("give tokens or embeds")
            embeds = self.tok_embeddings(tokens)  # [B, S, D]
        else:
            embeds = embeds.to(self.dtype)
        tokens_shape = embeds.shape[:2]
        if self.cache_slots == 0:
            raise RuntimeError("call setup_caches() before the cached forward")
        if tokens_shape != input_pos.shape:
            raise ValueError(f"tokens {tuple(tokens_shape)} and input_pos {tuple(input_pos.shape)} differ")
        b = tokens_shape[0]
        if rows is None and b > self.cache_slots:
            raise ValueError(f"batch {b} exceeds the {self.cache_slots} cache rows")
        length = int(input_pos.max().item()) + 1  # attend over cache positions [0, length)
        if length > self.cache_seq or int(input_pos.min().item()) < 0:
            raise ValueError(f"positions must lie in [0, {self.cache_seq}), got up to {length - 1}")
        # Batch invariance: a row attends over [0, length) where length comes from the
        # batch's furthest row; the masked tail adds exact zeros, but reductions over L
        # (softmax sums, the P @ V matmul) split a ragged tail differently for each L.
        # Rounding L up to a multiple of ATTN_BLOCK keeps a row's own summation the same
        # whether it runs alone or beside longer rows.
        length = min(self.cache_seq, -(-length // ATTN_BLOCK) * ATTN_BLOCK)
        # mask: [B, 1, S, L], True = may attend
        mask = (torch.arange(length, device=input_pos.device)[None, None, :] <= input_pos[:, :, None])
        mask = mask.unsqueeze(1)
        x = embeds
        cos, sin = self._rope(input_pos, x.dtype)
        x = self._layers(x, cos, sin, mask, input_pos, rows, length, lora)
        if last_only:
            x = x[:, -1:]
        return self._head(x)

    @torch.inference_mode()
    def forward_full(self, tokens: torch.Tensor | None,
                     embeds: torch.Tensor | None = None) -> torch.Tensor:
        """Cache-free causal forward. tokens [B, S] (or embeds [B, S, D]) -> float32 logits [B, S, V]."""
        return self.causal_logits(tokens, embeds)

    def causal_logits(self, tokens: torch.Tensor | None, embeds: torch.Tensor | None = None,
                      select: torch.Tensor | None = None) -> torch.Tensor:
        """``forward_full`` outside inference mode, so gradients can flow (adapter training).
        ``select`` [B, S] bool: only those positions' logits, as [N, V] (the head is the
        largest matrix: a loss over a reply's tokens skips it for the prompt's)."""
        if embeds is None:
            if tokens is None:
                raise ValueError("give tokens or embeds")
            embeds = self.tok_embeddings(tokens)
        x = embeds.to(self.dtype)
        b, s = x.shape[:2]
        pos = torch.arange(s, device=x.device).expand(b, s)
        cos, sin = self._rope(pos, x.dtype)
        x = self._layers(x, cos, sin, None, None, None, s)
        return self._head(x if select is None else x[select])


@torch.inference_mode()
def greedy_generate(model: Llama, prompt_ids: list[int], max_new_tokens: int,
                    eos_id: int | None) -> list[int]:
    """Reference greedy loop on cache row 0. Returns new ids; stops after eos (not included)."""
    if not prompt_ids:
        raise ValueError("empty prompt")
    need = len(prompt_ids) + max_new_tokens
    if model.cache_slots < 1 or model.cache_seq < need:
        model.setup_caches(max(model.cache_slots, 1), need)
    tokens = torch.tensor([prompt_ids], dtype=torch.long)
    pos = torch.arange(len(prompt_ids)).unsqueeze(0)
    logits = model(tokens, pos, last_only=True)  # [1, 1, V]
    out: list[int] = []
    for i in range(max_new_tokens):
        nxt = int(logits[0, -1].argmax().item())
        if eos_id is not None and nxt == eos_id:
            break
        out.append(nxt)
        if i == max_new_tokens - 1:
            break
        p = len(prompt_ids) + i
        logits = model(torch.tensor([[nxt]]), torch.tensor([[p]]))
    return out


def load_llama(weights_file: Path, config: LlamaConfig, *, weight_format: str,
               compute_dtype: torch.dtype, device: str = "cpu", digest: str | None = None,
               packed: dict[str, nn.Module] | None = None) -> Llama:
    """Build the network on meta, then assign weights converted to ``weight_format``.

    weight_format: "int4" (exact from stored Q4_1; group-32 min/max quantization from dense),
    "w4a8" (the stored GGUF blocks and Q8_0 head as they are, activations as two int8 digits
    per 32 values, m4's kernels for this CPU; runs as int4 where they are not built),
    "int8" (per-channel symmetric from the dense weights), "w8a8" (int8 weights per channel,
    activations as two int8 digits per row, the LM head too: the batched-serving format, see
    ``Int8DynamicLinear``), "bfloat16", "float32" (dense). Norms are kept in the compute
    dtype, the (tied) LM head dense in the compute dtype except with w8a8 and w4a8.
    ``packed`` (w4a8 only): linears already packed for the kernels, by module name
    (``m4d.model.packed``), used instead of packing the blocks.
    """
    weight_format = resolve_weight_format(weight_format, compute_dtype)
    packed = packed if weight_format == "w4a8" else None  # linears packed by the builder
    with torch.device("meta"):
        model = Llama(config)
    with WeightFile(weights_file, digest) as wf:
        def dense(name: str) -> nn.Parameter:
            return nn.Parameter(wf.dense(name).to(compute_dtype), requires_grad=False)

        emb_name = "model.embed_tokens.weight"
        emb_shape = wf.dense_shape(emb_name)
        if emb_shape != (config.vocab_size, config.dim):
            raise ValueError(f"embedding shape {emb_shape} does not match the config")
        head_name = emb_name if config.tie_embeddings else "lm_head.weight"
        # w4a8 with a stored (quantized) table: the head runs on its own packed copy, so
        # lookups gather rows from the stored blocks instead of holding the float table
        w4a8_head = weight_format == "w4a8" and config.vocab_size % KERNEL_TILE == 0
        table: nn.Parameter | None = None
        if w4a8_head and wf.kind(emb_name) != "dense":
            model.tok_embeddings = BlockEmbedding(wf.kind(emb_name), wf.blocks(emb_name),
                                                  compute_dtype)
        else:
            table = dense(emb_name)
            assert isinstance(model.tok_embeddings, nn.Embedding)
            model.tok_embeddings.weight = table
        if w4a8_head and packed is not None and "output" in packed:
            model.output = packed["output"]
        elif w4a8_head:
            # the checkpoint's head blocks as they are (Q8_0, Q6_K, Q4_K, ...), batched like
            # the layers; a dense head is quantized to Q8_0
            head_out = (build_linear(wf, [head_name], "w4a8", torch.float32)
                        if wf.kind(head_name) != "dense"
                        else q8_0_from_float(dense(head_name), out_dtype=torch.float32))
            if isinstance(head_out, BlockLinear):
                head_out.out_dtype = torch.float32
            model.output = head_out
        else:
            head_weight = table if config.tie_embeddings and table is not None else dense(head_name)
            if weight_format == "w8a8":  # the head is the largest matrix: batch it like the rest
                model.output = Int8DynamicLinear.from_float(head_weight, dtype=compute_dtype)
            else:
                head = nn.Linear(config.dim, config.vocab_size, bias=False, device="meta")
                head.weight = head_weight
                model.output = head
        model.norm.weight = dense("model.norm.weight")

        def linears(i: int) -> list[nn.Module]:  # numpy packing, mostly without the GIL
            names = [f"layers.{i}.attention.wqkv", f"layers.{i}.attention.wo",
                     f"layers.{i}.feed_forward.w13", f"layers.{i}.feed_forward.w2"]
            if packed is not None and all(n in packed for n in names):
                return [packed[n] for n in names]
            att, ffn = f"model.layers.{i}.self_attn.", f"model.layers.{i}.mlp."
            return [build_linear(wf, names, weight_format, compute_dtype) for names in (
                [att + "q_proj.weight", att + "k_proj.weight", att + "v_proj.weight"],
                [att + "o_proj.weight"], [ffn + "gate_proj.weight", ffn + "up_proj.weight"],
                [ffn + "down_proj.weight"])]

        with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
            built = list(pool.map(linears, range(len(model.blocks))))
        for i, layer in enumerate(model.blocks):
            p = f"model.layers.{i}."
            layer.attention_norm.weight = dense(p + "input_layernorm.weight")
            layer.ffn_norm.weight = dense(p + "post_attention_layernorm.weight")
            (layer.attention.wqkv, layer.attention.wo, layer.feed_forward.w13,
             layer.feed_forward.w2) = built[i]
    model.init_rope(device)
    leftover = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if leftover:
        raise RuntimeError(f"weights missing after load: {leftover[:5]}")
    return model.to(device).eval()
